"""Scoring many files: walk inputs, window long files, score each window alone, aggregate per file.

Determinism: each window runs through the model alone, on CPU and GPU, so a file's score is a
function of the file (and the machine's kernels) only, bitwise: never of batch size, neighbours
or order. Batching padded windows was measured to move scores by 1-2 float32 ulps on CPU too
(oneDNN/MKL pick kernels by shape), which flipped the 5th decimal of a CSV score on a 16-core
machine, and bought 0-5% on 2 cores. A long file is cut into equal windows of at most
`window_s`; its score is the mean of all frame scores of all windows.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .audio import AUDIO_EXTENSIONS, SILENCE_PEAK, AudioError, probe, read_segment
from .model import MOSModel, clip_mos

DEFAULT_WINDOW_S = 20.0


@dataclass
class Row:
    path: str
    sample_rate: int | None = None
    duration_s: float | None = None
    mos: float | None = None
    error: str = ""


# --- inputs ------------------------------------------------------------------
def iter_inputs(inputs: Iterable[str], recursive: bool = True) -> Iterator[tuple[str, str]]:
    """Yield (path, error) in a deterministic order: each directory's entries sorted by name.

    `-` reads paths from stdin, `@list.txt` from a file, one per line. Directories are walked
    lazily (first rows come out before the walk ends) and symlink loops are visited once.
    """
    seen: set[str] = set()

    def walk(d: str) -> Iterator[tuple[str, str]]:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield d, f"cannot list directory ({e.strerror or e})"
            return
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if recursive:
                    yield from walk(e.path)
            elif os.path.splitext(e.name)[1].lower() in AUDIO_EXTENSIONS:
                yield e.path, ""

    def lines(src) -> Iterator[str]:
        for line in src:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line

    for item in inputs:
        if item == "-":
            paths: Iterable[str] = lines(sys.stdin)
        elif item.startswith("@") and not os.path.exists(item):
            try:
                with open(item[1:], encoding="utf-8") as f:
                    paths = list(lines(f))
            except OSError as e:
                yield item, f"cannot read path list ({e.strerror or e})"
                continue
        else:
            paths = [item]
        for p in paths:
            if os.path.isdir(p):
                yield from walk(p)
            elif not os.path.lexists(p):
                yield p, "no such file"
            else:
                yield p, ""


# --- the engine ------------------------------------------------------------
def min_samples(model: MOSModel, sr: int) -> int:
    """Fewest samples that give one frame at the head (25 ms for wav2vec2 geometry)."""
    frames = 1
    for _, k, s in reversed(model.cfg.conv_layers):
        frames = (frames - 1) * s + k
    c = model.cfg
    return math.ceil(((frames - 1) * c.sfi_stride + c.sfi_kernel) * sr / c.sfi_base_rate)


def windows(frames: int, sr: int, window_s: float) -> list[tuple[int, int]]:
    """Split [0, frames) into the fewest equal windows no longer than window_s."""
    n = max(1, math.ceil(frames / (window_s * sr)))
    edges = [round(i * frames / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


@dataclass
class _Item:
    key: int
    sr: int
    load: Callable[[], np.ndarray]


def _run_items(model: MOSModel, items: list[_Item],
               on_error: Callable[[int, str], None]) -> dict[int, list[float]]:
    """Score items one window at a time. Returns key -> [frame-score sum, frames, peak]."""
    acc: dict[int, list[float]] = {}
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                            allow_tf32=False):
        for it in items:
            try:
                x = it.load()
            except AudioError as e:
                on_error(it.key, str(e))
                continue
            if not np.isfinite(x).all():
                on_error(it.key, "audio contains NaN or Inf samples")
                continue
            a = acc.setdefault(it.key, [0.0, 0, 0.0])
            a[2] = max(a[2], float(np.abs(x).max()) if x.size else 0.0)
            wave = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(model.device)  # (1, T)
            frames, n = model.frame_scores(wave, torch.tensor([x.shape[0]], device=model.device), it.sr)
            a[0] += float(frames.double().sum())
            a[1] += int(n[0])
    return acc


def score_waveforms(model: MOSModel, waves: list, sr: int, window_s: float = DEFAULT_WINDOW_S) -> list[float]:
    """MOS (1-5) for in-memory waveforms (each (T,)) at rate sr; raises ValueError on unusable input."""
    need = min_samples(model, sr)
    items = []
    for key, w in enumerate(waves):
        w = np.asarray(w.detach().cpu() if torch.is_tensor(w) else w, dtype=np.float32).reshape(-1)
        if w.shape[0] < need:
            raise ValueError(f"input {key} is too short: {w.shape[0]} samples, need at least {need} at {sr} Hz")
        for a, b in windows(w.shape[0], sr, window_s):
            items.append(_Item(key, sr, lambda w=w, a=a, b=b: w[a:b]))

    def fail(key: int, msg: str) -> None:
        raise ValueError(f"input {key}: {msg}")

    acc = _run_items(model, items, fail)
    return [float(clip_mos(torch.tensor(acc[k][0] / acc[k][1]))) for k in range(len(waves))]


def score_files(model: MOSModel, paths: Iterable[tuple[str, str]], window_s: float = DEFAULT_WINDOW_S,
                channel: int | None = None, chunk_files: int = 64) -> Iterator[list[Row]]:
    """Score (path, error) pairs chunk by chunk; yields each chunk's rows in input order.

    Only one chunk's windows are planned at a time and samples are read window by window,
    so memory stays bounded for any number of files and any file length.
    """
    it = iter(paths)
    while chunk := list(islice(it, chunk_files)):
        rows: list[Row] = []
        items: list[_Item] = []
        for key, (path, err) in enumerate(chunk):
            row = Row(path, error=err)
            rows.append(row)
            if err:
                continue
            try:
                info = probe(path)
            except AudioError as e:
                row.error = str(e)
                continue
            row.sample_rate, row.duration_s = info.sample_rate, info.frames / info.sample_rate
            need = min_samples(model, info.sample_rate)
            if info.frames < need:
                row.error = f"too short ({row.duration_s * 1000:.1f} ms; needs at least {need} samples)"
                continue
            if channel is not None and channel >= info.channels:
                row.error = f"channel {channel} requested but the file has {info.channels} channel(s)"
                continue
            for a, b in windows(info.frames, info.sample_rate, window_s):
                items.append(_Item(key, info.sample_rate,
                                   lambda info=info, a=a, b=b: read_segment(info, a, b, channel)))

        def fail(key: int, msg: str) -> None:
            rows[key].error = rows[key].error or msg

        acc = _run_items(model, items, fail)
        for key, row in enumerate(rows):
            if row.error or key not in acc:
                continue
            total, count, peak = acc[key]
            if peak < SILENCE_PEAK:
                row.error = "all-silent audio (peak below -100 dBFS)"
            else:
                row.mos = float(clip_mos(torch.tensor(total / count)))
        yield rows
