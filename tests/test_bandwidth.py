"""Effective bandwidth: band-limited clips at several rates are found within 15 %, whatever their pauses and floor."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import resample_poly

from msr_utmos_cli.bandwidth import effective_bandwidth
from msr_utmos_cli.testing import speechlike


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


def test_silence_and_too_little_audio_have_no_bandwidth():
    assert effective_bandwidth(np.zeros(16000), 16000) is None
    assert effective_bandwidth(np.ones(10), 16000) is None
