"""The bundled model's scores of examples/ are pinned: a refactor that moves them is a regression.

Regenerate tests/data/examples_scores.csv only when the bundled model or its input rule changes on
purpose (and bump the model's version): `utmos score examples/ -o - | cut -d, -f1,4`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from msr_utmos_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # float32 kernels differ by CPU; one machine repeats them to the last bit


def test_examples_score_as_pinned(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "s.csv"
    res = CliRunner().invoke(app, ["score", "examples/", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out).set_index("path")["mos"]
    want = pd.read_csv(ROOT / "tests/data/examples_scores.csv").set_index("path")["mos"]
    assert sorted(got.index) == sorted(want.index)
    worst = (got - want.reindex(got.index)).abs().max()
    assert worst <= TOLERANCE, f"examples/ scores moved by up to {worst:.2e}"
