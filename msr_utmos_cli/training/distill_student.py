"""The distillation student: its config and first weights (from the teacher or an earlier run), the layers
paired with the teacher's, and the trained module (the student plus projections)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import ModelLoadError, load_model
from ..model import PRESETS, ModelConfig, MOSModel
from ..sfi import fit_to_kernel
from . import TrainingError
from .checkpoints import STATE_FILE, load_trainer_state
from .config import ConfigError
from .distill_config import DistillModel
from .teacher_cache import TeacherCache
from .teachers import SAMPLE_RATE, Teacher, Wav2Vec2Teacher


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



def default_pairs(teacher: Teacher, n_student: int, n_teacher: int) -> list[list[int]]:
    """wav2vec2: CNN output and every encoder layer, spread evenly when depths differ.
    DistillMOS: the student's last layer to the teacher's transformer output."""
    if teacher.has_mos:
        return [[n_student, n_teacher]]
    return [[0, 0]] + [[i, round(i * n_teacher / n_student)] for i in range(1, n_student + 1)]


def layer_pairs(m: DistillModel, n_student: int, teacher: Teacher | None,
                cache: TeacherCache | None) -> tuple[list[list[int]], list[int]]:
    """model.layers (or the default) as [[student layer, teacher layer], ...], and the teacher's width at each
    layer; 0 is the CNN output, i encoder layer i. Cached frames hold one teacher layer only."""
    if cache is not None and cache.full.feats is not None:  # other layers get width 0 and fail the check below
        layer = cache.full.layer
        tdims = [0] * layer + [next(iter(cache.full.feats.values())).shape[-1]]
        pairs = m.layers if m.layers is not None else [[n_student, layer]]
        for s, t in pairs:
            if t != layer:
                raise ConfigError(f"model.layers: pair [{s}, {t}]: model.teacher_features holds teacher layer "
                                  f"{layer} only")
    elif teacher is None:
        tdims, pairs = [], []
    else:
        probe = teacher(torch.zeros(1, SAMPLE_RATE))
        tdims = [x.shape[-1] for x in probe["layers"]]
        pairs = m.layers if m.layers is not None else default_pairs(teacher, n_student, len(tdims) - 1)
    for s, t in pairs:
        if not (0 <= s <= n_student and 0 <= t < len(tdims)):
            raise ConfigError(f"model.layers: pair [{s}, {t}] out of range (student 0-{n_student}, "
                              f"teacher 0-{len(tdims) - 1})")
    return [list(p) for p in pairs], tdims


def init_from_run(model: Distiller, source: str) -> str:
    """model.init_from: weights from a distillation checkpoint folder or a model; the shapes must match."""
    try:
        if (Path(source) / STATE_FILE).is_file():
            model.load_state_dict(load_trainer_state(Path(source))["model"])
            return f"{source} (student and projections)"
        other = load_model(source, "cpu")
        if not isinstance(other, MOSModel) or other.cfg != model.student.cfg:
            raise ConfigError(f"model.init_from: {source} is a different architecture from model.student")
        model.student.load_state_dict(other.state_dict())
        return f"{source} (student)"
    except ModelLoadError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    except (RuntimeError, TrainingError) as e:
        raise ConfigError(f"model.init_from: {source}: weights do not fit this student "
                          f"({str(e).splitlines()[0]})") from None
