"""The SFI spectrogram architecture: its STFT is the 16 kHz one at 16 kHz and the same spectrum at any rate;
the model loads, scores from the CLI and keeps the scoring invariants."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from msr_utmos_cli import ModelLoadError, load_model
from msr_utmos_cli.audio import resample
from msr_utmos_cli.checkpoint import CONFIG
from msr_utmos_cli.cli import app
from msr_utmos_cli.scoring import score_waveforms
from msr_utmos_cli.spec_model import SpecModelConfig, SpecMOSModel, tiny_spec
from msr_utmos_cli.spec_stft import band_fill, frame_starts, sfi_stft
from msr_utmos_cli.testing import random_model, speechlike

RAW = SpecModelConfig(floor_db=None)  # the bare transform, no band-edge gate


def reference_16k(x: torch.Tensor) -> torch.Tensor:
    """DistillMOS's published input transform (torch.stft, reflect padding, |X|^0.3 with the phase)."""
    x = torch.nn.functional.pad(x[:, None], (80, 80), mode="reflect")[:, 0]
    s = torch.view_as_real(torch.stft(x, 320, 160, 320, torch.hann_window(320), center=False, return_complex=True))
    mag = s.pow(2).sum(-1, keepdim=True).sqrt().clamp(min=1e-12)
    return (mag ** 0.3 * s / mag).permute(0, 3, 1, 2)  # (B, K, M, 2) -> (B, 2, K, M)


def test_the_sfi_stft_at_16k_is_the_16k_stft():
    x = torch.from_numpy(speechlike(16000, 2.0, seed=1))[None]
    ref = reference_16k(x)
    got = sfi_stft(x, 16000, ref.shape[-1], RAW)
    assert got.shape == ref.shape == (1, 2, 161, 200)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 24000, 44100, 48000])
def test_the_same_band_limited_content_gives_the_same_spectrum_at_any_rate(sr):
    """Content below 3.4 kHz, made at 48 kHz and resampled: every frame and bin matches the 16 kHz
    spectrum to within a few percent of its scale (windows sit on other sample grids)."""
    x48 = torch.from_numpy(speechlike(48000, 1.5, seed=2, bandwidth=3400))
    at16, at_sr = resample(x48, 48000, 16000)[None], resample(x48, 48000, sr)[None]
    a, b = sfi_stft(at16, 16000, 140, RAW), sfi_stft(at_sr, sr, 140, RAW)
    band = slice(0, 60)  # bins up to 3 kHz
    err = (a[:, :, band] - b[:, :, band]).abs().max() / a[:, :, band].abs().max()
    assert err < 0.06, f"{sr} Hz: {err:.3f}"  # a wrong scale or frame time gives > 0.2


def test_frames_sit_at_the_same_instants_at_rates_with_fractional_hops():
    """22.05 kHz has a 220.5-sample hop and 11.025 kHz 110.25: frames alternate between offsets."""
    for sr, phases in [(16000, 1), (44100, 1), (22050, 2), (11025, 4)]:
        first, offset = frame_starts(sr, 400, 100, 2)
        start = (first.double() - offset.double() / 200) / sr  # offset is in 1/(200 sr) s
        torch.testing.assert_close(start, torch.arange(400, dtype=torch.float64) / 100 - 0.005)
        assert len(offset.unique()) == phases


def test_the_empty_top_band_is_zero_at_every_rate_and_a_full_band_keeps_it():
    cfg = SpecModelConfig()
    t = torch.arange(48000, dtype=torch.float64) / 48000
    fade = torch.sin(np.pi * t).clamp(max=0.5) * 2  # no click at the ends: band-limited throughout
    narrow48 = (fade * sum(torch.sin(2 * np.pi * 170 * k * t) / k for k in range(1, 20))).float()[None]  # < 3.3 kHz
    s8, s48 = (sfi_stft(resample(narrow48, 48000, r), r, 100, cfg) for r in (8000, 48000))
    assert torch.all(s8[:, :, 80:] == 0) and torch.all(s48[:, :, 80:] == 0)
    full = sfi_stft(torch.from_numpy(speechlike(16000, 1.0, seed=3))[None], 16000, 100, cfg)
    assert full[:, :, 150:].abs().amax() > 0.1


def test_the_empty_band_fill_is_one_fixed_floor_in_frames_with_audio_at_every_rate():
    cfg = SpecModelConfig(empty_band_db=-100.0)
    t = torch.arange(48000, dtype=torch.float64) / 48000
    fade = torch.sin(np.pi * t).clamp(max=0.5) * 2  # no click at the ends: band-limited throughout
    narrow = (fade * sum(torch.sin(2 * np.pi * 170 * k * t) / k for k in range(1, 20))).float()  # < 3.3 kHz
    x48 = torch.cat([narrow, torch.zeros(24000)])[None]  # 0.5 s of digital zero after the audio
    s8, s48 = (sfi_stft(resample(x48, 48000, r), r, 150, cfg) for r in (8000, 48000))
    fill = band_fill(cfg.bins, 150, -100.0, cfg.compress, 80.0)  # (2, M, K)
    for s in (s8, s48):
        torch.testing.assert_close(s[0, :, 90:, :95], fill[:, :95, 90:].transpose(1, 2), rtol=0, atol=0)
        assert torch.all(s[0, :, :, 110:] == 0)  # frames of padding stay empty, as the all-zero crop is
    rms = fill.pow(2).sum(0).mean().sqrt()
    assert 0.5 < rms / (80 * 1e-5) ** 0.3 < 2  # -100 dB re a full-scale sine, compressed
    torch.testing.assert_close(band_fill(cfg.bins, 40, -100.0, 0.3, 80.0), fill[:, :40], rtol=0, atol=0)
    full = sfi_stft(torch.from_numpy(speechlike(16000, 1.0, seed=3))[None], 16000, 100, cfg)
    torch.testing.assert_close(full, sfi_stft(torch.from_numpy(speechlike(16000, 1.0, seed=3))[None], 16000, 100,
                                              SpecModelConfig()), rtol=0, atol=0)  # a full band has nothing to fill


def test_with_band_share_one_click_does_not_make_the_empty_band_live():
    """A narrowband clip with one full-band click: under the any-frame rule the click's frame makes
    the whole band live (nothing is zeroed); with band_share the band stays empty in every frame but
    the click's own, which keeps its content, and a band that is live throughout is still kept."""
    t = torch.arange(48000, dtype=torch.float64) / 48000
    fade = torch.sin(np.pi * t).clamp(max=0.5) * 2
    narrow = (fade * sum(torch.sin(2 * np.pi * 170 * k * t) / k for k in range(1, 20))).float()  # < 3.3 kHz
    clicked = narrow.clone()
    clicked[24000] += 0.5  # one sample: broadband, in 2-3 of 100 frames
    s_any = sfi_stft(clicked[None], 48000, 100, SpecModelConfig())
    s_share = sfi_stft(clicked[None], 48000, 100, SpecModelConfig(band_share=0.05))
    assert s_any[:, :, 120:].abs().amax() > 0  # the click's frames opened the top band
    quiet = [m for m in range(100) if not 46 <= m <= 52]  # frames away from the click
    assert torch.all(s_share[:, :, 80:, quiet] == 0)
    torch.testing.assert_close(s_share[:, :, 120:, 50], s_any[:, :, 120:, 50], rtol=0, atol=0)  # the click's frame
    assert s_any[:, :, 120:, 50].abs().amax() > 0
    full = torch.from_numpy(speechlike(16000, 1.0, seed=3))[None]
    torch.testing.assert_close(sfi_stft(full, 16000, 100, SpecModelConfig(band_share=0.05)),
                               sfi_stft(full, 16000, 100, SpecModelConfig()), rtol=0, atol=0)


@pytest.mark.parametrize("sr", [8000, 48000])
def test_with_the_fill_the_cnn_on_the_audio_alone_still_equals_the_full_crop(spec_dir, sr):
    m = load_model(spec_dir, "cpu")
    m.cfg.empty_band_db = -100.0
    for secs in (0.3, 3.3):
        x = resample(torch.from_numpy(speechlike(16000, secs, seed=5)), 16000, 8000)  # nothing above 4 kHz
        x = resample(x, 8000, sr)
        crops = m.crops(x, sr)
        with torch.no_grad():
            full, fast = m.features(crops, sr), m.features(crops, sr, x.shape[0])
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    m.cfg.empty_band_db = None
    with torch.no_grad():
        assert not torch.equal(m.features(crops, sr), full)  # the fill reached the network


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("spec"), "tiny-spec", seed=1)


def test_a_saved_spec_model_loads_as_one_and_scores_the_same(spec_dir):
    doc = json.loads((spec_dir / CONFIG).read_text())
    assert doc["config"]["architecture"] == "sfi-stft-transformer"
    torch.manual_seed(1)
    fresh = SpecMOSModel(tiny_spec()).eval()
    loaded = load_model(spec_dir, "cpu")
    assert isinstance(loaded, SpecMOSModel) and not loaded.training
    x = speechlike(24000, 1.3, seed=4)
    assert loaded.score(x, 24000).tolist() == fresh.score(x, 24000).tolist()


def test_an_unknown_architecture_is_a_one_line_load_error(spec_dir, tmp_path):
    doc = json.loads((spec_dir / CONFIG).read_text())
    doc["config"]["architecture"] = "mystery"
    (tmp_path / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match="unknown architecture 'mystery'"):
        load_model(tmp_path, "cpu")


def test_long_input_is_the_mean_of_crops_at_most_a_second_apart(spec_dir):
    m = load_model(spec_dir, "cpu")
    x = torch.from_numpy(speechlike(16000, 9.5, seed=5))
    crops = m.crops(x, 16000)
    assert crops.shape == (3, 122880)  # 1.82 s over -> 3 crops
    torch.testing.assert_close(crops[-1], x[-122880:] / x[-122880:].abs().max(), atol=1e-6, rtol=0)
    with torch.no_grad():
        frames, n = m.frame_scores(x[None], None, 16000)
        want = m.crop_scores(crops, 16000).mean()
    torch.testing.assert_close(frames[0, 0] / n[0], want)


def test_scores_ignore_edge_silence_gain_and_the_batch(spec_dir):
    m = load_model(spec_dir, "cpu")
    sr = 22050
    x = speechlike(sr, 1.2, seed=6)
    base = score_waveforms(m, [x], sr)[0]
    padded = np.concatenate([np.zeros(sr, np.float32), x, np.zeros(sr, np.float32)])
    assert score_waveforms(m, [padded], sr)[0] == base  # the input rule cuts edge silence with no margin
    assert abs(score_waveforms(m, [x * 0.03], sr)[0] - base) < 1e-5  # each crop is peak-normalised
    waves = [speechlike(sr, s, seed=i) for i, s in enumerate([0.5, 1.5, 0.8])] + [x]
    alone = [score_waveforms(m, [w], sr)[0] for w in waves]
    assert score_waveforms(m, waves, sr, batch_size=3) == alone  # on a CPU rows run alone at any batch size
    assert len(set(alone)) == len(alone)  # the scores differ, so equality means something


def test_the_gpu_batched_path_agrees_with_rows_alone_and_ignores_neighbours(spec_dir):
    """On CUDA a batch's crops run together in fixed-size chunks; run here on the CPU, the same code."""
    m = load_model(spec_dir, "cpu")
    sr = 24000
    waves = [torch.from_numpy(speechlike(sr, s, seed=i)) for i, s in enumerate([0.5, 1.5, 0.8, 1.2])]
    with torch.no_grad():
        alone = [float(m.crop_scores(m.crops(w, sr), sr, w.shape[0]).mean()) for w in waves]
        batched = [float(s) for s in m.batched_scores(waves, sr, chunk=3)]  # 4 crops: 2 chunks of 3
        np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)
        others = [torch.from_numpy(speechlike(sr, 9.0, seed=10))]  # a long neighbour: 3 crops
        again = [float(s) for s in m.batched_scores(others + waves[::-1], sr, chunk=3)[1:]]
    assert again == batched[::-1]  # bitwise, whatever shares the chunks
    assert len(set(alone)) == len(alone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_on_cuda_batch_sizes_agree_and_a_score_ignores_its_neighbours(spec_dir):
    """The batched CUDA path: within 1e-5 of batch 1, within 1e-4 of the CPU, bitwise whatever the order."""
    waves = [speechlike(24000, s, seed=i) for i, s in enumerate([0.5, 9.0, 1.5, 0.8, 1.2, 3.0])]
    gpu = load_model(spec_dir, "cuda")
    one = score_waveforms(gpu, waves, 24000, batch_size=1)
    four = score_waveforms(gpu, waves, 24000, batch_size=4)
    np.testing.assert_allclose(four, one, atol=1e-5, rtol=0)
    np.testing.assert_allclose(four, score_waveforms(load_model(spec_dir, "cpu"), waves, 24000), atol=1e-4, rtol=0)
    assert score_waveforms(gpu, waves[::-1], 24000, batch_size=4) == four[::-1]
    assert score_waveforms(gpu, waves[2:3], 24000, batch_size=4) == four[2:3]
    assert len(set(four)) == len(four)


def test_a_spec_models_batches_hold_windows_of_any_length_at_one_rate(spec_dir, monkeypatch):
    """Its crops have a fixed size, so batches need no length buckets and fill up on a mixed set."""
    from msr_utmos_cli import batching

    calls, launch = [], batching.launch
    monkeypatch.setattr(batching, "launch", lambda m, waves, *a, **k: calls.append(len(waves)) or launch(m, waves, *a, **k))
    m = load_model(spec_dir, "cpu")
    waves = [speechlike(24000, s, seed=i) for i, s in enumerate([0.5, 9.0, 1.5, 3.0])]
    four = score_waveforms(m, waves, 24000, batch_size=4)
    assert calls == [4]
    np.testing.assert_allclose(four, score_waveforms(m, waves, 24000, batch_size=1), atol=1e-5, rtol=0)


def test_utmos_score_runs_a_spec_model_on_files_at_three_rates(spec_dir, tmp_path):
    for sr in (8000, 16000, 48000):
        sf.write(tmp_path / f"a{sr}.wav", speechlike(sr, 1.0, seed=sr), sr)
    sf.write(tmp_path / "short.wav", np.zeros(10, np.float32) + 0.1, 16000)
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(app, ["score", str(tmp_path), "--model", str(spec_dir), "--out", str(out),
                                 "--device", "cpu"])
    lines = out.read_text().splitlines()
    col = lines[0].split(",").index("mos")
    rows = {p.split(",")[0].rsplit("/", 1)[-1]: p for p in lines[1:]}
    assert r.exit_code == 0, r.output  # some files scored: the short one gets its row error
    assert "too short" in rows["short.wav"]
    for sr in (8000, 16000, 48000):
        assert 1.0 <= float(rows[f"a{sr}.wav"].split(",")[col]) <= 5.0


def test_export_and_finetune_refuse_a_spec_model_in_one_line(spec_dir, tmp_path):
    r = CliRunner().invoke(app, ["export", str(spec_dir), "--onnx", str(tmp_path / "m.onnx"), "--rate", "16000"])
    assert r.exit_code == 2 and "sfi-stft-transformer" in r.output and "Traceback" not in r.output
    from msr_utmos_cli.training.finetune import FinetuneModel, build_model
    with pytest.raises(ModelLoadError, match="sfi-stft-transformer"):
        build_model(str(spec_dir), FinetuneModel(), 1, 0, 0)


@pytest.mark.parametrize("sr", [8000, 22050, 48000])
def test_the_cnn_on_the_audio_alone_equals_the_full_crop(spec_dir, sr):
    """A short file's crop is mostly padding; running the CNN only where the audio reaches, with the
    rest from the all-zero crop, must give the full pass's features."""
    m = load_model(spec_dir, "cpu")
    for secs in (0.05, 1.0, 3.3, 7.6):
        x = torch.from_numpy(speechlike(sr, secs, seed=int(secs * 10)))
        crops = m.crops(x, sr)
        with torch.no_grad():
            full, fast = m.features(crops, sr), m.features(crops, sr, x.shape[0])
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        assert not torch.equal(full[:, 0], full[:, -100])  # audio and padding really differ


def test_cnn_widths_round_trip_and_a_wrong_list_is_one_line(tmp_path):
    from msr_utmos_cli.checkpoint import save_model

    model = SpecMOSModel(SpecModelConfig(cnn_channels=16, dim=16, heads=2, layers=1, cnn_widths=[4, 4, 8, 8, 8, 16]))
    folder = save_model(model, tmp_path / "narrow")
    again = load_model(folder, device="cpu")
    assert [m.out_channels for m in again.cnn.cnn if isinstance(m, torch.nn.Conv2d)] == [4, 4, 8, 8, 8, 16]
    doc = json.loads((folder / CONFIG).read_text())
    doc["config"]["cnn_widths"] = [4, 4, 8]
    (folder / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match="cnn_widths must be 6 positive channel counts"):
        load_model(folder, device="cpu")
