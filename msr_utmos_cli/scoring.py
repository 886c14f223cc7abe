"""Scoring many files: walk inputs, window long files, score the windows, aggregate per file.

Determinism: a file's score is a function of the file, the batch size and the machine's kernels
only, bitwise: never of its neighbours or the order of the run (batching.py says how). Batch size
1 runs each window alone and unpadded; larger batches agree with it to float noise (1e-5). A long
file is cut into equal windows of at most `window_s`; its score is the mean of all frame scores of
all windows, added up in window order.
"""
from __future__ import annotations

import math
import os
import re
import sys
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

from . import batching
from .audio import (NAN_ERROR, SILENCE_PEAK, SILENT_ERROR, AudioError, AudioInfo, Span, audio_extensions,
                    check_rate, input_span, probe, read_segment, to_float32, to_mono)
from .bandwidth import MAX_SECONDS, effective_bandwidth
from .rows import DEFAULT_WINDOW_S, Row

if TYPE_CHECKING:  # model.py imports this module for MOSModel.score
    from .model import MOSModel

MOS_MIN, MOS_MAX = 1.0, 5.0


def clip_mos(x: torch.Tensor) -> torch.Tensor:
    """Scores are reported on the 1-5 scale: values outside it are clipped, never rescaled."""
    return x.clamp(MOS_MIN, MOS_MAX)


# --- inputs ------------------------------------------------------------------
PIPE_ERROR = "piped commands in wav.scp are not supported (write the audio to a file and list that)"


def _lines(src) -> Iterator[str]:
    for line in src:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def read_scp(scp: str) -> Iterator[tuple[str, str, str]]:
    """(path, error, utt_id) per line of a Kaldi wav.scp (`utt_id path`); paths are as written (relative
    ones to the working directory, as Kaldi reads them). Commands (`cmd |`) and archive offsets get an error."""
    try:
        with open(scp, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        yield scp, f"cannot read wav.scp ({e.strerror or e})", ""
        return
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)  # the id, then the rest of the line (a path may hold spaces)
        utt, path = parts[0], parts[1].strip() if len(parts) > 1 else ""
        if not path:
            yield f"{scp}:{n}", f"wav.scp line {n}: no path after the utterance id", utt
        elif path.endswith("|"):
            yield path, PIPE_ERROR, utt
        elif os.path.lexists(path):
            yield path, "", utt
        elif re.search(r"\.ark:\d+$", path):
            yield path, "Kaldi archive entries (file.ark:offset) are not supported", utt
        else:
            yield path, "no such file", utt


def iter_inputs(inputs: Iterable[str], recursive: bool = True,
                skipped: Counter | None = None) -> Iterator[tuple[str, str, str]]:
    """Yield (path, error, utt_id) in a deterministic order: each directory's entries sorted by name.

    `-` reads paths from stdin, `@list.txt` from a file, one per line; a `.scp` file (or `scp:FILE`)
    is a Kaldi wav.scp, whose utterance ids come along (empty for every other input). Directories are
    walked lazily (first rows come out before the walk ends) and symlink loops are visited once.
    Files a walk passes over are counted by extension in `skipped`, so "nothing found" can say why.
    """
    seen: set[str] = set()
    extensions = audio_extensions()

    def walk(d: str) -> Iterator[tuple[str, str, str]]:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield d, f"cannot list directory ({e.strerror or e})", ""
            return
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if recursive:
                    yield from walk(e.path)
            elif os.path.splitext(e.name)[1].lower() in extensions:
                yield e.path, "", ""
            elif skipped is not None:
                skipped[os.path.splitext(e.name)[1].lower() or "(no extension)"] += 1

    for item in inputs:
        if item.startswith("scp:") or (item.lower().endswith(".scp") and os.path.isfile(item)):
            yield from read_scp(item[4:] if item.startswith("scp:") else item)
            continue
        if item == "-":
            paths: Iterable[str] = _lines(sys.stdin)
        elif item.startswith("@") and not os.path.exists(item):
            try:
                with open(item[1:], encoding="utf-8") as f:
                    paths = list(_lines(f))
            except OSError as e:
                yield item, f"cannot read path list ({e.strerror or e})", ""
                continue
        else:
            paths = [item]
        for p in paths:
            if os.path.isdir(p):
                yield from walk(p)
            elif not os.path.lexists(p):
                yield p, "no such file", ""
            else:
                yield p, "", ""


# --- the rules every input meets, file or array ------------------------------
def min_samples(model: MOSModel, sr: int) -> int:
    """Fewest samples that give one frame at the head (25 ms for wav2vec2 geometry)."""
    if hasattr(model, "min_samples"):
        return model.min_samples(sr)
    frames = 1
    for _, k, s in reversed(model.cfg.conv_layers):
        frames = (frames - 1) * s + k
    c = model.cfg
    return math.ceil(((frames - 1) * c.sfi_stride + c.sfi_kernel) * sr / c.sfi_base_rate)


def length_error(frames: int, sr: int, need: int) -> str:
    """'' when `frames` samples at `sr` are enough to score, else the row's error."""
    if frames <= 0:
        return "empty audio (0 samples)"
    if frames < need:
        return f"too short ({frames / sr * 1000:.1f} ms; needs at least {need} samples)"
    return ""


def windows(frames: int, sr: int, window_s: float) -> list[tuple[int, int]]:
    """Split [0, frames) into the fewest equal windows no longer than window_s."""
    n = max(1, math.ceil(frames / (window_s * sr)))
    edges = [round(i * frames / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _samples(wave) -> np.ndarray:
    """A tensor or array as float32 numpy samples (integer PCM scaled)."""
    if torch.is_tensor(wave):
        wave = wave.detach().cpu()
        wave = (wave.float() if wave.is_floating_point() else wave).numpy()
    return to_float32(wave)


def as_waveforms(wave, sr: int, need: int, channel: int | None = None,
                 channel_axis: int | None = None) -> list[np.ndarray]:
    """An array as mono float32 waveforms, by one explicit layout rule.

    (T,) is one waveform. 2-D input is a (B, T) batch, except when `channel_axis` says it is one
    multichannel recording ((C, T) with 0, (T, C) with 1 or -1), or when its second axis is too
    short to score and its first is not: that is (T, C), as soundfile.read returns, since no
    (B, T) batch that short could be scored. Channels are averaged, or `channel` is picked.
    """
    x = _samples(wave)
    if x.ndim == 1 and channel_axis is None:
        return [to_mono(x[:, None], channel)]
    if x.ndim != 2:
        raise AudioError(f"expected audio of shape (T,), (B, T), (T, C) or (C, T), not {tuple(x.shape)}")
    if channel_axis is None and x.shape[1] < need <= x.shape[0]:
        channel_axis = 1
    if channel_axis is None:
        return [to_mono(w[:, None], channel) for w in x]
    if channel_axis not in (0, 1, -1, -2):
        raise AudioError(f"channel_axis must be 0 ((C, T)) or 1 ((T, C)), not {channel_axis}")
    return [to_mono(x if channel_axis % 2 else x.T, channel)]


def span_for(model: MOSModel, read, frames: int, sr: int) -> Span:
    """The part of an input the model hears and its gain: the model's input rule, if it has one."""
    c = model.cfg
    if c.input_rms_db is None and c.input_trim_db is None:
        return Span(0, frames, 1.0, -1.0)  # peak unknown until the windows are read
    return input_span(read, frames, sr, c.input_rms_db, c.input_trim_db, getattr(c, "input_trim_margin_s", 0.1),
                      need=min_samples(model, sr))


def file_bandwidth(info: AudioInfo, channel: int | None = None) -> int | None:
    """Effective bandwidth (Hz) of what a file's row is scored on, from its first minute only; None when
    it cannot be measured (the row's own error, if any, says why)."""
    try:
        x = read_segment(info, 0, min(info.frames, int(MAX_SECONDS * info.sample_rate)), channel)
    except AudioError:
        return None
    bw = effective_bandwidth(x, info.sample_rate) if np.isfinite(x).all() else None
    return None if bw is None else round(bw)


def _gained(x: np.ndarray, gain: float) -> np.ndarray:
    return x if gain == 1.0 else x * np.float32(gain)


# --- the engine ------------------------------------------------------------
@dataclass
class _Item:
    key: int  # which input
    index: int  # which of its windows: frame sums are added in this order, whatever order batches ran in
    sr: int
    frames: int  # samples, known before they are read
    load: Callable[[], np.ndarray]
    share: float = 1.0  # this window's part of its input, for progress


def _load(it: _Item) -> tuple[np.ndarray | None, float, str]:
    """An item's samples and peak, or (None, 0, why they cannot be scored). Runs on reader threads."""
    try:
        x = it.load()
    except AudioError as e:
        return None, 0.0, str(e)
    if not np.isfinite(x).all():
        return None, 0.0, NAN_ERROR
    return x, float(np.abs(x).max()) if x.size else 0.0, ""


@dataclass
class Engine:
    """How windows reach the model: batch size (batching.plan), precision, and reader threads."""
    batch_size: int = 1
    precision: str = "fp32"
    pool: Executor | None = None  # reads windows ahead of the model; None reads in the scoring thread
    workers: int = 0  # the pool's threads


def _run_items(model: MOSModel, items: list[_Item], on_error: Callable[[int, str], None],
               tick: Callable[[float], None] | None = None, engine: Engine | None = None) -> dict[int, list[float]]:
    """Score items batch by batch. Returns key -> [frame-score sum, frames, peak] for inputs whose
    windows all scored; the first failing window of an input reports its error and drops it.

    One batch runs on the device while the next is read and assembled."""
    engine = engine or Engine()
    parts: dict[int, dict[int, tuple[float, int, float]]] = {}
    failed: set[int] = set()
    batches = batching.plan([(it.sr, it.frames) for it in items], engine.batch_size,
                            by_length=not getattr(model, "crops_fixed_shapes", False))
    order = [items[i] for _, _, idx in batches for i in idx]
    ahead = batching.READ_AHEAD * max(engine.batch_size, engine.workers)
    loads = batching.read_ahead(engine.pool, [lambda it=it: _load(it) for it in order], ahead)

    def done(batch: list[_Item], got: list[tuple[_Item, float]], handle) -> None:
        for (it, peak), (total, n) in zip(got, batching.collect(handle) if got else []):
            parts.setdefault(it.key, {})[it.index] = (total, n, peak)
        if tick is not None:
            for it in batch:
                tick(it.share)

    pending = None
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                            allow_tf32=False):
        for sr, length, idx in batches:
            got, waves = [], []
            for it in (items[i] for i in idx):
                x, peak, err = next(loads)
                if it.key in failed:  # the rest of a failed input's windows are skipped
                    continue
                if err:
                    failed.add(it.key)
                    on_error(it.key, err)
                    continue
                got.append((it, peak))
                waves.append(x)
            handle = batching.launch(model, waves, sr, length, engine.batch_size, engine.precision) if waves else None
            if pending is not None:
                done(*pending)
            pending = ([items[i] for i in idx], got, handle)
        if pending is not None:
            done(*pending)
    acc = {}
    for key, windows_ in parts.items():
        if key not in failed:
            got = [windows_[i] for i in sorted(windows_)]
            acc[key] = [sum(t for t, _, _ in got), sum(n for _, n, _ in got), max(p for _, _, p in got)]
    return acc


def _finish(a: list[float]) -> tuple[float | None, str]:
    """(mos, '') from an input's accumulated frame scores, or (None, error)."""
    total, count, peak = a
    if peak < SILENCE_PEAK:
        return None, SILENT_ERROR
    if not math.isfinite(total / count):  # finite samples so large (1e30) that the model overflows
        return None, f"no finite score (peak sample {peak:.3g}, far outside [-1, 1])"
    return float(clip_mos(torch.tensor(total / count))), ""


def score_waveforms(model: MOSModel, waves: list, sr: int, window_s: float = DEFAULT_WINDOW_S,
                    batch_size: int | str = "auto", precision: str = "fp32") -> list[float]:
    """MOS (1-5) for in-memory mono waveforms (each (T,)) at rate sr.

    Raises AudioError (a ValueError) with the row error `utmos score` would write, prefixed
    with `input i: ` when there are several."""
    sr = check_rate(sr)
    need = min_samples(model, sr)
    where = (lambda k: f"input {k}: ") if len(waves) > 1 else (lambda k: "")
    items = []
    for key, w in enumerate(waves):
        x = np.atleast_1d(np.squeeze(_samples(w)))
        if x.ndim != 1:
            raise AudioError(f"{where(key)}expected a mono waveform (T,), not shape {tuple(x.shape)}")
        if err := length_error(x.shape[0], sr, need):
            raise AudioError(where(key) + err)
        sp = span_for(model, lambda a, b, x=x: x[a:b], x.shape[0], sr)
        for i, (a, b) in enumerate(windows(sp.stop - sp.start, sr, window_s)):
            items.append(_Item(key, i, sr, b - a, lambda x=x, a=a + sp.start, b=b + sp.start, g=sp.gain:
                               _gained(x[a:b], g)))

    def fail(key: int, msg: str) -> None:
        raise AudioError(where(key) + msg)

    batching.check_precision(precision)
    acc = _run_items(model, items, fail, engine=Engine(batching.batch_size_for(batch_size, model.device), precision))
    out = []
    for k in range(len(waves)):
        mos, err = _finish(acc[k])
        if err:
            raise AudioError(where(k) + err)
        out.append(mos)
    return out


def score_files(model: MOSModel, paths: Iterable[str], window_s: float = DEFAULT_WINDOW_S,
                channel: int | None = None, **engine) -> Iterator[Row]:
    """One Row per path, in order: a MOS, or the one-line error `utmos score` writes for it.
    `engine`: batch_size, precision and workers, as for score_chunks."""
    pairs = ((p, "" if os.path.lexists(p) else "no such file") for p in map(os.fspath, paths))
    for rows in score_chunks(model, pairs, window_s=window_s, channel=channel, **engine):
        yield from rows


def _plan_file(model: MOSModel, path: str, err: str, channel: int | None) -> tuple[Row, AudioInfo | None, Span | None]:
    """A file's row (rate and duration, or its error) and the span the model hears. Runs on reader threads."""
    row = Row(path, error=err)
    if err:
        return row, None, None
    try:
        info = probe(path)
        row.sample_rate, row.duration_s = info.sample_rate, info.frames / info.sample_rate
        row.error = length_error(info.frames, info.sample_rate, min_samples(model, info.sample_rate))
        if not row.error and channel is not None:
            to_mono(np.zeros((0, info.channels), np.float32), channel)
        if not row.error:
            sp = span_for(model, _same_block_once(lambda a, b: read_segment(info, a, b, channel)),
                          info.frames, info.sample_rate)
            row.error = SILENT_ERROR if 0 <= sp.peak < SILENCE_PEAK else ""
    except AudioError as e:
        row.error = str(e)
    if row.error:
        return row, None, None
    row.bandwidth_hz = file_bandwidth(info, channel)
    return row, info, sp


def _same_block_once(read: Callable[[int, int], np.ndarray]) -> Callable[[int, int], np.ndarray]:
    """`read` that returns the last block again without decoding it again (the input rule reads each
    block up to three times: peak, first and last loud sample)."""
    last: list = [None, None]

    def cached(a: int, b: int) -> np.ndarray:
        if last[0] != (a, b):
            last[:] = [(a, b), read(a, b)]
        return last[1]
    return cached


def _planned(chunks: Iterator[list], plan: Callable, pool: Executor | None) -> Iterator[tuple[list, list]]:
    """(chunk, plans) per chunk; with reader threads the next chunk is planned while this one scores."""
    if pool is None:
        yield from ((c, [plan(*pe) for pe in c]) for c in chunks)
        return
    ahead = None
    for chunk in chunks:
        futures = [pool.submit(plan, *pe) for pe in chunk]
        if ahead is not None:
            yield ahead[0], [f.result() for f in ahead[1]]
        ahead = (chunk, futures)
    if ahead is not None:
        yield ahead[0], [f.result() for f in ahead[1]]


def score_chunks(model: MOSModel, paths: Iterable[tuple[str, str]], window_s: float = DEFAULT_WINDOW_S,
                 channel: int | None = None, chunk_files: int | None = None,
                 progress: Callable[[float], None] | None = None, batch_size: int | str = "auto",
                 precision: str = "fp32", workers: int | None = None) -> Iterator[list[Row]]:
    """Score (path, error) pairs chunk by chunk; yields each chunk's rows in input order.

    Only one chunk's windows are planned at a time (two with reader threads) and samples are read
    window by window, so memory stays bounded for any number of files and any file length.
    `progress(files)` is called as windows finish with the part of a file each covered.
    batch_size: windows per batch ('auto': batching.AUTO_BATCH); precision: fp32, bf16 or fp16;
    workers: threads reading files ahead of the model (None: batching.workers_for). A chunk holds
    64 files, or 256 per batch row when batching: a batch only holds windows of one rate and length
    bucket, so it takes that many for most batches to fill (rows are still only Row objects).
    """
    n = batching.batch_size_for(batch_size, model.device)
    batching.check_precision(precision)
    threads = batching.workers_for(workers, model.device)
    it = iter(paths)
    chunks = iter(lambda: list(islice(it, chunk_files or (64 if n == 1 else 256 * n))), [])
    planners = ThreadPoolExecutor(threads, "utmos-plan") if threads else None
    readers = ThreadPoolExecutor(threads, "utmos-read") if threads else None
    try:
        for chunk, plans in _planned(chunks, lambda p, e: _plan_file(model, p, e, channel), planners):
            rows = [row for row, _, _ in plans]
            items: list[_Item] = []
            for key, (row, info, sp) in enumerate(plans):
                if info is None:
                    if progress is not None:
                        progress(1.0)
                    continue
                span = sp.stop - sp.start
                for i, (a, b) in enumerate(windows(span, info.sample_rate, window_s)):
                    items.append(_Item(key, i, info.sample_rate, b - a, lambda info=info, a=a + sp.start,
                                       b=b + sp.start, g=sp.gain: _gained(read_segment(info, a, b, channel), g),
                                       (b - a) / span))

            def fail(key: int, msg: str) -> None:
                rows[key].error = rows[key].error or msg

            acc = _run_items(model, items, fail, progress, Engine(n, precision, readers, threads))
            for key, row in enumerate(rows):
                if not row.error and key in acc:
                    row.mos, row.error = _finish(acc[key])
                if row.error:
                    row.bandwidth_hz = None
            yield rows
    finally:
        for pool in (planners, readers):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
