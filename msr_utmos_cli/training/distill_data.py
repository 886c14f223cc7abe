"""Distillation data: clips and their cached teacher targets, each crop presented at one rate, endless batches.

Each batch is presented at one rate drawn from `data.rates`; the student hears the audio at
that rate and the teacher hears the same audio resampled to 16 kHz.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import audio
from .config import ConfigError
from .distill_config import DistillData
from .tables import TableError, read_records
from .teachers import SAMPLE_RATE


@dataclass(frozen=True)
class Clip:
    info: audio.AudioInfo
    bandwidth_hz: float  # real audio bandwidth (a file may be an upsampled narrower one)
    label: float | None = None  # the teacher's MOS of the whole clip, when read from model.teacher_labels
    feats: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (F, D) cached teacher frames
    at_rate: dict = field(default_factory=dict, compare=False, repr=False)  # rate -> (label, feats or None)


FRAME_S = 0.02  # teacher and student frame hop (50 frames per second)


def read_teacher_labels(path: str | os.PathLike) -> dict[str, float]:
    """path -> teacher MOS, with paths resolved against the CSV's folder."""
    path = Path(path)
    try:
        rows = read_records(path, ("path", "teacher_mos"))
    except TableError as e:
        raise ConfigError(f"model.teacher_labels: {e}") from None
    out = {}
    for line, r in rows:
        try:
            out[str((path.parent / r["path"]).resolve())] = float(r["teacher_mos"])
        except (TypeError, ValueError):
            raise ConfigError(f"model.teacher_labels: {path}: line {line}: needs a path and a numeric "
                              "teacher_mos") from None
    return out


def read_teacher_features(folder: str | os.PathLike, root: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(path -> (F, D) teacher frames, the teacher layer they are) from a folder of safetensors shards;
    keys are paths relative to `root` (the labels CSV's folder)."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise ConfigError(f"model.teacher_features: no .safetensors shards in {folder}")
    out, layers = {}, set()
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                layers.add(int((f.metadata() or {}).get("teacher_layer", -1)))
                for k in f.keys():
                    out[str((root / k).resolve())] = f.get_tensor(k)
        except (OSError, SafetensorError, ValueError) as e:
            raise ConfigError(f"model.teacher_features: {shard}: unreadable shard ({e})") from None
    if len(layers) != 1 or min(layers) < 0:
        raise ConfigError(f"model.teacher_features: {folder}: shards must all name one teacher_layer, got {sorted(layers)}")
    return out, layers.pop()


def _manifest_rows(path: Path, split: str | None) -> list[tuple[str, float | None]]:
    try:
        rows = read_records(path, ("path",))
    except TableError as e:
        raise ConfigError(f"data.manifest: {e}") from None
    out = []
    for line, r in rows:
        if split is not None and r.get("split") is not None and r["split"] != split:
            continue
        try:
            bw = float(r["bandwidth_hz"]) if r.get("bandwidth_hz") else None
        except ValueError:
            raise ConfigError(f"data.manifest: {path}: line {line}: bandwidth_hz {r['bandwidth_hz']!r} is not a "
                              "number") from None
        out.append((str((path.parent / r["path"]).resolve()), bw))
    return out


def collect(data: DistillData, split: str | None, labels: dict[str, float] | None = None,
            feats: dict[str, torch.Tensor] | None = None, at_rate: dict | None = None) -> list[Clip]:
    """All usable clips in a stable order (sorted paths); unreadable or too short files are skipped, and so
    are clips without a label (or cached features, or per-rate targets) when those are given.
    at_rate: {rate: (labels, feats or None)} as from read_teacher_labels / read_teacher_features."""
    at_rate = at_rate or {}
    items: list[tuple[str, float | None]] = []
    for d in data.dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"data.dirs: {d} is not a folder")
        items += [(str(p), None) for p in sorted(Path(d).rglob("*")) if p.suffix.lower() in audio.AUDIO_EXTENSIONS]
    for lst in data.lists:
        try:
            lines = Path(lst).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"data.lists: cannot read {lst} ({e.strerror})") from None
        items += [(str((Path(lst).parent / s.strip()).resolve()), None) for s in lines if s.strip()]
    if data.manifest:
        items += _manifest_rows(Path(data.manifest), split)
    clips = []
    for path, bw in sorted(set(items)):
        try:
            info = audio.probe(path)
        except audio.AudioError:
            continue
        if (labels is not None and path not in labels) or (feats is not None and path not in feats):
            continue
        if any(path not in lab or (fe is not None and path not in fe) for lab, fe in at_rate.values()):
            continue
        if info.duration >= data.min_s:
            clips.append(Clip(info, min(bw or info.sample_rate / 2, info.sample_rate / 2),
                              None if labels is None else labels[path], None if feats is None else feats[path],
                              {r: (lab[path], None if fe is None else fe[path]) for r, (lab, fe) in at_rate.items()}))
    return clips


def present(clip: Clip, start: int, stop: int, sr: int, full_when_fits: bool = False,
            reference_rate: int | None = None, self_taught: bool = False) -> tuple:
    """Samples [start, stop) at rate `sr` (band-limited resampling), at 16 kHz for the teacher (empty when
    the teacher's labels are cached), the bandwidth they really have (upsampling never adds content above
    the native Nyquist), the cached label (NaN when none) and the cached teacher frames from `start` on
    ((0, 0) when none; `start` should then fall on a frame, see `frame_start`).
    full_when_fits: when the clip's bandwidth fits below sr / 2, the teacher's view is the native audio's
    (see DistillModel.full_targets_when_band_fits).
    reference_rate: also the presented audio resampled to that rate (the input of the student's own
    targets, see DistillModel.consistency_rates and consistency_weight; empty when None).
    self_taught: the teacher is not asked (a consistency rate), so no audio for it."""
    x = torch.from_numpy(audio.read_segment(clip.info, start, stop).copy())
    y = audio.resample(x, clip.info.sample_rate, sr)
    fits = full_when_fits and clip.bandwidth_hz <= sr / 2
    yref = audio.resample(y, sr, reference_rate) if reference_rate else y.new_zeros(0)
    if self_taught or clip.label is not None:
        y16 = y.new_zeros(0)
    else:
        y16 = audio.resample(x, clip.info.sample_rate, SAMPLE_RATE) if fits else audio.resample(y, sr, SAMPLE_RATE)
    label, feats = (clip.label, clip.feats) if fits else clip.at_rate.get(sr, (clip.label, clip.feats))
    if feats is None:
        f = torch.zeros(0, 0)
    else:
        k = int(round(start / (FRAME_S * clip.info.sample_rate)))
        f = feats[k: k + int(math.ceil((stop - start) / (FRAME_S * clip.info.sample_rate))) + 1].float()
    return y, y16, min(clip.bandwidth_hz, sr / 2), math.nan if label is None else label, f, yref


def frame_start(clip: Clip, off: int) -> int:
    """A crop offset moved onto the nearest teacher frame when the teacher's frames are cached."""
    if clip.feats is None:
        return off
    hop = FRAME_S * clip.info.sample_rate
    return min(int(round(round(off / hop) * hop)), clip.info.frames - 1)


def _pad(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([w.shape[0] for w in waves])
    out = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        out[i, : w.shape[0]] = w
    return out, lengths


def collate(items: list[tuple], sr: int) -> dict:
    wave, lengths = _pad([i[0] for i in items])
    wave16, lengths16 = _pad([i[1] for i in items])
    wave_ref, lengths_ref = _pad([i[5] for i in items])
    feats = torch.nn.utils.rnn.pad_sequence([i[4] for i in items], batch_first=True)  # (B, F, D)
    return {"wave": wave, "lengths": lengths, "sr": sr, "wave16": wave16, "lengths16": lengths16,
            "wave_ref": wave_ref, "lengths_ref": lengths_ref,
            "bandwidth_hz": torch.tensor([i[2] for i in items]), "teacher_mos": torch.tensor([i[3] for i in items]),
            "teacher_feats": feats, "teacher_frames": torch.tensor([i[4].shape[0] for i in items])}


def batch_stream(clips: list[Clip], rates: list[int], crop_s: float, batch_size: int, rank: int, world: int,
                 seed: int, start: int, workers: int = 0, full_when_fits: bool = False,
                 consistency: tuple = ((), 0, False)):
    """Endless batches; global batch g holds items g*B*world + [0, B*world), this rank takes its slice.

    Everything (rate, file order per epoch, crop) is a pure function of (seed, position), so the
    stream restarts exactly at `start`, a 2-rank run sees the same items as one rank with 2B, and
    `workers` threads can build batches ahead (file reads and resampling release the GIL) without
    changing a single sample: a GPU is otherwise left waiting on one CPU core.
    """
    n, B = len(clips), batch_size

    def batch_at(g: int) -> dict:
        sr = int(rates[np.random.default_rng([seed, 1, g]).integers(len(rates))])
        items = []
        for k in range(B):
            i = g * B * world + rank * B + k
            epoch = i // n
            clip = clips[int(np.random.default_rng([seed, 2, epoch]).permutation(n)[i % n])]
            crop = int(round(crop_s * clip.info.sample_rate))
            off = frame_start(clip, int(np.random.default_rng([seed, 3, i]).integers(max(clip.info.frames - crop, 0) + 1)))
            items.append(present(clip, off, min(off + crop, clip.info.frames), sr, full_when_fits,
                                 *reference(sr, *consistency)))
        return collate(items, sr)

    if workers <= 0:
        g = start
        while True:
            yield batch_at(g)
            g += 1
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers, thread_name_prefix="utmos-data") as pool:
        ahead = deque(pool.submit(batch_at, g) for g in range(start, start + 2 * workers))
        g = start + 2 * workers
        while True:
            out = ahead.popleft().result()
            ahead.append(pool.submit(batch_at, g))
            g += 1
            yield out


def reference(sr: int, self_taught: list[int], ref_rate: int, paired: bool) -> tuple[int | None, bool]:
    """present()'s (reference_rate, self_taught) for a batch at `sr`."""
    taught = sr in self_taught
    paired = paired and sr != ref_rate
    return (ref_rate if taught or paired else None), taught

