"""Effective bandwidth: the highest frequency a file really carries, whatever its sampling rate says.

A 48 kHz file rendered from 16 kHz audio holds nothing above 8 kHz, and no MOS model of this
project rewards content above ~8 kHz, so the score cannot tell the two apart: this number can.

The rule (pure numpy, deterministic):
1. Power spectrum averaged over the active frames only (frame energy within 50 dB of the loudest),
   so speech pauses do not pull the average towards the noise floor.
2. Levels in 100 Hz bands, in dB.
3. A band limit is a cliff, not a slope: speech loses ~10 dB per octave, a resampler or codec
   filter loses 40-100 dB within a few hundred Hz. The edge is the highest band below which the
   last 1 kHz lies `CLIFF_DB` above the median band from there up to Nyquist (so dither, a flat noise
   floor, a stray tone or a resampler's image up there do not count as content); the edge itself is
   the last band within 20 dB of the content's level 1-2 kHz below the cliff.
4. No cliff: the content reaches Nyquist, and the bandwidth is the file's Nyquist frequency.
"""
from __future__ import annotations

import bisect

import numpy as np

BAND_HZ = 100.0
EDGE_DB = 20.0
CLIFF_DB = 25.0  # drop from the last 1 kHz of content to the band above it that marks a band limit
ACTIVE_DB = 50.0  # frames more than this below the loudest frame are pauses
MAX_SECONDS = 60.0  # long files: the first minute tells


def _suffix_medians(v: np.ndarray) -> list[float]:
    """[i]: the median of v[i:], for every i in one sweep (as np.median, without its per-call cost)."""
    out, seen = [0.0] * len(v), []
    for i in range(len(v) - 1, -1, -1):
        bisect.insort(seen, float(v[i]))
        m = len(seen)
        out[i] = (seen[m // 2] + seen[(m - 1) // 2]) / 2
    return out


def effective_bandwidth(x: np.ndarray, sr: int) -> float | None:
    """Highest frequency (Hz) carrying content in x (T,) at rate sr; None for silence or too little audio."""
    nfft = 1 << int(np.ceil(np.log2(sr * 0.04)))  # ~40 ms frames: 20-25 Hz bins at any rate
    x = np.asarray(x, dtype=np.float64)[: int(MAX_SECONDS * sr)]
    if x.size < nfft or not np.any(x):
        return None
    frames = np.lib.stride_tricks.sliding_window_view(x, nfft)[:: nfft // 2] * np.hanning(nfft)  # (F, nfft)
    z = np.fft.rfft(frames, axis=1)
    power = z.real ** 2 + z.imag ** 2  # (F, nfft/2+1)
    energy = power.sum(axis=1)
    active = energy >= energy.max() * 10 ** (-ACTIVE_DB / 10)
    spec = power[active].mean(axis=0)
    freqs = np.fft.rfftfreq(nfft, 1 / sr)
    nyq = sr / 2
    edges = np.arange(0.0, nyq + BAND_HZ, BAND_HZ)
    band = np.digitize(freqs, edges) - 1  # bin -> 100 Hz band
    n = len(edges) - 1
    inside = band < n  # the Nyquist bin can fall past the last edge
    count = np.bincount(band[inside], minlength=n)
    level = np.where(count > 0, np.bincount(band[inside], spec[inside], minlength=n) / np.maximum(count, 1), 0.0)
    db = 10 * np.log10(level + 1e-30)  # (n,) band levels
    below_n = int(1000 / BAND_HZ)
    content = np.median(np.lib.stride_tricks.sliding_window_view(db, below_n), axis=1)  # [j]: median of db[j: j+1 kHz]
    above = _suffix_medians(db)
    for i in range(n - 2, below_n - 1, -1):  # from the top: the highest cliff wins
        if content[i - below_n + 1] - above[i + 1] >= CLIFF_DB:
            ref = np.median(db[max(0, i - 2 * below_n + 1): i - below_n + 1])  # 1-2 kHz below: content proper
            top = int(np.flatnonzero(db[: i + 1] >= ref - EDGE_DB)[-1])
            return float(min(edges[top] + BAND_HZ / 2, nyq))
    return float(nyq)
