"""Synthetic audio and random-weight models for tests and benchmarks, so neither downloads anything."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def speechlike(sr: int, seconds: float, seed: int = 0, bandwidth: float | None = None) -> np.ndarray:
    """Harmonic tones with a syllable-rate envelope plus a little noise; float32 (T,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = rng.uniform(90, 220)
    top = min(bandwidth or sr / 2, sr / 2) * 0.95
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, int(top // f0)))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(3, 5) * t))
    x = x / (np.abs(x).max() + 1e-9) * 0.5
    return (x + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def write_long_wav(path: str | os.PathLike, sr: int = 8000, seconds: float = 2 * 3600, block_s: float = 60.0) -> None:
    """A long 16-bit WAV written one block at a time, so hours of audio never sit in memory at once."""
    import soundfile as sf

    block = speechlike(sr, block_s, seed=7)
    left = int(sr * seconds)
    with sf.SoundFile(str(path), "w", sr, 1, "PCM_16", format="WAV") as f:
        while left > 0:
            f.write(block[:left])
            left -= min(left, block.shape[0])


def random_model(folder: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """A model folder holding a preset (or "tiny-spec", the spectrogram architecture) with random weights:
    file handling and speed do not depend on training."""
    import torch

    from .checkpoint import save_model
    from .model import PRESETS, MOSModel
    from .spec_model import SpecMOSModel, tiny_spec

    torch.manual_seed(seed)
    model = SpecMOSModel(tiny_spec()) if preset == "tiny-spec" else MOSModel(PRESETS[preset]())
    return save_model(model, folder, {"trained_on": "nothing (random weights)"})
