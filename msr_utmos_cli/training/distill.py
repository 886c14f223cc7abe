"""`utmos distill`: an SFI student learns a frozen 16 kHz teacher's features and MOS at every rate.

Each batch is presented at one rate drawn from `data.rates`; the student hears the audio at
that rate and the teacher hears the same audio resampled to 16 kHz, so the SFI layer learns
to give the teacher's features at every rate. Config in distill_config, data in distill_data,
the student in distill_student; here the task that `train.fit` runs, its losses and the entry point.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import audio
from ..checkpoint import ModelLoadError, load_model, save_model
from ..model import MOSModel
from .config import ConfigError
from .distill_config import SECTIONS, DistillData, DistillModel
from .distill_data import batch_stream, collate, collect, present, read_teacher_features, read_teacher_labels, reference
from .distill_student import Distiller, init_from_teacher, student_config
from .paper_config import load_run_config
from .teachers import SAMPLE_RATE, Teacher, Wav2Vec2Teacher, load_teacher
from .train import STATE_FILE, TrainConfig, TrainingError, check_out_dir, fit, load_trainer_state


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
