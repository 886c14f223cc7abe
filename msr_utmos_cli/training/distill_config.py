"""`utmos distill`'s run config: the `model:` and `data:` sections (the `trainer:` section is train.TrainConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..audio import MAX_RATE, MIN_RATE
from .config import ConfigError
from .train import TrainConfig

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


def check(m: DistillModel, data: DistillData) -> None:
    """What the section types cannot say: values in range and consistent with each other."""
    if m.mos_loss not in ("l1", "mse"):
        raise ConfigError(f"model.mos_loss must be l1 or mse, got {m.mos_loss!r}")
    for r in data.rates:
        if not MIN_RATE <= r <= MAX_RATE:
            raise ConfigError(f"data.rates: {r} outside {MIN_RATE}-{MAX_RATE} Hz")
    if not data.rates:
        raise ConfigError("data.rates: empty")
    for r in m.consistency_rates:
        if r not in data.rates or r == m.consistency_reference_rate:
            raise ConfigError(f"model.consistency_rates: {r} must be one of data.rates and differ from "
                              f"model.consistency_reference_rate ({m.consistency_reference_rate})")
    if m.consistency_weight < 0:
        raise ConfigError(f"model.consistency_weight must be >= 0, got {m.consistency_weight}")
    if (m.consistency_rates or m.consistency_weight) and not MIN_RATE <= m.consistency_reference_rate <= MAX_RATE:
        raise ConfigError(f"model.consistency_reference_rate: {m.consistency_reference_rate} outside "
                          f"{MIN_RATE}-{MAX_RATE} Hz")
