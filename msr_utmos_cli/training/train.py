"""The one training loop, shared by `utmos distill` and `utmos finetune`.

A task supplies the model, its batches, its loss and its export; `fit` does the rest:
AdamW with linear warm-up + cosine decay, gradient accumulation and clipping, bf16 autocast
on CUDA, data parallelism under `torchrun`, checkpoints that survive a crash at any moment,
exact resume, validation with best-checkpoint selection and early stopping.

Checkpoint layout (`out_dir/last`, `out_dir/best`): a complete model folder written by
`task.export` plus `trainer_state.pt` (plain tensors and containers only) and `run_config.yaml`.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..checkpoint import parse_device

STATE_FILE = "trainer_state.pt"
RUN_CONFIG = "run_config.yaml"
PRECISIONS = ("auto", "fp32", "bf16")
RUN_FILES = ("metrics.jsonl", "last", "best", ".last.old", ".best.old", ".last.tmp", ".best.tmp", "predictions.csv")
DEFAULT_MAX_STEPS = 1000  # when neither max_steps nor max_epochs is given


class TrainingError(Exception):
    """Training cannot go on; the message is one line saying why and what is kept."""


class OutDirError(Exception):
    """trainer.out_dir holds a run that this one would replace; nothing was touched."""


def check_out_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> list[Path]:
    """The earlier run's files that a fresh run would replace; refused (rank 0) unless `overwrite`."""
    if resume and overwrite:
        raise OutDirError("--resume and --overwrite exclude each other")
    found = [] if resume or _dist_env()[0] else [Path(out_dir) / n for n in RUN_FILES if (Path(out_dir) / n).exists()]
    if found and not overwrite:
        raise OutDirError(f"{out_dir} already holds a run ({', '.join(p.name for p in found)}); continue it "
                          "with --resume, replace it with --overwrite, or set another trainer.out_dir")
    return found


@dataclass
class TrainConfig:
    """The `trainer:` section of a run config."""

    out_dir: str  # checkpoints (last/, best/) and metrics.jsonl go here
    max_steps: int | None = None  # optimizer steps (1000 when max_epochs is not given either)
    max_epochs: int | None = None  # passes over the training data; with max_steps, whichever ends first
    batch_size: int = 8  # examples per rank per micro-batch; global batch = batch_size * world * grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step (bigger batches in the same memory)
    lr: float = 1e-4  # peak learning rate (groups may scale it with "lr_scale")
    weight_decay: float = 1e-5  # AdamW decoupled weight decay
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to 0 at max_steps
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    ckpt_every: int = 200  # steps between checkpoints into out_dir/last (and at the end)
    log_every: int = 10  # steps between metrics.jsonl records
    valid_every: int = 0  # steps between validations; 0: at every checkpoint
    seed: int = 0  # seeds init, data order and dropout
    device: str = "auto"  # auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU
    patience: int = 0  # stop after this many validations without improvement (0: never)

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS

    def validate(self) -> None:
        positive = ("max_steps", "max_epochs", "batch_size", "grad_accum", "ckpt_every", "log_every")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "valid_every", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.lr > 0:
            raise ValueError(f"trainer.lr must be > 0, got {self.lr}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: max_steps, or max_epochs whole epochs if that ends first."""
        bounds = [self.max_steps] if self.max_steps is not None else []
        if self.max_epochs is not None:
            bounds.append(self.max_epochs * max(steps_per_epoch, 1))
        return min(bounds)


class Task(Protocol):
    """What `fit` trains. Optional methods: validate, state, load_state, set_device, audio_seconds,
    steps_per_epoch(world) (optimizer steps in one pass over the training data; needed for max_epochs)."""

    model: torch.nn.Module  # the parameters that are optimised; fit averages their gradients across ranks

    def param_groups(self) -> list[dict]: ...  # torch optimizer groups; an "lr_scale" key scales trainer.lr

    def batches(self, rank: int, world: int, seed: int, start: int) -> Iterator[Any]: ...

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def export(self, folder: Path, metadata: dict) -> None: ...


# --- distributed helpers -------------------------------------------------------
def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(name: str, local_rank: int) -> torch.device:
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


def _all_reduce_(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# --- schedule and RNG ------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _rng_state() -> dict:
    """RNG states as plain lists of ints (they travel through all_gather_object and weights_only loads)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [t.tolist() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# --- checkpoints -------------------------------------------------------------------
def _write_checkpoint(out_dir: Path, name: str, task, state: dict, run_config: dict, metadata: dict) -> Path:
    """Build the folder beside its final place, then swap it in with renames.

    At every moment either `name/` or `.name.old/` is a complete checkpoint, so a SIGKILL
    never leaves only a torn one (`find_checkpoint` falls back to `.name.old`).
    """
    final, tmp, old = out_dir / name, out_dir / f".{name}.tmp", out_dir / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    task.export(tmp, metadata)
    torch.save(state, tmp / STATE_FILE)
    (tmp / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: str | os.PathLike, name: str = "last") -> Path | None:
    """The newest complete checkpoint folder of that name, or None."""
    out_dir = Path(out_dir)
    for cand in (out_dir / name, out_dir / f".{name}.old"):
        if (cand / STATE_FILE).is_file():
            return cand
    return None


def load_trainer_state(folder: Path) -> dict:
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which and why, in one line
        raise TrainingError(f"{folder / STATE_FILE}: cannot resume ({type(e).__name__}: {e})") from None


# --- the loop ----------------------------------------------------------------------------
def _better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def fit(task: Task, cfg: TrainConfig, run_config: dict, resume: bool = False,
        select_metric: str | None = None, select_mode: str = "max", overwrite: bool = False) -> dict:
    """Train `task` for `cfg.max_steps` optimizer steps (or `cfg.max_epochs` epochs); returns a summary dict.

    Under torchrun each rank draws its own batches (`task.batches(rank, world, ...)`) and the
    gradients are averaged over ranks before every step, so the global batch is the sum of the
    per-rank batches. `task.model` is never wrapped: call it any way you like in `task.loss`.
    Validation (`task.validate`, rank 0) picks `out_dir/best` by `select_metric` (default: the
    first metric returned) in `select_mode` ("max" or "min"). An out_dir holding an earlier
    run is refused unless `resume` or `overwrite` (which deletes that run's files first).
    """
    cfg.validate()
    for old in check_out_dir(cfg.out_dir, resume, overwrite):
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    if select_mode not in ("max", "min"):
        raise ValueError(f"select_mode must be 'max' or 'min', got {select_mode!r}")
    rank, world, local_rank = _dist_env()
    if cfg.max_epochs is not None:  # from here on max_steps is the run's length in steps
        if not hasattr(task, "steps_per_epoch"):
            raise TrainingError("trainer.max_epochs: this task counts steps only; set trainer.max_steps")
        cfg = replace(cfg, max_steps=cfg.total_steps(task.steps_per_epoch(world)))
    device = _device(cfg.device, local_rank)
    own_group = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    main = rank == 0
    out_dir = Path(cfg.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    model = task.model.to(device)
    if hasattr(task, "set_device"):
        task.set_device(device)
    groups = task.param_groups()
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
        g.setdefault("weight_decay", cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))

    step, best, bad_validations, window = 0, None, 0, None
    if resume:
        ckpt = find_checkpoint(out_dir)
        if ckpt is None:
            raise TrainingError(f"--resume: no checkpoint in {out_dir / 'last'}")
        st = load_trainer_state(ckpt)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, best, bad_validations = st["step"], st.get("best"), st.get("bad_validations", 0)
        if hasattr(task, "load_state") and st.get("task") is not None:
            task.load_state(st["task"])
        _set_rng_state(st["rng"][rank] if rank < len(st["rng"]) else st["rng"][0])
        windows = st.get("log_window") or [None]  # older checkpoints: the first record covers the resumed steps only
        window = windows[rank] if rank < len(windows) else None
    elif world > 1:  # every rank starts from rank 0's weights
        for t in model.state_dict().values():
            dist.broadcast(t, 0)

    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())

    metrics_path = out_dir / "metrics.jsonl"
    if main:  # on resume drop records the interrupted run wrote after its last checkpoint
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l).get("step", 0) <= step] \
            if resume and metrics_path.exists() else []
        metrics_path.write_text("".join(l + "\n" for l in kept))

    def log(record: dict) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(name: str = "last") -> None:
        # The loss sums of the log window in progress go with it, so a resumed run's next record is
        # the uninterrupted run's to the last bit.
        own = (_rng_state(), {"sums": dict(window_loss), "n": window_n})
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, own)
        else:
            gathered = [own]
        rngs, windows = [g[0] for g in gathered], [g[1] for g in gathered]
        if main:
            state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                     "batches_consumed": step * cfg.grad_accum, "best": best,
                     "bad_validations": bad_validations, "world_size": world, "rng": rngs, "log_window": windows,
                     "task": task.state() if hasattr(task, "state") else None}
            meta = {"step": step, "best": best, "select_metric": select_metric, "run_config": run_config}
            _write_checkpoint(out_dir, name, task, state, run_config, meta)
        if world > 1:
            dist.barrier()

    def run_validation() -> bool:
        """Validate on rank 0; returns True when patience is exhausted (same answer on every rank)."""
        nonlocal best, bad_validations, select_metric
        stop = torch.zeros(1, device=device)
        if main and hasattr(task, "validate"):
            model.eval()
            with torch.no_grad():  # fp32 even when training in bf16: best/ is chosen on, and validation
                metrics = task.validate()  # predictions equal, what scoring the saved model gives
            model.train()
            if metrics:
                select_metric = select_metric or next(iter(metrics))
                value = float(metrics[select_metric])
                improved = _better(value, best, select_mode)
                if improved:
                    best, bad_validations = value, 0
                else:
                    bad_validations += 1
                log({"step": step, "valid": metrics, "best": best, "select_metric": select_metric})
                if improved:
                    state = {"step": step, "best": best}
                    meta = {"step": step, "best": best, "select_metric": select_metric, "valid": metrics,
                            "run_config": run_config}
                    _write_checkpoint(out_dir, "best", task, state, run_config, meta)
                stop[0] = float(cfg.patience > 0 and bad_validations >= cfg.patience)
        _all_reduce_(stop, world)
        return bool(stop.item())

    # Ctrl-C and SIGTERM finish the current step, checkpoint and leave (a second Ctrl-C aborts at once).
    stop_flag = {"set": False}

    def on_signal(signum, frame):
        if stop_flag["set"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_flag["set"] = True

    prev = {}
    if threading_main():
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev[sig] = signal.signal(sig, on_signal)

    bar = None
    if main and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, file=sys.stderr, dynamic_ncols=True, unit="step")
    stream = task.batches(rank, world, cfg.seed, step * cfg.grad_accum)
    audio_s = getattr(task, "audio_seconds", None)
    valid_every = cfg.valid_every or cfg.ckpt_every
    summary = {"out_dir": str(out_dir), "interrupted": False, "early_stopped": False, "max_steps": cfg.max_steps}
    model.train()
    t0, window_audio, window_loss, window_n, last_good = time.perf_counter(), 0.0, {}, 0, step
    if window is not None:
        window_loss, window_n = dict(window["sums"]), int(window["n"])
    try:
        while step < cfg.max_steps:
            opt.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                try:
                    batch = _to_device(next(stream), device)
                except StopIteration:
                    raise TrainingError("task.batches ended before max_steps; it must be an endless stream") from None
                with autocast:
                    loss, parts = task.loss(batch, step)
                finite = torch.isfinite(loss.detach()).float().reshape(1)
                if world > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    raise TrainingError(f"loss is {loss.item()} at step {step + 1}; stopped. The last good "
                                        f"checkpoint (step {last_good}) is in {out_dir / 'last'}")
                (loss / cfg.grad_accum).backward()
                window_audio += float(audio_s(batch)) if audio_s else 0.0
                for k, v in {"loss": loss.item(), **parts}.items():
                    window_loss[k] = window_loss.get(k, 0.0) + float(v)
                window_n += 1
            if world > 1:  # one flat all-reduce: the averaged gradient is bitwise equal on every rank
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([g.reshape(-1) for g in grads]) / world
                dist.all_reduce(flat)
                offset = 0
                for p, g in zip(params, grads):
                    n = g.numel()
                    p.grad = flat[offset:offset + n].view_as(p).clone()
                    offset += n
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if not torch.isfinite(gnorm):
                raise TrainingError(f"gradient norm is {gnorm.item()} at step {step + 1}; stopped. The last good "
                                    f"checkpoint (step {last_good}) is in {out_dir / 'last'}")
            opt.step()
            sched.step()
            step += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - t0
                stats = torch.tensor([window_audio] + [window_loss[k] for k in sorted(window_loss)], dtype=torch.float64)
                stats = _all_reduce_(stats.to(device), world).cpu()
                rec = {"step": step, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                       "global_batch": cfg.batch_size * world * cfg.grad_accum,
                       **{k: float(stats[i + 1]) / (window_n * world) for i, k in enumerate(sorted(window_loss))},
                       "audio_s_per_s": float(stats[0]) / dt, "time": time.time()}
                log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                    audio=f"{rec['audio_s_per_s']:.1f}s/s")
                t0, window_audio, window_loss, window_n = time.perf_counter(), 0.0, {}, 0
            flag = _all_reduce_(torch.tensor([float(stop_flag["set"])], device=device), world)
            if flag.item() > 0:
                raise KeyboardInterrupt
            stop = False
            if step % valid_every == 0 or step == cfg.max_steps:
                stop = run_validation()
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop:
                checkpoint()
                last_good = step
            if stop:
                summary["early_stopped"] = True
                break
    except KeyboardInterrupt:  # at a step boundary when it came through stop_flag: resume is exact
        summary["interrupted"] = True
        checkpoint()
        last_good = step
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in prev.items():
            signal.signal(sig, handler)
        if own_group:
            dist.destroy_process_group()
    summary.update(step=step, best=best, select_metric=select_metric)
    return summary


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
