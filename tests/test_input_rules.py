"""One set of input rules: `model.score(wave, sr)`, `model.score_files(paths)` and `utmos score` accept
and refuse the same audio, with the same one-line error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from msr_utmos_cli import AudioError, load_model, score_files
from msr_utmos_cli.cli import app

from msr_utmos_cli.testing import speechlike

X = speechlike(16000, 1.0)
STEREO = np.stack([speechlike(16000, 1.0, 1), speechlike(16000, 1.0, 2)], 1)  # (T, C) as soundfile.read gives

# name -> (samples as a file holds them, rate, the row error every path must give)
BAD = {
    "rate_4k": (speechlike(4000, 1.0), 4000, "sampling rate 4000 Hz outside the supported 8000-192000 Hz"),
    "all_zero": (np.zeros(16000, np.float32), 16000, "all-silent audio (peak below -100 dBFS)"),
    "nan": (np.full(16000, np.nan, np.float32), 16000, "audio contains NaN or Inf samples"),
    "ten_samples": (np.full(10, 0.1, np.float32), 16000, "too short (0.6 ms; needs at least 400 samples)"),
}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, "cpu")


def cli_rows(tiny_model_dir, *paths, extra=()):
    r = CliRunner().invoke(app, ["score", *map(str, paths), "--model", str(tiny_model_dir), "--format", "jsonl",
                                 "-q", *extra])
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.mark.parametrize("name", list(BAD))
def test_bad_audio_gives_the_same_error_as_array_as_path_and_on_the_cli(name, model, tiny_model_dir, tmp_path):
    x, sr, error = BAD[name]
    path = tmp_path / f"{name}.wav"
    sf.write(path, x, sr, subtype="FLOAT")
    with pytest.raises(AudioError) as e:
        model.score(x, sr)
    assert str(e.value) == error
    assert isinstance(e.value, ValueError)  # callers catching ValueError keep working
    assert model.score_files([path])[0].error == error
    assert cli_rows(tiny_model_dir, path)[0]["error"] == error


def test_batch_errors_name_the_input(model):
    with pytest.raises(AudioError, match=r"^input 1: all-silent audio"):
        model.score(np.stack([X, np.zeros_like(X)]), 16000)


def test_integer_pcm_is_scaled_as_when_read_from_a_file(model, tiny_model_dir, tmp_path):
    pcm = (X * 32767).astype(np.int16)
    sf.write(tmp_path / "i16.wav", pcm, 16000, subtype="PCM_16")
    as_float = model.score(pcm.astype(np.float32) / 32768, 16000)
    assert torch.equal(model.score(pcm, 16000), as_float)
    assert torch.equal(model.score(torch.from_numpy(pcm), 16000), as_float)
    assert model.score_files([tmp_path / "i16.wav"])[0].mos == float(as_float[0])
    assert cli_rows(tiny_model_dir, tmp_path / "i16.wav")[0]["mos"] == round(float(as_float[0]), 5)
    u8 = np.array([0, 128, 255], np.uint8)
    from msr_utmos_cli.audio import to_float32
    assert to_float32(u8).tolist() == [-1.0, 0.0, 127 / 128]


def test_channel_layouts_are_explicit_and_match_the_file(model, tiny_model_dir, tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, STEREO, 16000, subtype="FLOAT")
    wave, sr = sf.read(path)  # (T, 2) float64
    mixed = model.score(wave, sr)
    assert mixed.shape == (1,)
    assert float(mixed[0]) == model.score_files([path])[0].mos == pytest.approx(
        cli_rows(tiny_model_dir, path)[0]["mos"], abs=1e-5)
    assert torch.equal(model.score(wave.T, sr, channel_axis=0), mixed)  # (C, T), as torchaudio.load gives
    assert torch.equal(model.score(wave, sr, channel=1), model.score(STEREO[:, 1], sr))
    assert model.score(wave.T, sr).shape == (2,)  # 2-D without channel_axis: a (B, T) batch
    with pytest.raises(AudioError, match="^channel 2 requested but the audio has 2 channel"):
        model.score(wave, sr, channel=2)
    assert "channel 2 requested but the audio has 2 channel" in cli_rows(tiny_model_dir, path,
                                                                          extra=["--channel", "2"])[0]["error"]


def test_score_files_takes_plain_paths_and_names_missing_ones(model, tmp_path):
    sf.write(tmp_path / "a.wav", X, 16000)
    rows = score_files(model, [tmp_path / "a.wav", str(tmp_path / "gone.wav"), tmp_path])
    assert [(r.path, r.error) for r in rows] == [(str(tmp_path / "a.wav"), ""), (str(tmp_path / "gone.wav"),
                                                 "no such file"), (str(tmp_path), "is a directory")]
