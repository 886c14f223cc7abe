"""Shared fixtures: tiny random models and synthetic audio made on the fly (nothing is downloaded)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from msr_utmos_cli import MOSModel, PRESETS, save_model

# One thread per test process: the suite's models are tiny, CI has 2 cores, and an oversubscribed
# OpenMP pool (a busy machine, or the 2-process DDP test) is many times slower than one thread.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model with random weights, saved as a model folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(MOSModel(PRESETS["tiny"]()), folder, {"trained_on": "nothing (random weights for tests)"})
    return folder


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


@pytest.fixture
def write_wav():
    def _write(path, sr: int, seconds: float, seed: int = 0, **kw):
        sf.write(str(path), speechlike(sr, seconds, seed), sr, **kw)
        return path
    return _write
