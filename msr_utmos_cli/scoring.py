"""Scoring many files: walk inputs, window long files, batch by rate and length, aggregate per file.

Determinism: every item is padded with zeros and every padded sample/frame is masked
(normalisation statistics, attention, the BLSTM, the frame mean), so a file's score does not
depend on batch size, batch neighbours or order. A long file is cut into equal windows of at
most `window_s`; its score is the mean of all frame scores of all windows.
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
DEFAULT_BATCH_SECONDS = 40.0  # audio per batch: bounds memory whatever --batch-size says


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


# --- the batched engine ------------------------------------------------------
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
    length: int
    load: Callable[[], np.ndarray]


def _run_items(model: MOSModel, items: list[_Item], batch_size: int, batch_seconds: float,
               on_error: Callable[[int, str], None]) -> dict[int, list[float]]:
    """Score items grouped by rate and sorted by length. Returns key -> [frame-score sum, frames, peak]."""
    acc: dict[int, list[float]] = {}
    order = sorted(items, key=lambda it: (it.sr, -it.length, it.key))
    # CPU kernels compute each row the same whatever the batch shape; GPU libraries pick kernels by
    # shape, which moved scores by ~1e-5 with batch size on an H200. There each window runs alone,
    # so its shape, and its score, depend on the file only.
    if model.device.type != "cpu":
        batch_size = 1
    i = 0
    while i < len(order):
        sr, longest = order[i].sr, order[i].length
        cap = max(1, min(batch_size, int(batch_seconds * sr // max(longest, 1))))
        batch = [it for it in order[i:i + cap] if it.sr == sr]
        i += len(batch)
        waves, lengths, keys = [], [], []
        for it in batch:
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
            waves.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            lengths.append(x.shape[0])
            keys.append(it.key)
        if not waves:
            continue
        pad = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(model.device)
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                                allow_tf32=False):
            frames, n = model.frame_scores(pad, torch.tensor(lengths, device=model.device), sr)
            sums = frames.double().sum(1).cpu().tolist()
            counts = n.cpu().tolist()
        for k, s, c in zip(keys, sums, counts):
            acc[k][0] += s
            acc[k][1] += c
    return acc


def score_waveforms(model: MOSModel, waves: list, sr: int, window_s: float = DEFAULT_WINDOW_S,
                    batch_size: int = 8, batch_seconds: float = DEFAULT_BATCH_SECONDS) -> list[float]:
    """MOS (1-5) for in-memory waveforms (each (T,)) at rate sr; raises ValueError on unusable input."""
    need = min_samples(model, sr)
    items = []
    for key, w in enumerate(waves):
        w = np.asarray(w.detach().cpu() if torch.is_tensor(w) else w, dtype=np.float32).reshape(-1)
        if w.shape[0] < need:
            raise ValueError(f"input {key} is too short: {w.shape[0]} samples, need at least {need} at {sr} Hz")
        for a, b in windows(w.shape[0], sr, window_s):
            items.append(_Item(key, sr, b - a, lambda w=w, a=a, b=b: w[a:b]))

    def fail(key: int, msg: str) -> None:
        raise ValueError(f"input {key}: {msg}")

    acc = _run_items(model, items, batch_size, batch_seconds, fail)
    return [float(clip_mos(torch.tensor(acc[k][0] / acc[k][1]))) for k in range(len(waves))]


def score_files(model: MOSModel, paths: Iterable[tuple[str, str]], batch_size: int = 8,
                window_s: float = DEFAULT_WINDOW_S, channel: int | None = None, chunk_files: int = 64,
                batch_seconds: float = DEFAULT_BATCH_SECONDS) -> Iterator[list[Row]]:
    """Score (path, error) pairs chunk by chunk; yields each chunk's rows in input order.

    Only one chunk's windows are planned at a time and samples are read batch by batch,
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
                items.append(_Item(key, info.sample_rate, b - a,
                                   lambda info=info, a=a, b=b: read_segment(info, a, b, channel)))

        def fail(key: int, msg: str) -> None:
            rows[key].error = rows[key].error or msg

        acc = _run_items(model, items, batch_size, batch_seconds, fail)
        for key, row in enumerate(rows):
            if row.error or key not in acc:
                continue
            total, count, peak = acc[key]
            if peak < SILENCE_PEAK:
                row.error = "all-silent audio (peak below -100 dBFS)"
            else:
                row.mos = float(clip_mos(torch.tensor(total / count)))
        yield rows
