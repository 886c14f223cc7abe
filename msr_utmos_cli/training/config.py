"""Run configs: YAML files of dataclass sections, `--set key.path=value` overrides, errors that name the key."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A config that cannot be used; the message is one line naming the file and key path."""


def load_yaml(path: str | Path) -> dict:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return doc


def parse_override(item: str | tuple[str, Any]) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML: 3e-4, true, [8000, 16000]); a pair passes through."""
    if isinstance(item, tuple):
        return item
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_key(doc: dict, key: str, value: Any) -> None:
    """doc[a][b][c] = value for key `a.b.c`, creating sections on the way."""
    node = doc
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(doc: dict, overrides: list | None) -> dict:
    """Apply `key.path=value` strings (or (key, value) pairs) in order."""
    for item in overrides or []:
        set_key(doc, *parse_override(item))
    return doc


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(cls: type, doc: Any, where: str) -> Any:
    """A dataclass from a mapping; unknown keys and wrong types raise ConfigError naming `where.key`."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(doc).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in doc:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {where}.{close[0]}?)" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"unknown key {where}.{key}{hint}")
    kwargs = {}
    for name, f in known.items():
        path = f"{where}.{name}"
        if name not in doc:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key {path}")
            continue
        value, tp = doc[name], hints[name]
        if isinstance(value, str) and float in (tp, *typing.get_args(tp)):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, path)
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: list | None, sections: dict[str, type],
                base: dict | None = None, translate=None) -> tuple[dict[str, Any], dict]:
    """Read `path` (or start from `base`), apply overrides and build one dataclass per section.

    translate(doc, [(key, value)]) -> (doc, pairs) rewrites another config dialect into ours before
    anything is checked (see paper_config). Returns ({section: instance}, resolved plain dict) — the
    dict is what checkpoints save.
    """
    doc = load_yaml(path) if path is not None else {}
    pairs = [parse_override(item) for item in overrides or []]
    if translate is not None:
        doc, pairs = translate(doc, pairs)
    doc = apply_overrides({**(base or {}), **doc}, pairs)
    for key in doc:
        if key not in sections:
            raise ConfigError(f"unknown section {key} (known: {', '.join(sections)})")
    built = {name: build(cls, doc.get(name), name) for name, cls in sections.items()}
    resolved = {name: dataclasses.asdict(obj) for name, obj in built.items()}
    return built, resolved
