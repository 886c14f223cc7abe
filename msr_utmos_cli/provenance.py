"""What made a score file: model name, model version, weights hash and msr-utmos version.

JSON lines carry these fields in every row; a CSV keeps plain columns and gets them in a
sidecar `<file>.meta.json`. Torch-free, so `utmos report` can read them without importing it.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import __version__

FIELDS = ["model", "model_version", "model_sha256", "msr_utmos_version"]
META_SUFFIX = ".meta.json"


def of_model(model) -> dict:
    """The provenance of scores made now by `model` (a loaded model has an `identity`)."""
    ident = getattr(model, "identity", None) or {}
    return {**{k: ident.get(k) for k in FIELDS[:3]}, "msr_utmos_version": __version__}


def describe(prov: dict) -> str:
    """One line for people: name, version, the weights hash's first 12 hex digits."""
    sha = prov.get("model_sha256")
    return (f"{prov.get('model') or 'an unnamed model'} {prov.get('model_version') or '(no version)'}"
            f" (weights sha256 {sha[:12] if sha else 'unknown'})")


def read_meta(path) -> dict | None:
    """The provenance sidecar of a CSV score file, or None when it has none."""
    try:
        doc = json.loads(Path(str(path) + META_SUFFIX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: doc.get(k) for k in FIELDS} if isinstance(doc, dict) else None


def same_model(a: dict, b: dict) -> bool:
    """By weights hash when both have one, else by name and version."""
    if a.get("model_sha256") and b.get("model_sha256"):
        return a["model_sha256"] == b["model_sha256"]
    return (a.get("model"), a.get("model_version")) == (b.get("model"), b.get("model_version"))
