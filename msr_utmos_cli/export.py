"""ONNX export: the model at one sampling rate, its SFI taps for that rate baked in as ordinary convolutions.

At a rate whose frame hop is a fractional number of samples (24 kHz: 7.5) the SFI layer's frames cycle
through `period` offsets from the sample grid, each with its own taps. Frames j = p, p + period, ... of
offset p start a whole `period * hop` samples apart, so each offset is one strided convolution, and the
layer is `period` of them interleaved: only Conv, Slice, Concat and Reshape, which every runtime has.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .audio import MAX_RATE, MIN_RATE
from .model import ChannelLayerNorm, MOSModel
from .rows import DEFAULT_WINDOW_S
from .scoring import clip_mos, min_samples

MAX_PERIOD = 128  # offsets (one Conv node each) before a rate is refused
TOLERANCE = 1e-4  # largest |ONNX - PyTorch| MOS difference accepted by `export_onnx`'s own check
OPSET = 17


class ExportError(Exception):
    """The model cannot be exported at that rate; the message is one line saying why."""


class FixedRateSFI(nn.Module):
    """SFIConv1d frozen at one rate: wave (B, T) -> frames (B, C, F), every sample valid."""

    def __init__(self, sfi, rate: int):
        super().__init__()
        geo = sfi.geometry(rate)
        if geo.period > MAX_PERIOD:
            raise ExportError(f"--rate {rate}: its frames fall on {geo.period} different offsets from the sample "
                              f"grid (at most {MAX_PERIOD} export); pick a rate such as 8000, 16000, 22050, 24000, "
                              "44100 or 48000")
        span = 2 * sfi.stride * rate * geo.period  # samples between frames j and j + period, times geo.den
        assert span % geo.den == 0
        self.step, self.left, self.right = span // geo.den, geo.left_pad, geo.taps + span // geo.den
        self.firsts = [geo._first_sample(p)[0] + geo.left_pad for p in range(geo.period)]
        self.base_rate, self.kernel, self.stride, self.rate = sfi.base_rate, sfi.kernel, sfi.stride, rate
        with torch.no_grad():
            taps = sfi.taps(rate).float()  # (phases, C, L)
        # One tap set per offset (rare rates share them between offsets): (period, C, 1, L)
        self.register_buffer("taps", torch.stack([taps[i] for i in geo.phase_of_position])[:, :, None, :])

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, T) -> (B, C, F), F frames as SFIConv1d gives for T samples."""
        B, T = wave.shape
        frames = (T * self.base_rate - self.kernel * self.rate) // (self.stride * self.rate) + 1
        per_offset = (frames + len(self.firsts) - 1) // len(self.firsts)
        x = nn.functional.pad(wave, (self.left, self.right))[:, None, :]  # (B, 1, T')
        outs = [nn.functional.conv1d(x[:, :, first:], self.taps[p], stride=self.step)[:, :, :per_offset]
                for p, first in enumerate(self.firsts)]  # period x (B, C, M)
        y = torch.stack(outs, dim=-1)  # (B, C, M, period): frame m * period + p
        return y.reshape(B, y.shape[1], -1)[:, :, :frames]


class FixedRateScorer(nn.Module):
    """The model at one rate for equal-length inputs: wave (B, T) -> (MOS (B,) on 1-5, frame scores (B, F)).

    The MOS is the clipped mean of the frame scores, as `utmos score` gives for a clip up to its window
    length (rows.DEFAULT_WINDOW_S); for longer audio, cut equal windows and average all their frame scores
    before clipping.
    """

    def __init__(self, model: MOSModel, rate: int):
        super().__init__()
        self.model, self.rate = model, rate
        self.sfi = FixedRateSFI(model.sfi, rate)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = self.sfi(wave)  # (B, T) -> (B, C, F0)
        norm = m.sfi_norm
        x = norm(x) if isinstance(norm, ChannelLayerNorm) else \
            nn.functional.group_norm(x, m.cfg.sfi_channels, norm.weight, norm.bias, norm.eps)
        x = nn.functional.gelu(x)
        for block in m.convs:
            x, _ = block(x, None)  # (B, C, F)
        feats = m.encoder.extract_features(x.transpose(1, 2), None, m.readout_depth)  # [(B, F, D)]
        frames, mos = m.readout(feats, None)  # (B, F), (B,)
        return clip_mos(mos), frames


def export_onnx(model: MOSModel, rate: int, out: str | os.PathLike, check_seconds: float = 1.5) -> dict:
    """Write the ONNX graph of `model` at `rate` to `out` and check it against PyTorch with onnxruntime.

    Inputs: `wave` (batch, samples) float32 at `rate`, at least `min_samples` long. Outputs: `mos` (batch,)
    and `frame_scores` (batch, frames). The rate and minimum length are also in the graph's metadata.
    Uses torch's TorchScript-based exporter: torch.export (the newer one) fixes nn.LSTM's sequence length
    to the example's, so its graph would score one input length only.
    Returns {"path", "rate", "min_samples", "max_abs_diff"}; raises ExportError when the graph cannot be
    made or differs from PyTorch by more than TOLERANCE.
    """
    if not isinstance(model, MOSModel):
        raise ExportError(f"{getattr(model, 'source', 'this model')}: ONNX export covers the sfi-wav2vec2 models "
                          "(--model msr-utmos-small-distillmos), not the sfi-stft-transformer architecture")
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs `pip install 'msr-utmos[export]'` (onnx and onnxruntime)") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ExportError(f"--rate {rate}: outside {MIN_RATE}-{MAX_RATE} Hz")
    model = model.float().cpu().eval()  # exported from the CPU in fp32; the model is moved there
    scorer = FixedRateScorer(model, rate).eval()  # export restores the wrapper's mode on everything inside it
    need = min_samples(model, rate)
    example = torch.from_numpy(_check_audio(rate, max(need, int(check_seconds * rate))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes: checked below instead
            torch.onnx.export(scorer, (example,), str(out), input_names=["wave"], output_names=["mos", "frame_scores"],
                              dynamic_axes={"wave": {0: "batch", 1: "samples"}, "mos": {0: "batch"},
                                            "frame_scores": {0: "batch", 1: "frames"}},
                              opset_version=OPSET, dynamo=False)
    except Exception as e:  # the exporter's own essay: one line of it
        raise ExportError(f"ONNX export at {rate} Hz failed ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    graph = onnx.load(str(out))
    meta = {"sample_rate": rate, "min_samples": need, "source": getattr(model, "source", ""),
            "mos": "clipped mean of frame_scores (1-5); longer audio: cut equal windows of <= "
                   f"{DEFAULT_WINDOW_S:g} s and average all their frame scores before clipping, as utmos score does"}
    onnx.helper.set_model_props(graph, {k: str(v) for k, v in meta.items()})
    onnx.save(graph, str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["mos", "frame_scores"], {"wave": example.numpy()})
    with torch.no_grad():
        frames, _ = model.frame_scores(example, None, rate)
        want = [clip_mos(frames.mean(1)).numpy(), frames.numpy()]
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    if not diff <= TOLERANCE:
        raise ExportError(f"{out}: ONNX differs from PyTorch by {diff:.2e} at {rate} Hz (allowed {TOLERANCE:g})")
    return {"path": str(out), "rate": rate, "min_samples": need, "max_abs_diff": diff}


def _check_audio(rate: int, samples: int) -> np.ndarray:
    """Two different deterministic test signals (B=2): a harmonic tone with an envelope, and noise."""
    t = np.arange(samples) / rate
    tone = sum(np.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 20) if 140 * k < rate / 2)
    tone = 0.3 * tone * (0.6 + 0.4 * np.sin(2 * math.pi * 4 * t))
    noise = 0.1 * np.random.default_rng(0).standard_normal(samples)
    return np.stack([tone, noise]).astype(np.float32)
