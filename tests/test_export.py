"""`utmos export --onnx`: one rate per graph, SFI taps baked in; onnxruntime gives what PyTorch gives."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from typer.testing import CliRunner

from msr_utmos_cli import MOSModel, PRESETS, load_model, save_model
from msr_utmos_cli.cli import app
from msr_utmos_cli.scoring import min_samples

from conftest import speechlike


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny pre-LN model with dropouts on (scoring must switch them off) and random weights."""
    cfg = PRESETS["tiny"]()
    cfg.layer_norm_first, cfg.dropout, cfg.attention_dropout, cfg.head_dropout = True, 0.1, 0.1, 0.3
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export_model")
    save_model(MOSModel(cfg), folder, {"trained_on": "nothing (random weights for tests)"})
    return folder


@pytest.mark.parametrize("rate", [24000, 44100])  # 2 and 32 frame offsets from the sample grid
def test_onnx_graph_scores_as_pytorch_at_its_rate(model_dir, tmp_path, rate):
    out = tmp_path / f"m{rate}.onnx"
    r = CliRunner().invoke(app, ["export", str(model_dir), "--onnx", str(out), "--rate", str(rate)])
    assert r.exit_code == 0, r.output
    assert f"at {rate} Hz" in r.output and "max |ONNX - PyTorch|" in r.output
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    model = load_model(model_dir, "cpu")
    need = min_samples(model, rate)
    assert props["sample_rate"] == str(rate) and props["min_samples"] == str(need)

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, samples in ((1, need), (1, int(0.93 * rate) + 7), (3, int(2.2 * rate) + 1)):
        wave = np.stack([speechlike(rate, samples / rate, seed=s)[:samples] for s in range(batch)])
        mos, frames = session.run(["mos", "frame_scores"], {"wave": wave})
        with torch.no_grad():
            want_frames, n = model.frame_scores(torch.from_numpy(wave), None, rate)
        assert frames.shape == tuple(want_frames.shape) and frames.shape[1] == int(n[0])
        assert np.abs(frames - want_frames.numpy()).max() < 1e-4
        # The graph's MOS is `utmos score`'s for audio within one window.
        assert np.abs(mos - model.score(torch.from_numpy(wave), rate).numpy()).max() < 1e-4


def test_export_refuses_what_it_cannot_do_in_one_line(model_dir, tmp_path):
    cases = [(["--rate", "8001"], "3200 different offsets"), (["--rate", "4000"], "outside 8000-192000 Hz")]
    for extra, message in cases:
        r = CliRunner().invoke(app, ["export", str(model_dir), "--onnx", str(tmp_path / "x.onnx"), *extra])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nope"), "--onnx", str(tmp_path / "x.onnx"), "--rate", "16000"])
    assert r.exit_code == 2 and "nope" in r.output
