"""The teacher's outputs computed once (scripts/label_with_teacher.py), read back as distillation targets.

On a CPU the teacher costs more than the student, so its MOS (a CSV) and per-frame features
(safetensors shards) can be computed once and read here instead of running it every step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError
from .distill_config import DistillModel
from .tables import TableError, read_records


@dataclass(frozen=True)
class Target:
    """One clip's cached teacher outputs: its MOS and its frames (None where not cached)."""
    label: float | None = None
    feats: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (F, D) at 50 frames/s


@dataclass
class CachedTargets:
    """Every clip's cached teacher outputs, keyed by resolved path."""
    labels: dict[str, float]  # the teacher's MOS of each whole clip
    feats: dict[str, torch.Tensor] | None = None  # its frames of teacher layer `layer`
    layer: int | None = None

    def has(self, path: str) -> bool:
        return path in self.labels and (self.feats is None or path in self.feats)

    def of(self, path: str) -> Target:
        return Target(self.labels[path], None if self.feats is None else self.feats[path])


@dataclass
class TeacherCache:
    """model.teacher_labels / teacher_features (the whole clip) and model.teacher_at_rate (per rate)."""
    full: CachedTargets
    at_rate: dict[int, CachedTargets] = field(default_factory=dict)

    def has(self, path: str) -> bool:
        return self.full.has(path) and all(t.has(path) for t in self.at_rate.values())


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


def read_cache(m: DistillModel, rates: list[int]) -> TeacherCache | None:
    """The cached targets the config names, or None when the live teacher is to run."""
    full = CachedTargets(read_teacher_labels(m.teacher_labels)) if m.teacher_labels else None
    if m.teacher_features:
        if full is None:
            raise ConfigError("model.teacher_features needs model.teacher_labels (the same clips' MOS)")
        full.feats, full.layer = read_teacher_features(m.teacher_features, Path(m.teacher_labels).parent)
    elif full is not None and m.layers:
        raise ConfigError("model.layers: feature distillation needs the live teacher or model.teacher_features; "
                          "with model.teacher_labels alone only the MOS is distilled (set layers: [])")
    at_rate = {}
    for rate, spec in (m.teacher_at_rate or {}).items():
        if full is None or not isinstance(spec, dict) or "labels" not in spec or not str(rate).isdigit() or \
                int(rate) not in rates:
            raise ConfigError(f"model.teacher_at_rate.{rate}: needs model.teacher_labels, a rate of data.rates "
                              "and {labels: CSV[, features: folder]}")
        if bool(spec.get("features")) != bool(full.feats is not None):
            raise ConfigError(f"model.teacher_at_rate.{rate}: give features exactly when model.teacher_features "
                              "is given")
        feats = read_teacher_features(spec["features"], Path(spec["labels"]).parent)[0] \
            if full.feats is not None else None
        at_rate[int(rate)] = CachedTargets(read_teacher_labels(spec["labels"]), feats, full.layer)
    return None if full is None else TeacherCache(full, at_rate)
