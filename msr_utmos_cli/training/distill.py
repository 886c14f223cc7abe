"""Distillation of an SFI student from a frozen 16 kHz teacher: config, multi-rate data, loss, task.

Each batch is presented at one rate drawn from `data.rates`; the student hears the audio at
that rate and the teacher hears the same audio resampled to 16 kHz, so the SFI layer learns
to give the teacher's features at every rate.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import audio
from ..checkpoint import ModelLoadError, load_model, save_model
from .config import ConfigError
from .paper_config import load_run_config
from ..model import PRESETS, ModelConfig, MOSModel
from ..sfi import fit_to_kernel
from .tables import TableError, read_records
from .teachers import SAMPLE_RATE, Teacher, Wav2Vec2Teacher, load_teacher
from .train import STATE_FILE, TrainConfig, TrainingError, check_out_dir, fit, load_trainer_state

DEFAULT_RATES = [8000, 16000, 22050, 24000, 32000, 44100, 48000]


@dataclass
class DistillModel:
    """The `model:` section."""

    teacher: str = "facebook/wav2vec2-base"  # "distillmos", a local HF folder / torchaudio .pt file, torchaudio:BUNDLE, or a hub id
    teacher_kind: str = "auto"  # auto | wav2vec2 | distillmos
    student: str = "small"  # preset (tiny/small/base) for the head, dropouts and any part not taken from the teacher
    init_from_teacher: bool = True  # wav2vec2 teachers: copy the backbone's shape and weights, fit the SFI layer
    student_overrides: dict = field(default_factory=dict)  # ModelConfig fields applied last
    layers: list[list[int]] | None = None  # [[student, teacher], ...]; 0 = CNN output, i = encoder layer i
    feature_weight: float = 1.0  # weight of the per-layer L1 term
    cosine_weight: float = 1.0  # weight of the per-layer (1 - cosine) term
    mos_weight: float = 1.0  # weight of the MOS term (teachers with a score only)
    mos_loss: str = "l1"  # l1 | mse
    sfi_fit_steps: int = 300  # Adam refinement steps when fitting the SFI layer to the teacher's first conv
    # CSV (path,teacher_mos; paths relative to the CSV) from scripts/label_with_teacher.py: the teacher's MOS
    # of each whole clip at 16 kHz, computed once. Replaces running the teacher every step (on a CPU the
    # teacher costs more than the student); output distillation only, clips without a label are left out.
    teacher_labels: str | None = None
    # Folder of safetensors shards from `label_with_teacher.py --features`: the teacher's per-frame features
    # of each clip (keys: the labels CSV's paths), so feature distillation also runs without the teacher.
    # Needs teacher_labels; `layers` pairs name the cached teacher layer (DistillMOS: 1, its transformer output).
    teacher_features: str | None = None
    # {rate: {labels: CSV, features: folder}}: the teacher's outputs for the clips band-limited to rate/2
    # (`label_with_teacher.py --hear-at rate`), used for batches presented at that rate. Below 16 kHz the
    # student cannot hear what the teacher heard in the full clip; these targets say what is really there.
    teacher_at_rate: dict = field(default_factory=dict)
    # An item whose real bandwidth fits below the presentation rate's Nyquist loses nothing at that rate, so
    # it takes the targets of the whole clip (live teacher: the native audio at 16 kHz; cached: teacher_labels
    # and teacher_features) at every rate. DistillMOS scores a 3.5 kHz-band clip ~0.25 higher after 8 kHz than
    # at 16 kHz (rate ladder, 24 clips); without this the student learns that artefact of the teacher.
    full_targets_when_band_fits: bool = False
    # Rates whose batches are taught by the student itself instead of the teacher: its own outputs (features
    # at the paired layers and MOS, eval mode, no gradient) for the same audio resampled to
    # consistency_reference_rate. Same content, so the same answer at every rate: the teacher's view of a
    # clip heard at 8 kHz carries artefacts of its own (DistillMOS scores 8 kHz-band audio higher after an
    # 8 kHz round trip), which a student taught by it reproduces as an offset at 8 kHz.
    consistency_rates: list[int] = field(default_factory=list)
    consistency_reference_rate: int = 16000
    # Every other rate but the reference keeps the teacher's targets and adds, with this weight, the same loss
    # against the student's own reference-rate outputs for the same audio: the teacher's targets say what a
    # clip is worth, this term says it is worth the same at every rate (0: off).
    consistency_weight: float = 0.0
    # Start from another distillation run's weights (its checkpoint folder, e.g. runs/x/last: student and
    # projections) or from a model (folder or name: the student only), with a fresh optimizer and schedule.
    init_from: str | None = None


@dataclass
class DistillData:
    """The `data:` section: audio at any rates from folders, list files and/or a manifest CSV."""

    dirs: list[str] = field(default_factory=list)  # walked recursively for audio files
    lists: list[str] = field(default_factory=list)  # text files, one audio path per line
    manifest: str | None = None  # CSV with a `path` column (relative to the CSV), optional split, bandwidth_hz
    split: str | None = "train"  # manifest rows used for training (null: all rows)
    valid_split: str | None = None  # manifest rows used for validation (null: no validation)
    valid_items: int = 32  # validation files, each presented at every rate
    rates: list[int] = field(default_factory=lambda: list(DEFAULT_RATES))  # presentation rates, one per batch
    crop_s: float = 2.0  # random crop length; shorter files are padded and masked
    min_s: float = 0.3  # files shorter than this are skipped
    workers: int = 0  # threads that read and resample batches ahead (same batches; for GPUs, not 2-core CPUs)


SECTIONS = {"model": DistillModel, "data": DistillData, "trainer": TrainConfig}


# --- data -----------------------------------------------------------------------------------
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


# --- student --------------------------------------------------------------------------------
def student_config(m: DistillModel, teacher: Teacher) -> ModelConfig:
    if m.student not in PRESETS:
        raise ConfigError(f"model.student: unknown preset {m.student!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[m.student]().to_dict()
    if m.init_from_teacher and isinstance(teacher, Wav2Vec2Teacher):
        p = teacher.params
        (c0, k0, s0), *rest = p["extractor_conv_layer_config"]
        cfg.update(sfi_channels=c0, sfi_kernel=k0, sfi_stride=s0, sfi_components=max(cfg["sfi_components"],
                   math.ceil(k0 / 2)), conv_layers=[list(c) for c in rest], extractor_mode=p["extractor_mode"],
                   conv_bias=p["extractor_conv_bias"], embed_dim=p["encoder_embed_dim"],
                   pos_conv_kernel=p["encoder_pos_conv_kernel"], pos_conv_groups=p["encoder_pos_conv_groups"],
                   num_layers=p["encoder_num_layers"], num_heads=p["encoder_num_heads"],
                   ff_dim=p["encoder_ff_interm_features"], layer_norm_first=p["encoder_layer_norm_first"])
    try:
        return ModelConfig.from_dict({**cfg, **m.student_overrides})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.student_overrides: {e}") from None


def init_from_teacher(student: MOSModel, teacher: Wav2Vec2Teacher, fit_steps: int) -> dict:
    """Copy every teacher tensor whose shape matches; fit the SFI layer to the first conv."""
    mine = student.state_dict()
    copied = 0
    with torch.no_grad():
        for key, v in teacher.model.state_dict().items():
            if key.startswith("feature_extractor.conv_layers.0.layer_norm."):
                dst = "sfi_norm." + key.rsplit(".", 1)[1]
            elif key.startswith("feature_extractor.conv_layers."):
                i, rest = key[len("feature_extractor.conv_layers."):].split(".", 1)
                dst = f"convs.{int(i) - 1}.{rest}" if int(i) > 0 else None
            else:
                dst = key
            if dst in mine and mine[dst].shape == v.shape:
                mine[dst].copy_(v)
                copied += 1
    w0 = teacher.model.feature_extractor.conv_layers[0].conv.weight
    err = fit_to_kernel(student.sfi, w0, refine_steps=fit_steps) if w0.shape[0] == student.sfi.channels else None
    return {"copied_tensors": copied, "sfi_fit_rel_error": err}


class Distiller(nn.Module):
    """The trained module: the student plus a linear projection per layer pair where widths differ."""

    def __init__(self, student: MOSModel, pairs: list[list[int]], teacher_dims: list[int]):
        super().__init__()
        self.student, self.pairs = student, pairs
        sdims = [student.cfg.conv_layers[-1][0] if student.cfg.conv_layers else student.cfg.sfi_channels] + \
            [student.cfg.embed_dim] * student.cfg.num_layers
        self.proj = nn.ModuleList(nn.Identity() if sdims[s] == teacher_dims[t] else nn.Linear(sdims[s], teacher_dims[t])
                                  for s, t in pairs)

    def forward(self, wave, lengths, sr: int, want_mos: bool):
        """-> (projected student features per pair [(B, F, D_t)], frames (B,), MOS (B,) or None)."""
        s = self.student
        depth = max(p[0] for p in self.pairs) if self.pairs else 0
        if want_mos:
            depth = max(depth, s.readout_depth)
        x, n = s.conv_features(wave, lengths, sr)
        layers = [x, *(s.encoder.extract_features(x, n, depth) if depth else [])]  # 0: CNN output, i: layer i
        mos = s.readout(layers[1:], n)[1] if want_mos else None
        return [proj(layers[si]) for proj, (si, _) in zip(self.proj, self.pairs)], n, mos


def feature_loss(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item masked means of |s - t| and 1 - cos(s, t) over valid frames: (B, F, D) x2, (B, F) -> (B,), (B,)."""
    w = valid.to(s.dtype)
    count = w.sum(1).clamp(min=1)
    l1 = ((s - t).abs().mean(-1) * w).sum(1) / count
    cos = ((1 - nn.functional.cosine_similarity(s, t, dim=-1)) * w).sum(1) / count
    return l1, cos


class DistillTask:
    """The `Task` that `train.fit` runs for `utmos distill`."""

    def __init__(self, m: DistillModel, data: DistillData, trainer: TrainConfig, teacher: Teacher | None = None):
        if m.mos_loss not in ("l1", "mse"):
            raise ConfigError(f"model.mos_loss must be l1 or mse, got {m.mos_loss!r}")
        for r in data.rates:
            if not audio.MIN_RATE <= r <= audio.MAX_RATE:
                raise ConfigError(f"data.rates: {r} outside {audio.MIN_RATE}-{audio.MAX_RATE} Hz")
        if not data.rates:
            raise ConfigError("data.rates: empty")
        for r in m.consistency_rates:
            if r not in data.rates or r == m.consistency_reference_rate:
                raise ConfigError(f"model.consistency_rates: {r} must be one of data.rates and differ from "
                                  f"model.consistency_reference_rate ({m.consistency_reference_rate})")
        if m.consistency_weight < 0:
            raise ConfigError(f"model.consistency_weight must be >= 0, got {m.consistency_weight}")
        if (m.consistency_rates or m.consistency_weight) and \
                not audio.MIN_RATE <= m.consistency_reference_rate <= audio.MAX_RATE:
            raise ConfigError(f"model.consistency_reference_rate: {m.consistency_reference_rate} outside "
                              f"{audio.MIN_RATE}-{audio.MAX_RATE} Hz")
        self.m, self.data, self.trainer = m, data, trainer
        self.consistency = (m.consistency_rates, m.consistency_reference_rate, m.consistency_weight > 0)
        labels = read_teacher_labels(m.teacher_labels) if m.teacher_labels else None
        feats, cached_layer = None, None
        if m.teacher_features:
            if labels is None:
                raise ConfigError("model.teacher_features needs model.teacher_labels (the same clips' MOS)")
            feats, cached_layer = read_teacher_features(m.teacher_features, Path(m.teacher_labels).parent)
        elif labels is not None and m.layers:
            raise ConfigError("model.layers: feature distillation needs the live teacher or model.teacher_features; "
                              "with model.teacher_labels alone only the MOS is distilled (set layers: [])")
        at_rate = {}
        for rate, spec in (m.teacher_at_rate or {}).items():
            if labels is None or not isinstance(spec, dict) or "labels" not in spec or \
                    not str(rate).isdigit() or int(rate) not in data.rates:
                raise ConfigError(f"model.teacher_at_rate.{rate}: needs model.teacher_labels, a rate of data.rates "
                                  "and {labels: CSV[, features: folder]}")
            if bool(spec.get("features")) != bool(feats is not None):
                raise ConfigError(f"model.teacher_at_rate.{rate}: give features exactly when model.teacher_features "
                                  "is given")
            lab = read_teacher_labels(spec["labels"])
            fe = read_teacher_features(spec["features"], Path(spec["labels"]).parent)[0] if feats is not None else None
            at_rate[int(rate)] = (lab, fe)
        self.teacher = None if labels is not None else (
            teacher if teacher is not None else load_teacher(m.teacher, m.teacher_kind))
        self.clips = collect(data, data.split, labels, feats, at_rate)
        if not self.clips:
            raise ConfigError("data: no readable (and, with model.teacher_labels, labelled) audio found in "
                              "data.dirs / data.lists / data.manifest")
        self.valid_clips = collect(data, data.valid_split, labels, feats, at_rate)[: data.valid_items] \
            if data.valid_split else []
        self._valid_batches = None
        torch.manual_seed(trainer.seed)
        student = MOSModel(student_config(m, self.teacher))
        self.init_info = {"train_clips": len(self.clips)}
        if m.init_from_teacher and isinstance(self.teacher, Wav2Vec2Teacher):
            self.init_info.update(init_from_teacher(student, self.teacher, m.sfi_fit_steps))
        if feats is not None:  # only the cached layer exists; the others have width 0 and fail the check below
            tdims = [0] * cached_layer + [next(iter(feats.values())).shape[-1]]
            pairs = m.layers if m.layers is not None else [[student.cfg.num_layers, cached_layer]]
            for s, t in pairs:
                if t != cached_layer:
                    raise ConfigError(f"model.layers: pair [{s}, {t}]: model.teacher_features holds teacher layer "
                                      f"{cached_layer} only")
        elif self.teacher is None:
            tdims, pairs = [], []
        else:
            probe = self.teacher(torch.zeros(1, SAMPLE_RATE))
            tdims = [x.shape[-1] for x in probe["layers"]]
            pairs = m.layers if m.layers is not None else self.default_pairs(student.cfg.num_layers, len(tdims) - 1)
        for s, t in pairs:
            if not (0 <= s <= student.cfg.num_layers and 0 <= t < len(tdims)):
                raise ConfigError(f"model.layers: pair [{s}, {t}] out of range (student 0-{student.cfg.num_layers}, "
                                  f"teacher 0-{len(tdims) - 1})")
        self.use_mos = (self.teacher is None or self.teacher.has_mos) and m.mos_weight > 0
        self.model = Distiller(student, [list(p) for p in pairs], tdims)
        if m.init_from:
            self.init_info["init_from"] = self.load_init(m.init_from)

    def load_init(self, source: str) -> str:
        """model.init_from: weights from a distillation checkpoint folder or a model; the shapes must match."""
        try:
            if (Path(source) / STATE_FILE).is_file():
                self.model.load_state_dict(load_trainer_state(Path(source))["model"])
                return f"{source} (student and projections)"
            other = load_model(source, "cpu")
            if other.cfg != self.model.student.cfg:
                raise ConfigError(f"model.init_from: {source} is a different architecture from model.student")
            self.model.student.load_state_dict(other.state_dict())
            return f"{source} (student)"
        except ModelLoadError as e:
            raise ConfigError(f"model.init_from: {e}") from None
        except (RuntimeError, TrainingError) as e:
            raise ConfigError(f"model.init_from: {source}: weights do not fit this student "
                              f"({str(e).splitlines()[0]})") from None

    def default_pairs(self, n_student: int, n_teacher: int) -> list[list[int]]:
        """wav2vec2: CNN output and every encoder layer, spread evenly when depths differ.
        DistillMOS: the student's last layer to the teacher's transformer output."""
        if self.teacher.has_mos:
            return [[n_student, n_teacher]]
        return [[0, 0]] + [[i, round(i * n_teacher / n_student)] for i in range(1, n_student + 1)]

    def set_device(self, device: torch.device) -> None:
        if self.teacher is not None:
            self.teacher.to(device)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def batches(self, rank: int, world: int, seed: int, start: int):
        return batch_stream(self.clips, self.data.rates, self.data.crop_s, self.trainer.batch_size, rank, world,
                            seed, start, self.data.workers, self.m.full_targets_when_band_fits,
                            self.consistency)

    def steps_per_epoch(self, world: int) -> int:
        """Steps in one pass over the clips: each is seen once, as one random crop at one rate."""
        return math.ceil(len(self.clips) / (self.trainer.batch_size * world * self.trainer.grad_accum))

    def audio_seconds(self, batch: dict) -> float:
        return float(batch["lengths"].sum()) / batch["sr"]

    def item_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-item loss terms (B,) so that averages over ranks equal averages over the global batch."""
        own = self.own_targets(batch) if batch["wave_ref"].numel() else None
        if batch["sr"] in self.m.consistency_rates:
            t = own
        elif self.teacher is None:  # cached labels (and frames, at the index the pairs name)
            t = {"mos": batch["teacher_mos"], "lengths": batch["teacher_frames"],
                 "layers": [batch["teacher_feats"]] * (max((p[1] for p in self.model.pairs), default=-1) + 1)}
        else:  # in fp32 even under bf16 autocast: the targets are the teacher's, not a rounded copy of them
            with torch.autocast(batch["wave16"].device.type, enabled=False):
                t = self.teacher(batch["wave16"].float(), batch["lengths16"])
        feats, n, mos = self.model(batch["wave"], batch["lengths"], batch["sr"], self.use_mos)
        out = self.terms(feats, n, mos, t)
        pair = self.terms(feats, n, mos, own) if own is not None and t is not own else None
        if self.m.consistency_weight > 0:  # logged on every batch (0 where there is no pair) to keep means whole
            out["consistency"] = pair["loss"] if pair else torch.zeros_like(out["loss"])
            out["loss"] = out["loss"] + self.m.consistency_weight * out["consistency"]
        return out

    def terms(self, feats: list[torch.Tensor], n: torch.Tensor, mos: torch.Tensor | None, t: dict) -> dict:
        """The weighted feature and MOS losses of the student's outputs against targets `t`, per item (B,)."""
        zero = n.new_zeros(n.shape[0], dtype=torch.float32)
        l1_sum, cos_sum = zero, zero
        for f, (_, ti) in zip(feats, self.model.pairs):
            tf = t["layers"][ti].float()
            F = min(f.shape[1], tf.shape[1])
            valid = torch.arange(F, device=f.device)[None, :] < torch.minimum(n, t["lengths"])[:, None]
            l1, cos = feature_loss(f[:, :F].float(), tf[:, :F], valid)
            l1_sum, cos_sum = l1_sum + l1, cos_sum + cos
        k = max(len(feats), 1)
        out = {"feat_l1": l1_sum / k, "feat_cos": cos_sum / k}
        if self.use_mos:
            d = mos.float() - t["mos"].float()
            out["mos"] = d.abs() if self.m.mos_loss == "l1" else d ** 2
        total = self.m.feature_weight * out["feat_l1"] + self.m.cosine_weight * out["feat_cos"]
        out["loss"] = total + (self.m.mos_weight * out["mos"] if self.use_mos else 0)
        return out

    def own_targets(self, batch: dict) -> dict:
        """The student's outputs for the batch at the reference rate (batch["wave_ref"] holds it there)."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                feats, n, mos = self.model(batch["wave_ref"], batch["lengths_ref"], self.m.consistency_reference_rate,
                                           self.use_mos)
        finally:
            self.model.train(was)
        layers: list = [None] * (max((p[1] for p in self.model.pairs), default=-1) + 1)
        for f, (_, ti) in zip(feats, self.model.pairs):
            layers[ti] = f
        return {"mos": mos, "lengths": n, "layers": layers}

    def loss(self, batch: dict, step: int):
        parts = {k: v.mean() for k, v in self.item_losses(batch).items()}
        return parts.pop("loss"), {k: float(v.detach()) for k, v in parts.items()}

    def validate(self) -> dict[str, float] | None:
        """Mean loss over the validation clips (first `crop_s` seconds) presented at every rate."""
        if not self.valid_clips:
            return None
        dev = next(self.model.parameters()).device
        if self._valid_batches is None:  # the same batches every time: read and resample them once
            self._valid_batches = []
            for sr in self.data.rates:
                for i in range(0, len(self.valid_clips), self.trainer.batch_size):
                    chunk = self.valid_clips[i:i + self.trainer.batch_size]
                    self._valid_batches.append(collate([present(c, 0, min(c.info.frames, int(round(
                        self.data.crop_s * c.info.sample_rate))), sr, self.m.full_targets_when_band_fits,
                        *reference(sr, *self.consistency))
                        for c in chunk], sr))
        sums, count = {}, 0
        for batch in self._valid_batches:
            b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
            for k, v in self.item_losses(b).items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
            count += len(batch["lengths"])
        return {f"valid_{k}": v / count for k, v in sorted(sums.items(), key=lambda kv: kv[0] != "loss")}

    def export(self, folder: Path, metadata: dict) -> None:
        meta = {**metadata, "task": "distill", "teacher": self.m.teacher,
                "teacher_kind": self.teacher.name if self.teacher is not None else
                "cached labels" + (" and features" if self.m.teacher_features else ""),
                "layer_pairs": self.model.pairs, "rates": self.data.rates, **self.init_info}
        save_model(self.model.student, folder, meta)


def resolve(config: str | os.PathLike | None, overrides: list | None = None) -> tuple[dict, dict, str | None]:
    """Our run config or the paper's -> (built sections, resolved dict, note on the paper's ignored keys)."""
    return load_run_config("distill", config, overrides, SECTIONS)


def run(config: str | os.PathLike | None, overrides: list | None = None, resume: bool = False,
        teacher: Teacher | None = None, log=print, overwrite: bool = False) -> dict:
    """`utmos distill`: read the config, build the task and train. Returns fit's summary."""
    built, resolved, note = resolve(config, overrides)
    if note:
        log(note)
    check_out_dir(built["trainer"].out_dir, resume, overwrite)  # before the teacher and the data load
    task = DistillTask(built["model"], built["data"], built["trainer"], teacher)
    summary = fit(task, built["trainer"], resolved, resume=resume, overwrite=overwrite,
                  select_metric="valid_loss" if task.valid_clips else None, select_mode="min")
    return {**summary, **task.init_info}
