"""Effective bandwidth: the highest frequency a file really carries, whatever its sampling rate says.

A 48 kHz file rendered from 16 kHz audio holds nothing above 8 kHz, and no MOS model of this
project rewards content above ~8 kHz, so the score cannot tell the two apart: this number can.

The rule (pure numpy, deterministic):
1. Power spectrum averaged over the active frames only (frame energy within 50 dB of the loudest),
   so speech pauses do not pull the average towards the noise floor.
2. Levels in 100 Hz bands, in dB; for finding a limit, their envelope over +-100 Hz, so the gaps
   between the harmonics of a steady or high voice are not taken for missing content.
3. A band limit is a cliff that stays down: speech loses ~10 dB per octave, a resampler, codec or
   filter loses 30-100 dB within a few hundred Hz. A limit at f needs the content in the 1 kHz below
   f to lie `CLIFF_DB` above every 1 kHz stretch from f + max(500 Hz, 25 % of f) up to Nyquist (a
   resampler's transition band can be that wide). So a slope is not a cliff, and dither, a flat
   floor, a stray tone or a resampler's images (float audio has no quantisation floor to hide them)
   never count as content. The content must be within `CONTENT_DB` of the loudest 1 kHz, so the top
   of an image is not a limit; limits are looked for from 2 kHz up. The steepest cliff wins; the
   edge is the last band within `EDGE_DB` of the content's (harmonic peak) level 1-2 kHz below it.
4. No cliff: the content reaches Nyquist, and the bandwidth is the file's Nyquist frequency.
A resampler's transition band counts as content: torchaudio's default filter leaves content up to
~16 % above the source's Nyquist at 22.05 -> 32 kHz. `tests/test_bandwidth.py` holds the cases.
"""
from __future__ import annotations

import numpy as np

BAND_HZ = 100.0
EDGE_DB = 20.0  # the edge: the last band this close to the content 1-2 kHz below the cliff
CLIFF_DB = 25.0  # drop from the last 1 kHz of content to anything above it that marks a band limit
CONTENT_DB = 60.0  # content this far below the loudest 1 kHz is not where a limit can sit
GAP = 0.25  # a filter's transition: the cliff's foot may lie this fraction of f above f
ACTIVE_DB = 50.0  # frames more than this below the loudest frame are pauses
ENVELOPE_HZ = 100.0  # half-width of the harmonic envelope: fills the gaps of voices up to f0 ~ 500 Hz, and
# spreads a lone tone over less than half a 1 kHz stretch, so it never becomes content
MAX_SECONDS = 60.0  # long files: the first minute tells


def _windows(v: np.ndarray, width: int, how) -> np.ndarray:
    """how(v[j: j + width]) for every j, the last windows shortened at the top: (n,) -> (n,)."""
    padded = np.concatenate([v, np.full(width - 1, np.nan)])
    return how(np.lib.stride_tricks.sliding_window_view(padded, width), axis=1)


def band_levels(x: np.ndarray, sr: int) -> np.ndarray | None:
    """Mean power of the active frames in 100 Hz bands, in dB: (T,) -> (n,); None when silent or too short."""
    nfft = 1 << int(np.ceil(np.log2(sr * 0.04)))  # ~40 ms frames: 20-25 Hz bins at any rate
    x = np.asarray(x, dtype=np.float64)[: int(MAX_SECONDS * sr)]
    if x.size < nfft or not np.any(x):
        return None
    frames = np.lib.stride_tricks.sliding_window_view(x, nfft)[:: nfft // 2] * np.hanning(nfft)  # (F, nfft)
    z = np.fft.rfft(frames, axis=1)
    power = z.real ** 2 + z.imag ** 2  # (F, nfft/2+1)
    energy = power.sum(axis=1)
    spec = power[energy >= energy.max() * 10 ** (-ACTIVE_DB / 10)].mean(axis=0)
    n = int(round(sr / 2 / BAND_HZ))
    band = np.minimum((np.fft.rfftfreq(nfft, 1 / sr) // BAND_HZ).astype(int), n - 1)  # bin -> band
    count = np.bincount(band, minlength=n)
    level = np.bincount(band, spec, minlength=n) / np.maximum(count, 1)
    return 10 * np.log10(level + 1e-30)


def effective_bandwidth(x: np.ndarray, sr: int) -> float | None:
    """Highest frequency (Hz) carrying content in x (T,) at rate sr; None for silence or too little audio."""
    db = band_levels(x, sr)
    if db is None:
        return None
    nyq, n = sr / 2, len(db)
    k = int(1000 / BAND_HZ)  # bands in 1 kHz
    h = int(ENVELOPE_HZ / BAND_HZ)
    env = _windows(np.concatenate([np.full(h, -np.inf), db]), 2 * h + 1, np.nanmax)[:n]  # (n,) max over +-h
    stretch = _windows(env, k, np.nanmedian)  # [j]: median of env[j: j+k], shortened near Nyquist
    top_of = np.maximum.accumulate(stretch[::-1])[::-1]  # [j]: the loudest stretch from band j up
    loudest = float(stretch.max())
    i = np.arange(2 * k - 1, n)  # the last band of content, from 2 kHz up
    gap = np.maximum(5, np.ceil(GAP * (i + 1)).astype(int))
    room = i + 1 + gap <= n - 5  # too little room above to tell a cliff from the roll-off at Nyquist
    i, gap = i[room], gap[room]
    below = stretch[i - k + 1]  # the content in the 1 kHz up to band i
    drop = np.where(below >= loudest - CONTENT_DB, below - top_of[np.minimum(i + 1 + gap, n - 1)], -np.inf)
    if not drop.size or drop.max() < CLIFF_DB:
        return float(nyq)
    best = drop.size - 1 - int(np.argmax(drop[::-1]))  # the steepest cliff (the highest of equals)
    i, gap = int(i[best]), int(gap[best])
    ref = float(np.median(env[i - 2 * k + 1: i - k + 1]))  # 1-2 kHz below: content proper (harmonic peaks)
    top = int(np.flatnonzero(db[: i + 1 + gap] >= ref - EDGE_DB)[-1])
    return float(min((top + 0.5) * BAND_HZ, nyq))
