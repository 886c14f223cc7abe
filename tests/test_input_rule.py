"""The level and edge-silence rule: a file's score must not depend on its gain or its padding."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from msr_utmos_cli import load_model
from msr_utmos_cli.audio import input_span
from msr_utmos_cli.cli import app
from msr_utmos_cli.testing import speechlike

SR = 16000


def padded(x: np.ndarray, seconds: float, floor: float = 0.0) -> np.ndarray:
    pad = (np.random.default_rng(1).standard_normal(int(seconds * SR)) * floor).astype(np.float32)
    return np.concatenate([pad, x, pad])


def span(x, rms_db=-26.0, trim_db=-40.0, need=0):
    return input_span(lambda a, b: x[a:b], x.shape[0], SR, rms_db, trim_db, need=need)


def test_span_cuts_edge_silence_and_keeps_the_margin():
    x = speechlike(SR, 1.0)
    s = span(padded(x, 2.0))
    margin = int(0.1 * SR)
    assert abs(s.start - (2 * SR - margin)) < 20 and abs(s.stop - (3 * SR + margin)) < 20


def test_span_is_the_same_at_any_gain():
    x = padded(speechlike(SR, 1.0), 0.5, floor=1e-4)
    ref = span(x)
    for g in (0.5, 0.03, 0.001):
        s = span((x * g).astype(np.float32))
        assert (s.start, s.stop) == (ref.start, ref.stop)
        assert s.gain * g == pytest.approx(ref.gain, rel=1e-4)


def test_gain_meets_the_rms_target_and_the_peak_cap():
    x = speechlike(SR, 1.0)
    s = span(x, trim_db=None)
    assert 20 * np.log10(np.sqrt(np.mean((x * s.gain) ** 2))) == pytest.approx(-26.0, abs=0.01)
    loud = span(x, rms_db=-3.0, trim_db=None)  # would clip: held to a 0.99 peak
    assert np.abs(x).max() * loud.gain == pytest.approx(0.99, rel=1e-6)


def test_short_active_part_is_widened_to_what_the_model_needs():
    x = np.zeros(SR, np.float32)
    x[8000:8010] = 0.5
    s = span(x, need=5000)
    assert s.stop - s.start == 5000 and s.start <= 8000 and s.stop >= 8010


@pytest.fixture
def ruled(tiny_model_dir, tmp_path):
    """The tiny model with the rule switched on in its config.json."""
    folder = tmp_path / "ruled"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["config"].update(input_rms_db=-26.0, input_trim_db=-40.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_api_score_ignores_gain_and_padding_with_the_rule_and_not_without(tiny_model_dir, ruled):
    x = speechlike(SR, 1.5, seed=3)
    variants = [x, x * 0.03, padded(x, 1.0), padded(x, 3.0), padded(x, 1.0, floor=1e-4)]

    def scores(folder):
        m = load_model(folder, "cpu")
        return [float(m.score(torch.from_numpy(v.astype(np.float32)), SR)) for v in variants]

    s, plain = scores(ruled), scores(tiny_model_dir)
    assert abs(s[0] - s[1]) < 1e-5 < 1e-3 < abs(plain[0] - plain[1])  # gain: exact up to float rounding
    assert abs(s[2] - s[3]) < 1e-6 < 1e-4 < abs(plain[2] - plain[3])  # 1 s or 3 s of zeros: trimmed alike
    assert abs(s[2] - s[4]) < 1e-3  # digital zero or a -80 dBFS floor: trimmed alike


def test_cli_scores_a_quiet_copy_of_a_file_the_same(ruled, tmp_path):
    x = speechlike(24000, 2.0, seed=5)
    d = tmp_path / "wavs"
    d.mkdir()
    sf.write(d / "loud.wav", x, 24000, subtype="FLOAT")
    sf.write(d / "quiet.wav", x * 10 ** (-30 / 20), 24000, subtype="FLOAT")
    sf.write(d / "padded.wav", np.concatenate([np.zeros(24000), x, np.zeros(24000)]), 24000, subtype="FLOAT")
    out = tmp_path / "s.csv"
    res = CliRunner().invoke(app, ["score", str(d), "--model", str(ruled), "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    mos = pd.read_csv(out).set_index("path")["mos"]
    assert abs(mos[str(d / "loud.wav")] - mos[str(d / "quiet.wav")]) < 1e-3
    assert abs(mos[str(d / "loud.wav")] - mos[str(d / "padded.wav")]) < 0.05


def test_cli_calls_a_file_silent_before_scoring_it(ruled, tmp_path):
    f = tmp_path / "quiet.wav"
    sf.write(f, np.zeros(SR, np.float32), SR)
    out = tmp_path / "s.csv"
    CliRunner().invoke(app, ["score", str(f), "--model", str(ruled), "-o", str(out), "--quiet"])
    assert "all-silent" in pd.read_csv(out)["error"][0]
