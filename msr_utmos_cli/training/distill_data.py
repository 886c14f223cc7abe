"""Distillation data: the clips, each crop presented at one rate, endless deterministic batches.

Each batch is presented at one rate drawn from `data.rates`; the student hears the audio at
that rate and the teacher hears the same audio resampled to 16 kHz.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import audio
from .config import ConfigError
from .distill_config import DistillData, DistillModel
from .tables import TableError, read_records
from .teacher_cache import Target, TeacherCache
from .teachers import SAMPLE_RATE


@dataclass(frozen=True)
class Clip:
    info: audio.AudioInfo
    bandwidth_hz: float  # real audio bandwidth (a file may be an upsampled narrower one)
    cached: Target = Target()  # the teacher's cached outputs for the whole clip (model.teacher_labels/features)
    at_rate: dict[int, Target] = field(default_factory=dict, compare=False, repr=False)  # model.teacher_at_rate
    span: tuple[int, int] | None = None  # where crops are drawn: the samples scoring would hear; None = all
    gain: float = 1.0  # the level scoring would give the clip (the student's input rule)


def with_input_rule(clip: Clip, rms_db: float | None, trim_db: float | None) -> Clip | None:
    """The clip as the student will hear it when scoring: edge silence trimmed, level set by the rule;
    None for a silent clip, which scoring refuses.

    Training on the raw levels while scoring at the rule's level would teach the student inputs it
    never gets; the cached teacher frames stay aligned because crops keep their offsets in the file."""
    if rms_db is None and trim_db is None:
        return clip
    sp = audio.input_span(lambda a, b: audio.read_segment(clip.info, a, b), clip.info.frames,
                          clip.info.sample_rate, rms_db, trim_db)
    return None if sp.peak == 0 else replace(clip, span=(sp.start, sp.stop), gain=sp.gain)


FRAME_S = 0.02  # teacher and student frame hop (50 frames per second)


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


def collect(data: DistillData, split: str | None, cache: TeacherCache | None = None) -> list[Clip]:
    """All usable clips in a stable order (sorted paths); unreadable or too short files are skipped, and so
    are clips the teacher cache (when given) lacks."""
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
        if cache is not None and not cache.has(path):
            continue
        if info.duration >= data.min_s:
            clips.append(Clip(info, min(bw or info.sample_rate / 2, info.sample_rate / 2),
                              Target() if cache is None else cache.full.of(path),
                              {} if cache is None else {r: t.of(path) for r, t in cache.at_rate.items()}))
    return clips


@dataclass(frozen=True)
class Presenting:
    """How crops are presented, from the `model:` section: the targets a rate takes, the extra audio it needs."""
    full_when_fits: bool = False  # DistillModel.full_targets_when_band_fits
    self_taught_rates: tuple[int, ...] = ()  # DistillModel.consistency_rates
    reference_rate: int = 16000  # DistillModel.consistency_reference_rate
    paired: bool = False  # DistillModel.consistency_weight > 0

    @classmethod
    def of(cls, m: DistillModel) -> Presenting:
        return cls(m.full_targets_when_band_fits, tuple(m.consistency_rates), m.consistency_reference_rate,
                   m.consistency_weight > 0)

    def self_taught(self, sr: int) -> bool:
        """Batches at `sr` are taught by the student's own outputs, not the teacher's."""
        return sr in self.self_taught_rates

    def reference_at(self, sr: int) -> int | None:
        """The rate the student's own targets are computed at for a batch at `sr`; None when it needs none."""
        return self.reference_rate if self.self_taught(sr) or (self.paired and sr != self.reference_rate) else None


@dataclass
class Presented:
    """One crop as a batch item; `collate` pads a list of them into a batch."""
    wave: torch.Tensor  # (T,) at the presentation rate
    wave16: torch.Tensor  # (T16,) what the live teacher hears at 16 kHz; empty when it is not asked
    bandwidth_hz: float  # what the crop really carries at this rate
    teacher_mos: float  # the cached teacher MOS; NaN when none
    teacher_feats: torch.Tensor  # (F, D) cached teacher frames from the crop's start; (0, 0) when none
    wave_ref: torch.Tensor  # (T_ref,) at the reference rate, the student's own targets' input; empty when none


def present(clip: Clip, start: int, stop: int, sr: int, how: Presenting = Presenting()) -> Presented:
    """Samples [start, stop) of `clip` presented at rate `sr` (band-limited resampling).

    The teacher's view: at 16 kHz, from the presented audio, or from the native audio when
    `how.full_when_fits` and the clip's bandwidth fits below sr / 2; not made when the teacher's labels
    are cached or the rate is self-taught. The bandwidth is capped at sr / 2 (upsampling never adds
    content above the native Nyquist). Cached frames start at `start` (see `frame_start`).
    """
    x = torch.from_numpy(audio.read_segment(clip.info, start, stop).copy())
    if clip.gain != 1.0:
        x = x * clip.gain
    y = audio.resample(x, clip.info.sample_rate, sr)
    fits = how.full_when_fits and clip.bandwidth_hz <= sr / 2
    ref = how.reference_at(sr)
    yref = audio.resample(y, sr, ref) if ref else y.new_zeros(0)
    if how.self_taught(sr) or clip.cached.label is not None:
        y16 = y.new_zeros(0)
    else:
        y16 = audio.resample(x, clip.info.sample_rate, SAMPLE_RATE) if fits else audio.resample(y, sr, SAMPLE_RATE)
    target = clip.cached if fits else clip.at_rate.get(sr, clip.cached)
    if target.feats is None:
        f = torch.zeros(0, 0)
    else:
        k = int(round(start / (FRAME_S * clip.info.sample_rate)))
        f = target.feats[k: k + int(math.ceil((stop - start) / (FRAME_S * clip.info.sample_rate))) + 1].float()
    return Presented(y, y16, min(clip.bandwidth_hz, sr / 2), math.nan if target.label is None else target.label,
                     f, yref)


def frame_start(clip: Clip, off: int) -> int:
    """A crop offset moved onto the nearest teacher frame when the teacher's frames are cached."""
    if clip.cached.feats is None:
        return off
    hop = FRAME_S * clip.info.sample_rate
    return min(int(round(round(off / hop) * hop)), clip.info.frames - 1)


def _pad(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([w.shape[0] for w in waves])
    out = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        out[i, : w.shape[0]] = w
    return out, lengths


def collate(items: list[Presented], sr: int) -> dict:
    wave, lengths = _pad([i.wave for i in items])
    wave16, lengths16 = _pad([i.wave16 for i in items])
    wave_ref, lengths_ref = _pad([i.wave_ref for i in items])
    feats = torch.nn.utils.rnn.pad_sequence([i.teacher_feats for i in items], batch_first=True)  # (B, F, D)
    return {"wave": wave, "lengths": lengths, "sr": sr, "wave16": wave16, "lengths16": lengths16,
            "wave_ref": wave_ref, "lengths_ref": lengths_ref,
            "bandwidth_hz": torch.tensor([i.bandwidth_hz for i in items]),
            "teacher_mos": torch.tensor([i.teacher_mos for i in items]),
            "teacher_feats": feats, "teacher_frames": torch.tensor([i.teacher_feats.shape[0] for i in items])}


def batch_stream(clips: list[Clip], rates: list[int], crop_s: float, batch_size: int, rank: int, world: int,
                 seed: int, start: int, workers: int = 0, how: Presenting = Presenting()):
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
            a, b = clip.span or (0, clip.info.frames)
            off = frame_start(clip, a + int(np.random.default_rng([seed, 3, i]).integers(max(b - a - crop, 0) + 1)))
            items.append(present(clip, off, min(off + crop, b), sr, how))
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

