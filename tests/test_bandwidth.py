"""Effective bandwidth: band-limited clips at several rates are found within 15 %, whatever their pauses and floor."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from scipy.signal import resample_poly

from msr_utmos_cli.bandwidth import effective_bandwidth
from msr_utmos_cli.testing import speechlike

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def band_limited(sr: int, bw: int, seed: int = 0) -> np.ndarray:
    x = speechlike(sr, 3.0, seed=seed).astype(np.float64)
    y = resample_poly(resample_poly(x, 2 * bw, sr), sr, 2 * bw)
    return np.round(y * 32767) / 32767  # as a 16-bit file holds it


@pytest.mark.parametrize("sr,bw", [(16000, 4000), (24000, 8000), (44100, 8000), (48000, 4000), (48000, 8000),
                                   (48000, 11025), (48000, 16000), (32000, 11025)])
def test_band_limit_found_within_15_percent(sr, bw):
    x = band_limited(sr, bw, seed=sr + bw)
    assert effective_bandwidth(x, sr) == pytest.approx(bw, rel=0.15)


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 48000])
def test_full_band_content_reaches_nyquist(sr):
    assert effective_bandwidth(speechlike(sr, 3.0, seed=1), sr) == pytest.approx(sr / 2, rel=0.15)


def test_pauses_dither_and_a_stray_tone_do_not_move_it():
    sr, bw = 48000, 8000
    x = band_limited(sr, bw, seed=3)
    rng = np.random.default_rng(0)
    t = np.arange(sr * 5) / sr
    y = np.concatenate([x[:sr], np.zeros(sr * 2), x[sr:]])  # two seconds of pause
    y = y + rng.standard_normal(y.size) * 10 ** (-90 / 20)  # dither-level noise floor over the whole band
    y = y + 10 ** (-70 / 20) * np.sin(2 * np.pi * 19000 * t[: y.size])  # a faint tone far above the content
    assert effective_bandwidth(y, sr) == pytest.approx(bw, rel=0.15)
    assert effective_bandwidth(x, sr) == pytest.approx(effective_bandwidth(y, sr), rel=0.05)


def torchaudio_up(x: np.ndarray, sr0: int, sr: int) -> np.ndarray:
    """Float upsampling with torchaudio's default filter: images above the band, no quantisation floor."""
    return AF.resample(torch.from_numpy(np.asarray(x, np.float32)), sr0, sr).numpy()


@pytest.mark.parametrize("sr0", [8000, 16000, 22050])
@pytest.mark.parametrize("sr", [24000, 44100, 48000])
def test_float_audio_upsampled_by_torchaudio_shows_its_source_band(sr0, sr):
    """A vocoder's 16 kHz output upsampled in float: its resampling images are not content."""
    if sr <= sr0:
        pytest.skip("not an upsampling")
    y = torchaudio_up(speechlike(sr0, 3.0, seed=sr0), sr0, sr)
    assert effective_bandwidth(y, sr) == pytest.approx(sr0 / 2, rel=0.15)


def steady(sr: int, f0: float) -> np.ndarray:
    t = np.arange(sr * 3) / sr
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, int(sr / 2 * 0.95 // f0)))
    return x / np.abs(x).max() * 0.5


@pytest.mark.parametrize("f0", [100.0, 200.0, 400.0])
@pytest.mark.parametrize("sr", [16000, 48000])
def test_a_steady_pitch_is_not_a_band_limit(f0, sr):
    """Harmonics alone, one every f0 Hz with nothing between: the gaps are not missing content."""
    assert effective_bandwidth(steady(sr, f0), sr) == pytest.approx(sr / 2, rel=0.15)
    top = f0 * (int(8000 / 2 * 0.95 // f0) - 1)  # the 8 kHz version's highest harmonic, 3.2-3.7 kHz
    got = effective_bandwidth(torchaudio_up(steady(8000, f0), 8000, sr), sr)
    assert 0.85 * top <= got <= 1.15 * 4000  # its content or its source's band, not the images above


def test_real_recording_at_any_rate_shows_its_own_band(tmp_path):
    """The bundled 8 kHz telephone prompt (real speech, a steep natural tilt) upsampled in float and as 16-bit."""
    x, sr0 = sf.read(EXAMPLES / "asterisk_clean_8k.wav", dtype="float32")
    for sr in (16000, 22050, 44100, 48000):
        y = torchaudio_up(x, sr0, sr)
        assert effective_bandwidth(y, sr) == pytest.approx(4000, rel=0.15), sr
        assert effective_bandwidth(np.round(y * 32767) / 32767, sr) == pytest.approx(4000, rel=0.15), sr


def test_silence_and_too_little_audio_have_no_bandwidth():
    assert effective_bandwidth(np.zeros(16000), 16000) is None
    assert effective_bandwidth(np.ones(10), 16000) is None
