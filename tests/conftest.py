"""Shared fixtures: tiny random models and synthetic audio made on the fly (nothing is downloaded)."""
from __future__ import annotations

import os

import pytest
import soundfile as sf
import torch

from msr_utmos_cli.testing import random_model, speechlike

# One thread per test process: the suite's models are tiny, CI has 2 cores, and an oversubscribed
# OpenMP pool (a busy machine, or the 2-process DDP test) is many times slower than one thread.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model with random weights, saved as a model folder."""
    return random_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def write_wav():
    def _write(path, sr: int, seconds: float, seed: int = 0, **kw):
        sf.write(str(path), speechlike(sr, seconds, seed), sr, **kw)
        return path
    return _write
