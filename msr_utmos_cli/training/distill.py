"""`utmos distill`: an SFI student learns a frozen 16 kHz teacher's features and MOS at every rate.

Each batch is presented at one rate drawn from `data.rates`; the student hears the audio at
that rate and the teacher hears the same audio resampled to 16 kHz, so the SFI layer learns
to give the teacher's features at every rate. The config is in distill_config, the
data in distill_data and teacher_cache, the student in distill_student; here are the task that
`train.fit` runs, its losses, and the entry point.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_model
from ..model import MOSModel
from .checkpoints import check_out_dir
from .config import ConfigError
from .distill_config import SECTIONS, DistillData, DistillModel, check
from .distill_data import Presenting, batch_stream, collate, collect, frame_start, present, with_input_rule
from .distill_student import Distiller, init_from_run, init_from_teacher, layer_pairs, student_config
from .paper_config import load_run_config
from .teacher_cache import read_cache
from .teachers import Teacher, Wav2Vec2Teacher, load_teacher
from .train import TrainConfig, fit


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
        check(m, data)
        self.m, self.data, self.trainer = m, data, trainer
        self.presenting = Presenting.of(m)
        cache = read_cache(m, data.rates)
        self.teacher = None if cache is not None else (
            teacher if teacher is not None else load_teacher(m.teacher, m.teacher_kind))
        self.clips = collect(data, data.split, cache)
        if not self.clips:
            raise ConfigError("data: no readable (and, with model.teacher_labels, labelled) audio found in "
                              "data.dirs / data.lists / data.manifest")
        self.valid_clips = collect(data, data.valid_split, cache)[: data.valid_items] if data.valid_split else []
        self._valid_batches: list[dict] | None = None
        torch.manual_seed(trainer.seed)  # the student's and the projections' initial weights
        student = MOSModel(student_config(m, self.teacher))
        rule = (student.cfg.input_rms_db, student.cfg.input_trim_db)
        self.clips = [c for c in (with_input_rule(c, *rule) for c in self.clips) if c is not None]
        self.valid_clips = [c for c in (with_input_rule(c, *rule) for c in self.valid_clips) if c is not None]
        if not self.clips:
            raise ConfigError("data: every training clip is silent")
        self.init_info = {"train_clips": len(self.clips)}
        if m.init_from_teacher and isinstance(self.teacher, Wav2Vec2Teacher):
            self.init_info.update(init_from_teacher(student, self.teacher, m.sfi_fit_steps))
        pairs, tdims = layer_pairs(m, student.cfg.num_layers, self.teacher, cache)
        self.use_mos = (self.teacher is None or self.teacher.has_mos) and m.mos_weight > 0
        self.model = Distiller(student, pairs, tdims)
        if m.init_from:
            self.init_info["init_from"] = init_from_run(self.model, m.init_from)

    def set_device(self, device: torch.device) -> None:
        if self.teacher is not None:
            self.teacher.to(device)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def batches(self, rank: int, world: int, seed: int, start: int):
        return batch_stream(self.clips, self.data.rates, self.data.crop_s, self.trainer.batch_size, rank, world,
                            seed, start, self.data.workers, self.presenting)

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
        sums, count = {}, 0
        for batch in self.validation_batches():
            b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
            for k, v in self.item_losses(b).items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
            count += len(batch["lengths"])
        return {f"valid_{k}": v / count for k, v in sorted(sums.items(), key=lambda kv: kv[0] != "loss")}

    def validation_batches(self) -> list[dict]:
        """The same batches every time, so they are read and resampled once."""
        if self._valid_batches is None:
            self._valid_batches = []
            B = self.trainer.batch_size
            for sr in self.data.rates:
                for i in range(0, len(self.valid_clips), B):
                    items = [self._valid_item(c, sr) for c in self.valid_clips[i:i + B]]
                    self._valid_batches.append(collate(items, sr))
        return self._valid_batches

    def _valid_item(self, clip, sr: int):
        """The first `crop_s` seconds of what scoring hears of the clip (its input-rule span, else all of it)."""
        a, b = clip.span or (0, clip.info.frames)
        a = frame_start(clip, a)
        return present(clip, a, min(b, a + int(round(self.data.crop_s * clip.info.sample_rate))), sr, self.presenting)

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
