"""The one training loop, shared by `utmos distill` and `utmos finetune`.

A task supplies the model, its batches, its loss and its export; `fit` does the rest:
AdamW with linear warm-up + cosine decay, gradient accumulation and clipping, bf16 autocast
on CUDA, data parallelism under `torchrun`, checkpoints that survive a crash at any moment
(checkpoints.py), exact resume, validation with best-checkpoint selection and early stopping.
`fit` reads as its steps: prepare, set up, resume, then `_step`, `_log`, `_validate` and
`_checkpoint` until the run ends.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist

from . import TrainingError
from .checkpoints import (check_out_dir, find_checkpoint, load_trainer_state, rng_state, seed_everything,
                          set_rng_state, write_checkpoint)
from .distributed import all_reduce_, average_gradients, device_for, dist_env, gather, join

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_MAX_STEPS = 1000  # when neither max_steps nor max_epochs is given
METRICS = "metrics.jsonl"


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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))



def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@dataclass
class LogWindow:
    """Sums over the micro-batches since the last metrics record. Checkpoints carry `state()`, so a resumed
    run's next record is the uninterrupted run's to the last bit."""
    sums: dict[str, float] = field(default_factory=dict)
    n: int = 0
    audio_s: float = 0.0  # throughput is measured from the (re)start, so these two are not carried
    t0: float = field(default_factory=time.perf_counter)

    def add(self, parts: dict[str, float], audio_s: float) -> None:
        self.audio_s += audio_s
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def state(self) -> dict:
        return {"sums": dict(self.sums), "n": self.n}


@dataclass
class Run:
    """One `fit` call: its settings, this process's place in the job, and what a checkpoint keeps."""
    task: Task
    cfg: TrainConfig
    run_config: dict
    select_metric: str | None
    select_mode: str
    rank: int
    world: int
    device: torch.device
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    autocast: Any  # bf16 autocast, or a null context for fp32
    step: int = 0
    best: float | None = None
    bad_validations: int = 0
    last_good: int = 0  # the step out_dir/last holds
    window: LogWindow = field(default_factory=LogWindow)

    @property
    def main(self) -> bool:
        """Rank 0 validates and writes the files."""
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model


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
    rank, world, local_rank = dist_env()
    cfg = _prepare(task, cfg, world, resume, overwrite, select_mode)
    device = device_for(cfg.device, local_rank)
    own_group = join(world, device)
    try:
        run = _setup(task, cfg, run_config, select_metric, select_mode, rank, world, device)
        if resume:
            _resume(run)
        elif world > 1:  # every rank starts from rank 0's weights
            for t in run.model.state_dict().values():
                dist.broadcast(t, 0)
        _start_metrics(run, resume)
        return _train(run)
    finally:
        if own_group:
            dist.destroy_process_group()


def _prepare(task: Task, cfg: TrainConfig, world: int, resume: bool, overwrite: bool,
             select_mode: str) -> TrainConfig:
    """Check the config, clear an earlier run when overwriting, and fix the run's length in steps."""
    cfg.validate()
    for old in check_out_dir(cfg.out_dir, resume, overwrite):
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    if select_mode not in ("max", "min"):
        raise ValueError(f"select_mode must be 'max' or 'min', got {select_mode!r}")
    if cfg.max_epochs is not None:  # from here on max_steps is the run's length in steps
        if not hasattr(task, "steps_per_epoch"):
            raise TrainingError("trainer.max_epochs: this task counts steps only; set trainer.max_steps")
        cfg = replace(cfg, max_steps=cfg.total_steps(task.steps_per_epoch(world)))
    return cfg


def _setup(task: Task, cfg: TrainConfig, run_config: dict, select_metric: str | None, select_mode: str,
           rank: int, world: int, device: torch.device) -> Run:
    """Seed, place the model and build its optimizer and schedule: where a fresh run starts."""
    if rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    task.model.to(device)
    if hasattr(task, "set_device"):
        task.set_device(device)
    groups = task.param_groups()
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
        g.setdefault("weight_decay", cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    return Run(task, cfg, run_config, select_metric, select_mode, rank, world, device, opt, sched,
               [p for g in groups for p in g["params"]], autocast)


def _resume(run: Run) -> None:
    """Continue out_dir/last: weights, optimizer, schedule, counters, RNG and the log window in progress."""
    ckpt = find_checkpoint(run.out_dir)
    if ckpt is None:
        raise TrainingError(f"--resume: no checkpoint in {run.out_dir / 'last'}")
    st = load_trainer_state(ckpt)
    run.model.load_state_dict(st["model"])
    run.opt.load_state_dict(st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    run.step, run.best, run.bad_validations = st["step"], st.get("best"), st.get("bad_validations", 0)
    run.last_good = run.step
    if hasattr(run.task, "load_state") and st.get("task") is not None:
        run.task.load_state(st["task"])
    set_rng_state(st["rng"][run.rank] if run.rank < len(st["rng"]) else st["rng"][0])
    windows = st.get("log_window") or [None]  # older checkpoints: the first record covers the resumed steps only
    window = windows[run.rank] if run.rank < len(windows) else None
    if window is not None:
        run.window = LogWindow(dict(window["sums"]), int(window["n"]))


def _start_metrics(run: Run, resume: bool) -> None:
    """A fresh metrics.jsonl; on resume, without the records the interrupted run wrote after its checkpoint."""
    if not run.main:
        return
    path = run.out_dir / METRICS
    kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= run.step] \
        if resume and path.exists() else []
    path.write_text("".join(line + "\n" for line in kept))


def _record(run: Run, record: dict) -> None:
    if run.main:
        with open(run.out_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")


def _train(run: Run) -> dict:
    """Steps until max_steps or early stopping; Ctrl-C or SIGTERM finishes the step, checkpoints and leaves."""
    cfg = run.cfg
    summary = {"out_dir": str(run.out_dir), "interrupted": False, "early_stopped": False, "max_steps": cfg.max_steps}
    stream = run.task.batches(run.rank, run.world, cfg.seed, run.step * cfg.grad_accum)
    valid_every = cfg.valid_every or cfg.ckpt_every
    with _stop_requests() as requested, _progress_bar(run) as bar:
        run.model.train()
        run.window.t0 = time.perf_counter()
        try:
            while run.step < cfg.max_steps:
                gnorm = _step(run, stream)
                if bar is not None:
                    bar.update(1)
                last = run.step == cfg.max_steps
                if run.step % cfg.log_every == 0 or last:
                    _log(run, gnorm, bar)
                if all_reduce_(torch.tensor([float(requested())], device=run.device), run.world).item() > 0:
                    raise KeyboardInterrupt
                stop = _validate(run) if run.step % valid_every == 0 or last else False
                if run.step % cfg.ckpt_every == 0 or last or stop:
                    _checkpoint(run)
                if stop:
                    summary["early_stopped"] = True
                    break
        except KeyboardInterrupt:  # at a step boundary when it came through a signal: resume is exact
            summary["interrupted"] = True
            _checkpoint(run)
    summary.update(step=run.step, best=run.best, select_metric=run.select_metric)
    return summary


def _step(run: Run, stream: Iterator[Any]) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the gradient norm before clipping."""
    cfg, task = run.cfg, run.task
    audio_s = getattr(task, "audio_seconds", None)
    run.opt.zero_grad(set_to_none=True)
    for _ in range(cfg.grad_accum):
        try:
            batch = _to_device(next(stream), run.device)
        except StopIteration:
            raise TrainingError("task.batches ended before max_steps; it must be an endless stream") from None
        with run.autocast:
            loss, parts = task.loss(batch, run.step)
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if run.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise TrainingError(f"loss is {loss.item()} at step {run.step + 1}; stopped. {_kept(run)}")
        (loss / cfg.grad_accum).backward()
        run.window.add({"loss": loss.item(), **parts}, float(audio_s(batch)) if audio_s else 0.0)
    if run.world > 1:
        average_gradients(run.params, run.world)
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not torch.isfinite(gnorm):
        raise TrainingError(f"gradient norm is {gnorm.item()} at step {run.step + 1}; stopped. {_kept(run)}")
    run.opt.step()
    run.sched.step()
    run.step += 1
    return gnorm


def _kept(run: Run) -> str:
    return f"The last good checkpoint (step {run.last_good}) is in {run.out_dir / 'last'}"


def _log(run: Run, gnorm: torch.Tensor, bar) -> None:
    """A metrics record: the loss terms averaged over the window's micro-batches on all ranks, lr, throughput."""
    w, cfg = run.window, run.cfg
    keys = sorted(w.sums)
    dt = time.perf_counter() - w.t0
    stats = torch.tensor([w.audio_s] + [w.sums[k] for k in keys], dtype=torch.float64)
    stats = all_reduce_(stats.to(run.device), run.world).cpu()
    rec = {"step": run.step, "lr": run.sched.get_last_lr()[0], "grad_norm": float(gnorm),
           "global_batch": cfg.batch_size * run.world * cfg.grad_accum,
           **{k: float(stats[i + 1]) / (w.n * run.world) for i, k in enumerate(keys)},
           "audio_s_per_s": float(stats[0]) / dt, "time": time.time()}
    _record(run, rec)
    if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", audio=f"{rec['audio_s_per_s']:.1f}s/s")
    run.window = LogWindow()


def _better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _validate(run: Run) -> bool:
    """Validate on rank 0 and keep out_dir/best; True when patience is exhausted (the same answer on every rank)."""
    stop = torch.zeros(1, device=run.device)
    if run.main and hasattr(run.task, "validate"):
        run.model.eval()
        with torch.no_grad():  # fp32 even when training in bf16: best/ is chosen on, and validation
            metrics = run.task.validate()  # predictions equal, what scoring the saved model gives
        run.model.train()
        if metrics:
            run.select_metric = run.select_metric or next(iter(metrics))
            value = float(metrics[run.select_metric])
            improved = _better(value, run.best, run.select_mode)
            if improved:
                run.best, run.bad_validations = value, 0
            else:
                run.bad_validations += 1
            _record(run, {"step": run.step, "valid": metrics, "best": run.best, "select_metric": run.select_metric})
            if improved:
                meta = {"step": run.step, "best": run.best, "select_metric": run.select_metric, "valid": metrics,
                        "run_config": run.run_config}
                write_checkpoint(run.out_dir, "best", run.task, {"step": run.step, "best": run.best},
                                 run.run_config, meta)
            stop[0] = float(run.cfg.patience > 0 and run.bad_validations >= run.cfg.patience)
    all_reduce_(stop, run.world)
    return bool(stop.item())


def _checkpoint(run: Run) -> None:
    """out_dir/last: all that resume needs, every rank's RNG and log window included."""
    rngs, windows = zip(*gather((rng_state(), run.window.state()), run.world))
    if run.main:
        state = {"model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
                 "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "step": run.step,
                 "batches_consumed": run.step * run.cfg.grad_accum, "best": run.best,
                 "bad_validations": run.bad_validations, "world_size": run.world, "rng": list(rngs),
                 "log_window": list(windows), "task": run.task.state() if hasattr(run.task, "state") else None}
        meta = {"step": run.step, "best": run.best, "select_metric": run.select_metric, "run_config": run.run_config}
        write_checkpoint(run.out_dir, "last", run.task, state, run.run_config, meta)
    if run.world > 1:
        dist.barrier()
    run.last_good = run.step


@contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """While inside, Ctrl-C and SIGTERM only ask the loop to stop after the step in progress (a second
    Ctrl-C aborts at once); yields the question "was a stop asked for?"."""
    asked = {"stop": False}

    def on_signal(signum, frame):
        if asked["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked["stop"] = True

    prev = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev[sig] = signal.signal(sig, on_signal)
    try:
        yield lambda: asked["stop"]
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)


@contextmanager
def _progress_bar(run: Run):
    """A step bar on rank 0 when stderr is a terminal, else None."""
    bar = None
    if run.main and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=run.cfg.max_steps, initial=run.step, file=sys.stderr, dynamic_ncols=True, unit="step")
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
