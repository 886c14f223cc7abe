"""The paper's LightningCLI configs and dotted flags, read as our run configs: one table per command.

The paper trains with `train.py fit --config distill_config.yaml` (sections `model:`/`data:` holding
`class_path` + `init_args`, and a Lightning `trainer:`) and `train_mos.py fit --model.ssl_model_path=...`.
Every key of theirs either names one of ours (its value converted) or has no meaning here; those are
accepted and named in one line. Our own keys pass through untouched, so one reader serves both.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, load_config, set_key

# A rule maps a value to (our key, our value), or to (None, why) for a key with no meaning here,
# or to (None, None) for a key that is only checked.
Rule = Callable[[Any], tuple[str | None, Any]]


def to(ours: str, convert: Callable[[Any], Any] | None = None) -> Rule:
    return lambda v: (ours, convert(v) if convert else v)


def ignore(why: str) -> Rule:
    return lambda v: (None, why)


def _list(v):
    return v if isinstance(v, list) else [v]


def _corpus(v):
    return [{"csv": str(p)} for p in _list(v)]


def _unbounded(v):  # Lightning's -1: no limit
    return None if v == -1 else v


def _accelerator(v):
    # "gpu" asks for the GPU when there is one; Lightning would stop without one, we run on the CPU.
    dev = {"gpu": "auto", "cuda": "cuda", "cpu": "cpu", "auto": "auto"}.get(str(v).lower())
    if dev is None:
        raise ConfigError(f"trainer.accelerator: {v!r} is not available here (cpu, gpu, cuda or auto)")
    return dev


def _precision(v):  # our own values (auto, fp32, bf16) pass through
    ours = {"32": "fp32", "32-true": "fp32", "bf16-mixed": "bf16"}.get(str(v), v)
    if ours not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"trainer.precision: {v!r} is not available here (auto, fp32 or 32, bf16 or bf16-mixed)")
    return ours


def _devices(v) -> tuple[None, None]:
    """One process per device, started by torchrun: the launch must already match."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    wanted = len(v) if isinstance(v, list) else v
    if wanted not in ("auto", -1, world):
        raise ConfigError(f"trainer.devices: {v} asks for {wanted} processes but this run has {world}; launch "
                          f"`torchrun --nproc_per_node {wanted} -m msr_utmos_cli ...` (one process per device)")
    return None, None


def _student(v) -> tuple[str | None, Any]:
    from ..model import PRESETS

    if v in PRESETS:
        return "model.student", v
    if Path(str(v)).expanduser().exists():
        return "model.init_from", str(v)
    return None, f"{v} is not a local model: the student is built from the teacher"


COMMON: dict[str, Rule] = {
    "model.class_path": ignore("names the paper's LightningModule"),
    "data.class_path": ignore("names the paper's DataModule"),
    "seed_everything": to("trainer.seed"),
    "trainer.accelerator": to("trainer.device", _accelerator),
    "trainer.devices": _devices,
    "trainer.max_epochs": to("trainer.max_epochs", _unbounded),
    "trainer.max_steps": to("trainer.max_steps", _unbounded),
    "trainer.precision": to("trainer.precision", _precision),
    "trainer.gradient_clip_val": to("trainer.grad_clip"),
    "trainer.accumulate_grad_batches": to("trainer.grad_accum"),
    "trainer.default_root_dir": to("trainer.out_dir"),
    "trainer.log_every_n_steps": to("trainer.log_every"),
    "trainer.logger": ignore("metrics go to trainer.out_dir/metrics.jsonl"),
    "trainer.callbacks": ignore("checkpoints and early stopping are trainer.ckpt_every and trainer.patience"),
    "trainer.enable_progress_bar": ignore("a bar is drawn when stderr is a terminal"),
}
TABLES: dict[str, dict[str, Rule]] = {
    "distill": {
        "model.teacher_model_path_or_name": to("model.teacher"),
        "model.student_model_path_or_name": _student,
        "model.config.lr": to("trainer.lr"),
        "model.config.weight_decay": to("trainer.weight_decay"),
        "model.config.sample_rates": to("data.rates"),
        "data.data_dir": to("data.dirs", _list),
        "data.batch_size": to("trainer.batch_size"),
    },
    "finetune": {
        "model.ssl_model_path": to("model.init"),
        "data.train_mos_data_path": to("data.train", _corpus),
        "data.valid_mos_data_path": to("data.valid", _corpus),
        "data.batch_size": to("trainer.batch_size"),
    },
}


def _plain(key: str) -> str:
    """LightningCLI's `--model.x` is short for `model.init_args.x`; rules use the short form."""
    section, _, rest = key.partition(".")
    return f"{section}.{rest[len('init_args.'):]}" if rest.startswith("init_args.") else key


class PaperDialect:
    """`translate` hook of config.load_config for one command; `ignored` lists what had no meaning here."""

    def __init__(self, command: str, sections: dict[str, type]):
        self.command = command
        self.rules = {**COMMON, **TABLES[command]}
        self.ours = {f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)}
        self.prefixes = {k.rsplit(".", i)[0] for k in self.rules for i in range(1, k.count(".") + 1)}
        self.ignored: list[str] = []
        self.paper = False  # a paper key was read: their defaults apply (trainer.out_dir)

    def _leaves(self, node: dict, path: str = ""):
        """(key as written, value) down to our keys; class_path/init_args wrappers are opened."""
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            opens = k == "init_args" and "." not in path  # model.init_args, data.init_args
            if (_plain(key) in self.prefixes or opens) and isinstance(v, dict):
                yield from self._leaves(v, key)
            else:
                yield key, v

    def _map(self, written: str, value: Any) -> tuple[str | None, Any]:
        plain = _plain(written)
        rule = self.rules.get(plain)
        parent = plain.rpartition(".")[0]
        if rule is None and parent in self.prefixes and "." in parent:  # inside a group of theirs (model.config)
            known = ", ".join(sorted(k for k in self.rules if k.startswith(parent + ".")))
            raise ConfigError(f"unknown key {written} (known here: {known})")
        if rule is None:
            return plain, value
        self.paper = self.paper or plain not in self.ours
        ours, v = rule(value)
        if ours is None and v is not None:
            self.ignored.append(f"{written} ({v})")
        return ours, v

    def __call__(self, doc: dict, pairs: list[tuple[str, Any]]) -> tuple[dict, list[tuple[str, Any]]]:
        out, origin = {}, {}
        for written, value in self._leaves(doc):
            ours, v = self._map(written, value)
            if ours is None:
                continue
            if ours in origin:
                raise ConfigError(f"{origin[ours]} and {written} both set {ours}; keep one")
            origin[ours] = written
            set_key(out, ours, v)
        mapped = []
        for key, value in pairs:
            ours, v = self._map(key, value)
            if ours is not None:
                mapped.append((ours, v))
        if self.paper and "trainer.out_dir" not in origin and all(k != "trainer.out_dir" for k, _ in mapped):
            set_key(out, "trainer.out_dir", f"runs/{self.command}")
        return out, mapped

    def note(self) -> str | None:
        """The one line that names the paper's keys without meaning here."""
        return f"paper config keys with no meaning here (ignored): {'; '.join(self.ignored)}" if self.ignored else None


def dotted_flags(args: list[str]) -> list[str]:
    """LightningCLI flags `--a.b=value` or `--a.b value` -> `a.b=value` overrides, as `--set` takes them."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or "." not in key:
            raise ConfigError(f"unknown option or argument {arg!r} (config keys: --set key.path=value or --key.path=value)")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: no value")
            value, i = args[i + 1], i + 1
        out.append(f"{key}={value}")
        i += 1
    return out


def load_run_config(command: str, path: str | os.PathLike | None, overrides: list | None,
                    sections: dict[str, type]) -> tuple[dict, dict, str | None]:
    """Our config or the paper's -> (built sections, resolved dict, the note on ignored keys or None)."""
    dialect = PaperDialect(command, sections)
    built, resolved = load_config(path, overrides, sections, translate=dialect)
    try:
        built["trainer"].validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return built, resolved, dialect.note()
