"""The SFI STFT in front of the spectrogram model: pure DSP.

DistillMOS's 16 kHz STFT (20 ms Hann window, 10 ms hop, 161 bins 50 Hz apart, |X|^0.3 with the
phase) defined in continuous time, so every rate gives the same frames at the same instants and
the same bins in Hz. `cfg` is a spec_model.SpecModelConfig (its STFT fields are read)."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .spec_model import SpecModelConfig


def frame_starts(fs: int, frames: int, frames_per_s: int, window_hops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First sample of each frame and its offset from the frame's start time, in 1/(den*fs) s.

    Frame m starts at m/frames_per_s - (window - hop)/2 seconds (the centred reflect padding of the
    16 kHz STFT). Exact integer arithmetic, so long inputs do not drift. -> (M,), (M,) int64."""
    den = 2 * frames_per_s
    num = (2 * torch.arange(frames, dtype=torch.int64) - (window_hops - 1)) * fs  # start * fs * den
    first = torch.div(num + den - 1, den, rounding_mode="floor")
    return first, first * den - num


@lru_cache(maxsize=16)
def stft_taps(fs: int, offset: int, frames_per_s: int, window_hops: int, bin_hz: int, bins: int,
              base_rate: int = 16000) -> torch.Tensor:
    """Real and imaginary DFT taps of one frame whose first sample lies `offset`/(den*fs) s after its
    start: (L, 2*bins) float32. w(t) e^{-i 2 pi f_k t} sampled at rate fs, scaled by base_rate / fs so
    every rate gives the magnitudes of the base-rate STFT; bins above fs/2 are zero."""
    den = 2 * frames_per_s
    win = window_hops / frames_per_s
    taps = math.ceil(win * fs) + 1
    t = (offset / den + torch.arange(taps, dtype=torch.float64)) / fs  # (L,) s after the frame start
    w = torch.where(t < win - 1e-12, 0.5 - 0.5 * torch.cos(2 * math.pi * t / win), torch.zeros_like(t))
    f = bin_hz * torch.arange(bins, dtype=torch.float64)
    arg = 2 * math.pi * t[:, None] * f[None, :]  # (L, K)
    keep = (f <= fs / 2)[None, :]
    scale = base_rate / fs
    re, im = w[:, None] * torch.cos(arg) * keep * scale, -w[:, None] * torch.sin(arg) * keep * scale
    return torch.cat([re, im], dim=1).float()


def sfi_stft(x: torch.Tensor, fs: int, frames: int, cfg: SpecModelConfig) -> torch.Tensor:
    """(B, T) at rate fs -> compressed complex spectrum (B, 2, bins, frames), as DistillMOS's input.
    Always fp32, also under autocast: |X|^0.3 lifts bins 70 dB down to a tenth of the loudest."""
    with torch.autocast(x.device.type, enabled=False):
        return _sfi_stft(x.float(), fs, frames, cfg)


def _sfi_stft(x: torch.Tensor, fs: int, frames: int, cfg: SpecModelConfig) -> torch.Tensor:
    first, offset = frame_starts(fs, frames, cfg.frames_per_s, cfg.window_hops)
    taps = math.ceil(cfg.window_hops / cfg.frames_per_s * fs) + 1
    left = max(0, -int(first[0]))
    right = max(0, int(first[-1]) + taps - x.shape[-1])
    x = nn.functional.pad(x[:, None], (left, right), mode="reflect")[:, 0]  # reflect, as torch.stft's centre
    idx = (first + left)[:, None] + torch.arange(taps)[None, :]  # (M, L)
    seg = x[:, idx.to(x.device)]  # (B, M, L)
    out = seg.new_empty(x.shape[0], frames, 2 * cfg.bins)
    for off in offset.unique().tolist():
        rows = (offset == off).nonzero()[:, 0].to(x.device)
        w = stft_taps(fs, off, cfg.frames_per_s, cfg.window_hops, cfg.bin_hz, cfg.bins).to(x.device, x.dtype)
        out[:, rows] = seg[:, rows] @ w  # (B, M_p, L) @ (L, 2K)
    re, im = out[..., :cfg.bins], out[..., cfg.bins:]
    mag = torch.sqrt(re ** 2 + im ** 2).clamp(min=1e-12)
    gain = mag ** cfg.compress / mag
    if cfg.floor_db is not None:  # a full-scale sine has |X| = base_rate * window / 4
        full = 16000 * cfg.window_hops / cfg.frames_per_s / 4
        above = mag >= full * 10 ** (cfg.floor_db / 20)  # (B, M, K)
        heard = (mag > 1e-12).any(dim=2, keepdim=True)  # (B, M, 1): frames with audio; padding stays 0
        if cfg.band_share > 0:  # a click's one frame does not make a band live
            live = above.sum(dim=1) > cfg.band_share * heard.sum(dim=1)  # (B, K)
        else:
            live = above.any(dim=1)  # (B, K): bins with content in the crop
        top = torch.where(live, torch.arange(cfg.bins, device=x.device), -1).amax(dim=1, keepdim=True)  # (B, 1)
        # the empty top band, in each frame where it is below the floor (a click's own frame keeps its content)
        empty = (torch.arange(cfg.bins, device=x.device) > top)[:, None, :] & ~above  # (B, M, K)
        gain = gain * ~empty  # -> 0
        if cfg.empty_band_db is not None:
            fill = band_fill(cfg.bins, frames, cfg.empty_band_db, cfg.compress, full).to(x.device)  # (2, M, K)
            where = empty & heard  # (B, M, K)
            return torch.stack([torch.where(where, fill[0], re * gain), torch.where(where, fill[1], im * gain)],
                               dim=1).transpose(2, 3)
    return torch.stack([re * gain, im * gain], dim=1).transpose(2, 3)  # (B, M, K) x2 -> (B, 2, K, M)


@lru_cache(maxsize=8)
def band_fill(bins: int, frames: int, level_db: float, compress: float, full: float) -> torch.Tensor:
    """The empty band's fixed pseudo-noise, compressed as the spectrum is: (2, frames, bins) float32.
    Frame m is the same at every rate, crop and device: seeded on the CPU, drawn frame after frame, so a
    shorter run's frames are a longer one's first."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(max(frames, 768), 2, bins, generator=g, dtype=torch.float64)[:frames].transpose(0, 1)
    return (noise * (full * 10 ** (level_db / 20)) ** compress / math.sqrt(2)).float()
