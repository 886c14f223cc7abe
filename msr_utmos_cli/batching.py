"""Batched scoring whose shapes come from each window alone, and reading ahead of the model.

Kernels pick their blocking (and so their float rounding) by shape, so a window's score could
move with whatever shares its batch. Here it cannot: a window is padded to a length bucket that
depends only on its own length, batched only with windows of the same rate and bucket, and every
batch has the same row count (dummy rows fill it), with the padding masked throughout the model.
Each window then meets the same shapes whatever else is in the run: its score is bitwise the
same beside any neighbours, in any order; across batch sizes it agrees to float noise. Batch size
1 is the unpadded single-window path, unchanged.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Executor
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Batch size by device (benchmarks/bench_score.py, docs/benchmarks.md). CPU: one unpadded window at
# a time, measured as fast as batching on a mixed set there. CUDA: on an H200 the spectrogram models
# run as fast at 32 as at 8 (1.4-1.9x batch 1); a row of the `base` preset holding a 20 s window at
# 48 kHz takes ~0.45 GiB, so 32 rows suit a data-centre GPU (40 GiB or more) and 8 a smaller one.
AUTO_BATCH = {"cpu": 1, "cuda": 32, "small cuda": 8}
BIG_GPU_BYTES = 40 * 2**30
BUCKETS_PER_OCTAVE = 8  # padding costs at most 1/8 of a window's length
READ_AHEAD = 4  # windows read ahead of the model, per reader thread and per batch row


def parse_batch_size(value) -> int | str:
    """'auto' or a positive whole number (as text from the command line, or an int)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(str(value).strip()) if not isinstance(value, bool) else 0
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--batch-size must be a positive whole number or auto, not {value!r}")
    return n


def batch_size_for(value, device: torch.device) -> int:
    """The batch size a run uses: the number given, or the measured best for the device."""
    value = parse_batch_size(value)
    if value != "auto":
        return value
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < BIG_GPU_BYTES:
        return AUTO_BATCH["small cuda"]
    return AUTO_BATCH.get(device.type, 1)


def workers_for(value: int | None, device: torch.device) -> int:
    """Reader threads: the number given, else none on a CPU (decoding there competes with the model
    for the same cores) and up to 16 when a GPU does the scoring."""
    if value is None:
        return 0 if torch.device(device).type == "cpu" else min(16, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"--workers must be a whole number >= 0, not {value!r}")
    return value


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"unknown --precision {value!r} (fp32, bf16 or fp16)")
    return value


def autocast(device: torch.device, precision: str):
    """fp32 runs as is; bf16/fp16 under torch.autocast (norms and softmax stay fp32 there)."""
    dtype = PRECISIONS[check_precision(precision)]
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def bucket(frames: int, batch_size: int) -> int:
    """The padded length of a window of `frames` samples: a function of that length alone.

    Batch size 1 is not padded. Otherwise the length is rounded up on a geometric ladder of
    BUCKETS_PER_OCTAVE steps per octave, so few buckets cover 1 s to 20 s at little padding."""
    if batch_size == 1 or frames <= BUCKETS_PER_OCTAVE:
        return frames
    step = 1 << (frames.bit_length() - BUCKETS_PER_OCTAVE.bit_length())
    return -(-frames // step) * step


def plan(windows: list[tuple[int, int]], batch_size: int, by_length: bool = True) -> list[tuple[int, int, list[int]]]:
    """Batches of window indices as (rate, padded length, indices).

    windows: (rate, samples) per window. At batch size 1 each window alone, in order; otherwise
    grouped by rate (each rate has its own SFI taps) and length bucket, groups in the order they
    first appear, `batch_size` windows at a time. by_length=False: a model whose kernel shapes never
    depend on a row's length (fixed-size crops) is grouped by rate alone, so its batches fill; a
    batch is then as long as its longest window."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (sr, n) in enumerate(windows):
        groups.setdefault((sr, bucket(n, batch_size) if by_length else 0), []).append(i)
    return [(sr, length or max(windows[i][1] for i in idx[j:j + batch_size]), idx[j:j + batch_size])
            for (sr, length), idx in groups.items() for j in range(0, len(idx), batch_size)]


def launch(model, waves: list[np.ndarray], sr: int, length: int, batch_size: int, precision: str = "fp32"):
    """Start one batch: waves (each (T,), T <= length) -> a handle for `collect`.

    The batch is always `batch_size` rows of `length` samples; rows past the real windows are
    silent dummies. On CUDA the host batch is pinned and copied without blocking, so this returns
    while the GPU works and the caller can read the next batch meanwhile."""
    rows = max(batch_size, len(waves))
    cuda = model.device.type == "cuda"
    host = torch.zeros((rows, length), dtype=torch.float32, pin_memory=cuda)  # (N, T)
    lengths = torch.full((rows,), length, dtype=torch.int64, pin_memory=cuda)  # dummies: full, silent
    buf = host.numpy()
    for i, x in enumerate(waves):
        buf[i, :x.shape[0]] = x
        lengths[i] = x.shape[0]
    wave, lens = host.to(model.device, non_blocking=True), lengths.to(model.device, non_blocking=True)
    with autocast(model.device, precision):
        frames, n = model.frame_scores(wave, lens, sr, fixed_shapes=batch_size > 1)  # (N, T) -> (N, F), (N,)
    return frames, n, len(waves)


def collect(handle) -> list[tuple[float, int]]:
    """(sum of frame scores, frames) per real window of a launched batch; waits for the device."""
    frames, n, k = handle
    frames, n = frames[:k].float().cpu(), n[:k].cpu()
    return [(float(frames[i, :c].double().sum()), c) for i, c in enumerate(n.tolist())]


def read_ahead(pool: Executor | None, tasks: Iterable[Callable], ahead: int) -> Iterator:
    """Each task's result in order; with a pool, up to `ahead` tasks run ahead of the consumer.

    Without one the tasks run in the caller's thread, one when its result is wanted."""
    if pool is None:
        yield from (t() for t in tasks)
        return
    it, queue = iter(tasks), deque()
    try:
        for t in it:
            queue.append(pool.submit(t))
            if len(queue) >= ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:  # stopped early (an error, Ctrl-C): drop what has not started
        for f in queue:
            f.cancel()
