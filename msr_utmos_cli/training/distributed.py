"""Data parallelism under `torchrun`: which process this is, its device, and the collectives the loop needs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..checkpoint import parse_device
from . import TrainingError


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def device_for(name: str, local_rank: int) -> torch.device:
    """The scoring device rule (checkpoint.parse_device); a GPU named without an index is this process's own."""
    try:
        dev = parse_device(name)
    except ValueError as e:
        raise TrainingError(f"trainer.device: {e}") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"rank {local_rank} needs {dev} but this machine has {torch.cuda.device_count()} "
                                "GPU(s): start at most that many processes per node, or set trainer.device=cpu")
    return dev


def join(world: int, device: torch.device) -> bool:
    """Start the process group when torchrun asks for one and none exists; True when this call started it."""
    if world <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def all_reduce_(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `t` over ranks in place (nothing to do for one process)."""
    if world > 1:
        dist.all_reduce(t)
    return t


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """One flat all-reduce, so the averaged gradient is bitwise equal on every rank."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]) / world
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def gather(obj, world: int) -> list:
    """Every rank's `obj`, in rank order."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
