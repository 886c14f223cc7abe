"""The bundled models' scores of examples/ are pinned: a refactor that moves them is a regression.

Regenerate tests/data/examples_scores*.csv only when a bundled model or its input rule changes on
purpose (and bump the model's version): `utmos score examples/ [--model NAME] -o - | cut -d, -f1,4`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from msr_utmos_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # float32 kernels differ by CPU; one machine repeats them to the last bit


@pytest.mark.parametrize("model", [None, "msr-utmos-spec-fast"])
def test_examples_score_as_pinned(model, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "s.csv"
    res = CliRunner().invoke(app, ["score", "examples/", "-o", str(out), "--quiet", *(["--model", model] if model else [])])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out).set_index("path")["mos"]
    want = pd.read_csv(ROOT / f"tests/data/examples_scores{'_' + model if model else ''}.csv").set_index("path")["mos"]
    assert sorted(got.index) == sorted(want.index)
    worst = (got - want.reindex(got.index)).abs().max()
    assert worst <= TOLERANCE, f"examples/ scores moved by up to {worst:.2e}"


def test_the_fast_model_stays_near_the_default_on_the_examples():
    """spec-fast was trained to match the default: its pinned scores must stay close to the default's."""
    default = pd.read_csv(ROOT / "tests/data/examples_scores.csv").set_index("path")["mos"]
    fast = pd.read_csv(ROOT / "tests/data/examples_scores_msr-utmos-spec-fast.csv").set_index("path")["mos"]
    assert sorted(fast.index) == sorted(default.index) and len(fast) >= 7
    assert (fast - default.reindex(fast.index)).abs().max() <= 0.3
