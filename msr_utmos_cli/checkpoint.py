"""Model files: safetensors weights + a readable JSON config, a registry of released models, hub loading.

A model is a folder holding `model.safetensors` and `config.json`
({"format": "msr-utmos", "format_version": 1, "weights_sha256": "...", "config": {...}, "metadata": {...}}).
Nothing is unpickled when loading, so a checkpoint cannot run code, and weights whose SHA-256 is not
the one config.json records are refused, so a corrupt or swapped file never scores silently.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .model import ModelConfig, MOSModel
from .spec_model import ARCHITECTURE as SPEC_ARCHITECTURE, SpecModelConfig, SpecMOSModel

FORMAT = "msr-utmos"
FORMAT_VERSION = 2  # 2: configs may name an architecture (sfi-stft-transformer, since 0.3.0)
WEIGHTS, CONFIG = "model.safetensors", "config.json"
SHA256_KEY = "weights_sha256"
HUB_PREFIX = "hf:"


class ModelLoadError(Exception):
    """A model could not be found or read; the message names the file and the cause."""


def models_dir() -> Path:
    """Released models: packaged inside the wheel, or the repository's top-level `models/` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "models", here.parent / "models"):
        if cand.is_dir():
            return cand
    return here / "models"


def available_models() -> list[str]:
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file()) if root.is_dir() else []


def default_model_name() -> str | None:
    """The released model `utmos score` uses when none is given: named in models/DEFAULT."""
    marker = models_dir() / "DEFAULT"
    if marker.is_file():
        name = marker.read_text().strip()
        return name if name in available_models() else None
    return None


def default_device() -> torch.device:
    """The one device rule: CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name: str | torch.device | None) -> torch.device:
    """`auto`/None -> the default rule; anything else must name a device this machine has.
    Raises ValueError with one line (torch's own message lists ~20 device types)."""
    if name is None or str(name) == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(name)!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r} requested but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r} requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {str(name)!r} (use auto, cpu, cuda, cuda:N or mps)")
    return dev


def weights_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a weights file, read in chunks (a `base` model is 390 MB): checked on load and
    written beside every score. Cached per (file, size, mtime), so it is read once per process."""
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int, ino: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_identity(folder: Path, doc: dict) -> dict:
    """Name, version and weights hash of a model folder: the provenance written beside its scores."""
    meta = doc.get("metadata") or {}
    return {"model": str(meta.get("name") or folder.name), "model_version": meta.get("model_version"),
            "model_sha256": weights_sha256(folder / WEIGHTS)}


def default_model_identity() -> dict:
    """Identity of the bundled default model without loading it (for `utmos --version`)."""
    folder = resolve(None)
    return model_identity(folder, read_config(folder))


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place, so a crash
    leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a model folder is meant to be shared
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: MOSModel, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `model` as a model folder that `load_model` and `utmos score --model` accept."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, tmp))
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "msr_utmos_version": __version__,
           SHA256_KEY: weights_sha256(folder / WEIGHTS), "config": model.cfg.to_dict(), "metadata": metadata or {}}
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    return folder


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing (a model folder needs {CONFIG} and {WEIGHTS})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict):
        raise ModelLoadError(f"{path}: not an msr-utmos model config (expected \"format\": \"{FORMAT}\")")
    if not isinstance(doc.get("format_version", 0), int):
        raise ModelLoadError(f"{path}: format_version must be an integer, not {doc['format_version']!r}")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format version {doc['format_version']} is newer than this msr-utmos "
                             f"understands ({FORMAT_VERSION}); upgrade msr-utmos")
    digest = doc.get(SHA256_KEY)
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ModelLoadError(f"{path}: {SHA256_KEY} must be 64 lower-case hex digits, not {digest!r}")
    return doc


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A released model name, a model folder, its config/weights file, or `hf:owner/repo[@rev]`."""
    if name_or_path is None:
        name = default_model_name()
        if name is None:
            raise ModelLoadError("no default model is installed; pass a model folder with --model PATH "
                                 "(python: load_model(PATH))")
        return models_dir() / name
    s = str(name_or_path)
    if s.startswith(HUB_PREFIX):
        return download(s[len(HUB_PREFIX):])
    path = Path(s).expanduser()
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        return path.parent
    if path.is_dir():
        return path
    if s in available_models():
        return models_dir() / s
    known = ", ".join(available_models()) or "none installed"
    raise ModelLoadError(f"{s}: no such model folder or released model (released: {known}; "
                         f"hub models as {HUB_PREFIX}owner/repo)")


def download(repo: str) -> Path:
    """Fetch a model folder from the Hugging Face hub (needs the `hub` extra and a network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{HUB_PREFIX}{repo}: hub models need `pip install 'msr-utmos[hub]'`; "
                             "or download the folder yourself and pass its path") from None
    repo_id, _, revision = repo.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=[WEIGHTS, CONFIG, "*.md"]))
    except Exception as e:  # network, auth and missing-repo errors all end the same way for the user
        raise ModelLoadError(f"{HUB_PREFIX}{repo}: could not download ({type(e).__name__}: {e}); "
                             "offline, pass a local model folder instead") from None


def load_state(folder: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The weights, checked against `sha256` (folders written before 0.2.0 record none)."""
    path = folder / WEIGHTS
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a model folder needs {CONFIG} and {WEIGHTS})")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: corrupt or truncated weights ({e})") from None
    if sha256 is not None and (got := weights_sha256(path)) != sha256:
        raise ModelLoadError(f"{path}: SHA-256 {got[:12]}... is not the {sha256[:12]}... that {CONFIG} records "
                             "(the weights were changed or replaced)")
    return state


def build_model(config: dict) -> nn.Module:
    """A model with random weights from a saved config: the SFI spectrogram model when the config names
    its architecture, else the SFI-wav2vec2 model (configs written before 1.2.0 name none)."""
    config = dict(config)
    arch = config.get("architecture", "sfi-wav2vec2")
    if arch == SPEC_ARCHITECTURE:
        return SpecMOSModel(SpecModelConfig.from_dict(config))
    if arch != "sfi-wav2vec2":
        raise ValueError(f"unknown architecture {arch!r} (known: sfi-wav2vec2, {SPEC_ARCHITECTURE})")
    config.pop("architecture", None)
    return MOSModel(ModelConfig.from_dict(config))


def load_model(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> MOSModel:
    """Load a model in eval mode on `device` (default: CUDA when available)."""
    dev = parse_device(device)
    folder = resolve(name_or_path)
    doc = read_config(folder)
    try:
        model = build_model(doc["config"])
    except (TypeError, ValueError, RuntimeError) as e:  # wrong types, negative sizes: one line, not torch's essay
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{folder / CONFIG}: invalid model config ({cause})") from None
    state = load_state(folder, doc.get(SHA256_KEY))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise ModelLoadError(f"{folder / WEIGHTS}: weights do not match the architecture in {CONFIG} "
                             f"({detail[:300]})") from None
    model.metadata = doc.get("metadata", {})
    model.source = str(folder)
    model.identity = model_identity(folder, doc)
    return model.to(dev).eval()
