"""Model invariants: padding/batching never changes a score; checkpoints round-trip; the API is one call."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from msr_utmos_cli import ModelLoadError, MOSModel, PRESETS, load_model, save_model
from msr_utmos_cli.checkpoint import CONFIG, WEIGHTS
from msr_utmos_cli.scoring import score_waveforms
from msr_utmos_cli.testing import random_model, speechlike


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, "cpu")


@pytest.mark.parametrize("sr", [8000, 16000, 24000])
def test_scores_are_bitwise_independent_of_neighbours_and_order(sr):
    """A file's score is the same float alone, beside others of other lengths, or in another order.
    The bundled model: with it, batching padded windows on CPU moved 1 of these 7 scores by 1-2 ulps
    at each of these rates, enough to flip a CSV's last decimal."""
    m = load_model(None, "cpu")
    waves = [speechlike(sr, s, seed=i) for i, s in enumerate([0.4, 1.7, 0.9, 1.2, 0.6, 3.3, 2.2])]
    alone = [score_waveforms(m, [w], sr)[0] for w in waves]
    assert score_waveforms(m, waves, sr) == alone
    assert score_waveforms(m, waves[::-1], sr) == alone[::-1]
    assert np.std(alone) > 1e-3  # the scores really differ, so the comparison means something


def test_raw_forward_padding_invariance(model):
    """The unclipped head output (no clipping to hide differences) is padding-invariant too."""
    x = torch.from_numpy(speechlike(22050, 1.0, seed=3))
    with torch.no_grad():
        alone = model(x[None], torch.tensor([x.shape[0]]), 22050)
        padded = model(torch.nn.functional.pad(x, (0, 20000))[None], torch.tensor([x.shape[0]]), 22050)
    assert torch.allclose(alone, padded, atol=1e-5)


def test_sfi_norm_is_per_channel_over_valid_frames_and_bitwise_batch_invariant():
    """The norm after the SFI layer: mean 0 / var 1 per channel over each item's valid frames only,
    and an item's output is bitwise the same alone, padded, or beside other items."""
    from msr_utmos_cli.model import MaskedGroupNorm

    torch.manual_seed(0)
    norm = MaskedGroupNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(3, 6, 50) * 3 + 1
    lengths = torch.tensor([50, 31, 0])
    y = norm(x, lengths)
    valid = x[1, :, :31]
    ref = (valid - valid.mean(-1, keepdim=True)) / torch.sqrt(valid.var(-1, unbiased=False, keepdim=True) + norm.eps)
    torch.testing.assert_close(y[1, :, :31], ref * norm.weight[:, None] + norm.bias[:, None])
    assert torch.all(y[1, :, 31:] == 0) and torch.all(y[2] == 0)  # padding and empty items carry nothing
    assert torch.equal(norm(x[1:2, :, :31], torch.tensor([31]))[0], y[1, :, :31])
    assert torch.equal(norm(x[:1], lengths[:1])[0], y[0])


def test_score_api_shapes_and_range(model):
    one = model.score(speechlike(16000, 1.0), 16000)
    two = model.score(np.stack([speechlike(48000, 1.0, 1), speechlike(48000, 1.0, 2)]), 48000)
    assert one.shape == (1,) and two.shape == (2,)
    assert torch.all((two >= 1) & (two <= 5))
    with pytest.raises(ValueError, match="too short"):
        model.score(np.zeros(10, np.float32), 16000)


def test_long_input_is_windowed_with_bounded_windows(model, monkeypatch):
    """A 50 s input with 20 s windows is scored as 3 windows; the result stays close to one long pass."""
    seen = []
    forward = model.frame_scores

    def spy(wave, lengths, sr, *args, **kw):
        seen.append(int(lengths[0]))
        return forward(wave, lengths, sr, *args, **kw)

    monkeypatch.setattr(model, "frame_scores", spy)
    x = speechlike(16000, 50.0, seed=5)
    windowed = model.score(x, 16000, window_s=20.0).item()
    assert len(seen) == 3 and sum(seen) == x.shape[0] and max(seen) <= 20 * 16000, seen
    seen.clear()
    whole = model.score(x, 16000, window_s=60.0).item()
    assert seen == [x.shape[0]]
    assert abs(windowed - whole) < 0.05


def test_extract_features_masks_padding(model):
    """An item's valid frames at every layer are the same alone as beside a longer item, whatever its padding
    holds (loud noise here, so anything that leaks from it shows)."""
    x = torch.from_numpy(speechlike(24000, 1.0))
    short = torch.from_numpy(speechlike(24000, 0.5, seed=1))
    padded = torch.cat([short, torch.randn(x.shape[0] - short.shape[0])])  # (T,): valid half + noise
    with torch.no_grad():
        feats, n = model.extract_features(torch.stack([x, padded]), torch.tensor([x.shape[0], short.shape[0]]), 24000)
        alone, n_alone = model.extract_features(short[None], None, 24000)
    assert len(feats) == len(alone) == model.cfg.num_layers
    assert feats[0].shape[:2] == (2, n[0].item()) and n[1] == n_alone[0] < n[0]
    for batched, single in zip(feats, alone):
        torch.testing.assert_close(batched[1, :n[1]], single[0], atol=1e-5, rtol=1e-4)


def test_checkpoint_roundtrip_is_safetensors_and_json(tmp_path):
    torch.manual_seed(1)
    m = MOSModel(PRESETS["tiny"]()).eval()
    save_model(m, tmp_path / "m", {"trained_on": "test"})
    assert (tmp_path / "m" / WEIGHTS).read_bytes()[:8] != b"\x80\x02\x8a\nl\xfc\x9c\x46"  # not a pickle
    doc = json.loads((tmp_path / "m" / CONFIG).read_text())
    assert doc["format"] == "msr-utmos" and doc["metadata"]["trained_on"] == "test"
    loaded = load_model(tmp_path / "m", "cpu")
    assert not loaded.training
    x = speechlike(44100, 1.0)
    assert torch.equal(m.score(x, 44100), loaded.score(x, 44100))


def test_weights_are_checked_against_the_sha256_in_config(tmp_path):
    """config.json records the weights' SHA-256; a weights file changed by one value still parses and fits
    the architecture, and is refused in one line naming it, by the API and the CLI; the unchanged one loads."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from msr_utmos_cli.cli import app

    folder = random_model(tmp_path / "m")
    doc = json.loads((folder / CONFIG).read_text())
    assert doc["weights_sha256"] == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    x = speechlike(16000, 1.0)
    good = load_model(folder, "cpu").score(x, 16000)
    state = load_file(folder / WEIGHTS)
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1.0
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(ModelLoadError) as e:
        load_model(folder, "cpu")
    msg = str(e.value)
    assert str(folder / WEIGHTS) in msg and "SHA-256" in msg and "\n" not in msg
    sf.write(tmp_path / "a.wav", x, 16000)
    r = CliRunner().invoke(app, ["score", str(tmp_path / "a.wav"), "--model", str(folder)])
    assert r.exit_code == 2 and "Traceback" not in r.output and str(folder / WEIGHTS) in r.output
    del doc["weights_sha256"]  # a folder written before 0.2.0 records none: it loads unchecked
    (folder / CONFIG).write_text(json.dumps(doc))
    assert not torch.equal(load_model(folder, "cpu").score(x, 16000), good)


@pytest.mark.parametrize("name", ["msr-utmos-small-distillmos", "msr-utmos-spec-distillmos", "msr-utmos-spec-fast"])
def test_bundled_model_records_its_weights_sha256(name):
    from msr_utmos_cli.checkpoint import available_models, models_dir, weights_sha256

    assert name in available_models()
    folder = models_dir() / name
    doc = json.loads((folder / CONFIG).read_text())
    assert doc["weights_sha256"] == weights_sha256(folder / WEIGHTS)
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"version {doc['metadata']['model_version']}" in card  # the card and the config name one version
    assert doc["weights_sha256"] in card


def test_sfi_mute_flag_is_saved_and_old_configs_load_muted(tmp_path):
    """Models saved before sfi_mute_above_nyquist existed must keep scoring as they did (muted)."""
    torch.manual_seed(1)
    cfg = PRESETS["tiny"]()
    cfg.sfi_mute_above_nyquist = False
    m = MOSModel(cfg).eval()
    save_model(m, tmp_path / "unmuted", {})
    doc = json.loads((tmp_path / "unmuted" / CONFIG).read_text())
    assert doc["config"]["sfi_mute_above_nyquist"] is False
    assert load_model(tmp_path / "unmuted", "cpu").sfi.mute_above_nyquist is False
    del doc["config"]["sfi_mute_above_nyquist"]  # a config.json written by an older release
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / CONFIG).write_text(json.dumps(doc))
    (tmp_path / "old" / WEIGHTS).write_bytes((tmp_path / "unmuted" / WEIGHTS).read_bytes())
    old = load_model(tmp_path / "old", "cpu")
    assert old.sfi.mute_above_nyquist is True
    x16, x8 = speechlike(16000, 1.0), speechlike(8000, 1.0)
    assert torch.equal(m.score(x16, 16000), old.score(x16, 16000))
    assert not torch.equal(m.score(x8, 8000), old.score(x8, 8000))


def test_load_errors_are_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(tmp_path / "nope")
    bad = tmp_path / "wrong_arch"
    save_model(MOSModel(PRESETS["tiny"]()), bad)
    cfg = json.loads((bad / CONFIG).read_text())
    cfg["config"]["embed_dim"] = 48
    (bad / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not match") as e:
        load_model(bad)
    assert "\n" not in str(e.value)


def test_no_default_model_message(monkeypatch, tmp_path):
    import msr_utmos_cli.checkpoint as ck
    monkeypatch.setattr(ck, "models_dir", lambda: tmp_path)
    with pytest.raises(ModelLoadError, match="no default model is installed"):
        load_model(None)


def test_hub_models_load_through_snapshot_download(monkeypatch, tiny_model_dir):
    """hf:owner/repo[@rev] goes through huggingface_hub (faked here with a local folder; no network)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = load_model("hf:someone/tiny-utmos@v1", "cpu")
    assert calls == [("someone/tiny-utmos", "v1", ("model.safetensors", "config.json", "*.md"))]
    assert m.source == str(tiny_model_dir)

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="offline, pass a local model folder"):
        load_model("hf:someone/tiny-utmos")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_scores_match_cpu(tiny_model_dir):
    x = speechlike(24000, 2.0, seed=4)
    cpu = load_model(tiny_model_dir, "cpu").score(x, 24000)
    gpu = load_model(tiny_model_dir, "cuda").score(x, 24000)
    assert load_model(tiny_model_dir).device.type == "cuda"  # the default device is CUDA when available
    assert torch.allclose(cpu, gpu, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_scores_are_bitwise_independent_of_neighbours_and_order(tiny_model_dir):
    m = load_model(tiny_model_dir, "cuda")
    waves = [speechlike(16000, d, seed=i) for i, d in enumerate((0.7, 2.0, 1.3, 3.1, 0.9))]
    alone = [score_waveforms(m, [w], 16000)[0] for w in waves]
    assert score_waveforms(m, waves, 16000) == alone
    assert score_waveforms(m, waves[::-1], 16000) == alone[::-1]
