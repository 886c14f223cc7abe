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
import re
import sys
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

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
    return input_span(read, frames, sr, c.input_rms_db, c.input_trim_db, need=min_samples(model, sr))


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
    key: int
    sr: int
    load: Callable[[], np.ndarray]
    share: float = 1.0  # this window's part of its input, for progress


def _load(it: _Item, on_error: Callable[[int, str], None]) -> np.ndarray | None:
    """An item's samples, or None after reporting why they cannot be scored."""
    try:
        x = it.load()
    except AudioError as e:
        on_error(it.key, str(e))
        return None
    if not np.isfinite(x).all():
        on_error(it.key, NAN_ERROR)
        return None
    return x


def _run_items(model: MOSModel, items: list[_Item], on_error: Callable[[int, str], None],
               tick: Callable[[float], None] | None = None) -> dict[int, list[float]]:
    """Score items one window at a time. Returns key -> [frame-score sum, frames, peak]."""
    acc: dict[int, list[float]] = {}
    failed: set[int] = set()
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                            allow_tf32=False):
        for it in items:
            x = None if it.key in failed else _load(it, on_error)
            if x is None:  # the rest of a failed input's windows are skipped
                failed.add(it.key)
                acc.pop(it.key, None)
            else:
                a = acc.setdefault(it.key, [0.0, 0, 0.0])
                a[2] = max(a[2], float(np.abs(x).max()) if x.size else 0.0)
                wave = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(model.device)  # (1, T)
                frames, n = model.frame_scores(wave, torch.tensor([x.shape[0]], device=model.device), it.sr)
                a[0] += float(frames.double().sum())
                a[1] += int(n[0])
            if tick is not None:
                tick(it.share)
    return acc


def _finish(a: list[float]) -> tuple[float | None, str]:
    """(mos, '') from an input's accumulated frame scores, or (None, error)."""
    total, count, peak = a
    if peak < SILENCE_PEAK:
        return None, SILENT_ERROR
    if not math.isfinite(total / count):  # finite samples so large (1e30) that the model overflows
        return None, f"no finite score (peak sample {peak:.3g}, far outside [-1, 1])"
    return float(clip_mos(torch.tensor(total / count))), ""


def score_waveforms(model: MOSModel, waves: list, sr: int, window_s: float = DEFAULT_WINDOW_S) -> list[float]:
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
        for a, b in windows(sp.stop - sp.start, sr, window_s):
            items.append(_Item(key, sr, lambda x=x, a=a + sp.start, b=b + sp.start, g=sp.gain: _gained(x[a:b], g)))

    def fail(key: int, msg: str) -> None:
        raise AudioError(where(key) + msg)

    acc = _run_items(model, items, fail)
    out = []
    for k in range(len(waves)):
        mos, err = _finish(acc[k])
        if err:
            raise AudioError(where(k) + err)
        out.append(mos)
    return out


def score_files(model: MOSModel, paths: Iterable[str], window_s: float = DEFAULT_WINDOW_S,
                channel: int | None = None) -> Iterator[Row]:
    """One Row per path, in order: a MOS, or the one-line error `utmos score` writes for it."""
    pairs = ((p, "" if os.path.lexists(p) else "no such file") for p in map(os.fspath, paths))
    for rows in score_chunks(model, pairs, window_s=window_s, channel=channel):
        yield from rows


def score_chunks(model: MOSModel, paths: Iterable[tuple[str, str]], window_s: float = DEFAULT_WINDOW_S,
                 channel: int | None = None, chunk_files: int = 64,
                 progress: Callable[[float], None] | None = None) -> Iterator[list[Row]]:
    """Score (path, error) pairs chunk by chunk; yields each chunk's rows in input order.

    Only one chunk's windows are planned at a time and samples are read window by window,
    so memory stays bounded for any number of files and any file length. `progress(files)`
    is called after every window with the part of a file it covered.
    """
    it = iter(paths)
    while chunk := list(islice(it, chunk_files)):
        rows: list[Row] = []
        items: list[_Item] = []
        for key, (path, err) in enumerate(chunk):
            row = Row(path, error=err)
            rows.append(row)
            if not err:
                try:
                    info = probe(path)
                    row.sample_rate, row.duration_s = info.sample_rate, info.frames / info.sample_rate
                    row.error = length_error(info.frames, info.sample_rate, min_samples(model, info.sample_rate))
                    if not row.error and channel is not None:
                        to_mono(np.zeros((0, info.channels), np.float32), channel)
                    if not row.error:
                        sp = span_for(model, lambda a, b, info=info: read_segment(info, a, b, channel),
                                      info.frames, info.sample_rate)
                        row.error = SILENT_ERROR if 0 <= sp.peak < SILENCE_PEAK else ""
                except AudioError as e:
                    row.error = str(e)
            if row.error:
                if progress is not None:
                    progress(1.0)
                continue
            row.bandwidth_hz = file_bandwidth(info, channel)
            span = sp.stop - sp.start
            for a, b in windows(span, info.sample_rate, window_s):
                items.append(_Item(key, info.sample_rate, lambda info=info, a=a + sp.start, b=b + sp.start, g=sp.gain:
                                   _gained(read_segment(info, a, b, channel), g), (b - a) / span))

        def fail(key: int, msg: str) -> None:
            rows[key].error = rows[key].error or msg

        acc = _run_items(model, items, fail, progress)
        for key, row in enumerate(rows):
            if not row.error and key in acc:
                row.mos, row.error = _finish(acc[key])
            if row.error:
                row.bandwidth_hz = None
        yield rows
