"""What a run keeps in trainer.out_dir: checkpoint folders swapped in atomically, the trainer state
(plain tensors and containers, RNG included, so resume is exact), and the guard against replacing a run.

Checkpoint layout (`out_dir/last`, `out_dir/best`): a complete model folder written by
`task.export` plus `trainer_state.pt` and `run_config.yaml`.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from . import OutDirError, TrainingError
from .distributed import dist_env

STATE_FILE = "trainer_state.pt"
RUN_CONFIG = "run_config.yaml"
RUN_FILES = ("metrics.jsonl", "last", "best", ".last.old", ".best.old", ".last.tmp", ".best.tmp", "predictions.csv")


def check_out_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> list[Path]:
    """The earlier run's files that a fresh run would replace; refused (rank 0) unless `overwrite`."""
    if resume and overwrite:
        raise OutDirError("--resume and --overwrite exclude each other")
    found = [] if resume or dist_env()[0] else [Path(out_dir) / n for n in RUN_FILES if (Path(out_dir) / n).exists()]
    if found and not overwrite:
        raise OutDirError(f"{out_dir} already holds a run ({', '.join(p.name for p in found)}); continue it "
                          "with --resume, replace it with --overwrite, or set another trainer.out_dir")
    return found


def rng_state() -> dict:
    """RNG states as plain lists of ints (they travel through all_gather_object and weights_only loads)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [t.tolist() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def write_checkpoint(out_dir: Path, name: str, task, state: dict, run_config: dict, metadata: dict) -> Path:
    """Build the folder beside its final place, then swap it in with renames.

    At every moment either `name/` or `.name.old/` is a complete checkpoint, so a SIGKILL
    never leaves only a torn one (`find_checkpoint` falls back to `.name.old`).
    """
    final, tmp, old = out_dir / name, out_dir / f".{name}.tmp", out_dir / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    task.export(tmp, metadata)
    torch.save(state, tmp / STATE_FILE)
    (tmp / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: str | os.PathLike, name: str = "last") -> Path | None:
    """The newest complete checkpoint folder of that name, or None."""
    out_dir = Path(out_dir)
    for cand in (out_dir / name, out_dir / f".{name}.old"):
        if (cand / STATE_FILE).is_file():
            return cand
    return None


def load_trainer_state(folder: Path) -> dict:
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which and why, in one line
        raise TrainingError(f"{folder / STATE_FILE}: cannot resume ({type(e).__name__}: {e})") from None
