"""SFI spectrogram model: DistillMOS's network behind a sampling-frequency-independent STFT.

DistillMOS (Stahl & Gamper, 2025; MIT) reads a 16 kHz waveform through a 20 ms Hann STFT with a
10 ms hop, a power-0.3 compressed complex spectrum of 161 bins 50 Hz apart, a 2-D CNN over
(frequency, time) and a 7-layer transformer with attention pooling, on 7.68 s crops. Its only
rate-bound part is the STFT. Here that STFT is defined in continuous time: every frame is the
same 20 ms window at the same instants, and every bin the same frequency in Hz, evaluated on the
sample grid of whatever rate the file has (bins above its Nyquist are empty, as after an
upsampler). The network after it never sees the rate, so one set of weights scores 8-48 kHz
without resampling, and at 16 kHz it is DistillMOS to float rounding. The transform is in spec_stft.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .model import MOSModel, SavedConfig
from .spec_stft import sfi_stft

ARCHITECTURE = "sfi-stft-transformer"


@dataclass
class SpecModelConfig(SavedConfig):
    """Everything needed to rebuild the model; saved as JSON beside its weights."""

    architecture: str = ARCHITECTURE
    frames_per_s: int = 100  # STFT hop 10 ms
    window_hops: int = 2  # window = 2 hops = 20 ms
    bin_hz: int = 50  # bin spacing: 1 / window
    bins: int = 161  # 0 ... 8 kHz
    compress: float = 0.3  # |X|^0.3 with the phase kept
    floor_db: float | None = -70.0  # the empty top band (no bin above it reaches this, re a full-scale sine) is zeroed
    # ... or, in frames with audio, filled with a fixed pseudo-noise this far below a full-scale sine: a band
    # emptied exactly, as a file's Nyquist or a codec's cut-off leaves it, is nothing DistillMOS ever heard.
    empty_band_db: float | None = None
    # A bin is live when it reaches floor_db in more than this share of the frames with audio (0: in any one).
    band_share: float = 0.0
    cnn_layers: int = 6
    cnn_channels: int = 256
    cnn_widths: list[int] | None = None  # channels per CNN layer; None: DistillMOS's 64, 64, 128, 256, ...
    dim: int = 200
    heads: int = 8
    layers: int = 7
    crop_frames: int = 384  # transformer frames per crop (2 STFT frames each): 7.68 s
    crop_hop_s: float = 1.0  # long inputs: crops at most this far apart, their scores averaged
    # Input rule (audio.input_span): edge silence below input_trim_db re the peak is cut with no margin,
    # so silence added at either end leaves the score exactly alone; each crop is then peak-normalised.
    input_rms_db: float | None = None
    input_trim_db: float | None = -40.0
    input_trim_margin_s: float = 0.0

    @property
    def crop_s(self) -> float:
        return 2 * self.crop_frames / self.frames_per_s


def tiny_spec() -> SpecModelConfig:
    """For tests: the same geometry, a few thousand parameters."""
    return SpecModelConfig(cnn_channels=16, dim=16, heads=2, layers=1)


# --- the network (DistillMOS's layout, parameter names kept) ------------------------------------
def cnn_widths(cfg: SpecModelConfig) -> list[int]:
    """Output channels of each CNN layer: the config's list, else DistillMOS's doubling rule."""
    if cfg.cnn_widths is not None:
        if len(cfg.cnn_widths) != cfg.cnn_layers or min(cfg.cnn_widths) < 1:
            raise ValueError(f"cnn_widths must be {cfg.cnn_layers} positive channel counts, got {cfg.cnn_widths}")
        return list(cfg.cnn_widths)
    return [min(64 * 2 ** max(i - 1, 0), cfg.cnn_channels) for i in range(cfg.cnn_layers)]


class SpecCNN(nn.Module):
    """(B, 2, K, M) -> (B, M/2, C * K') : 3x3 convs striding over frequency, the last also over time."""

    def __init__(self, cfg: SpecModelConfig):
        super().__init__()
        layers, fdim, prev = [], cfg.bins, 2
        for i, ch in enumerate(cnn_widths(cfg)):
            layers += [nn.Conv2d(prev, ch, (3, 3), stride=(2 if i else 1, 2 if i == cfg.cnn_layers - 1 else 1),
                                 padding=(0, 1)), nn.LeakyReLU(0.1)]
            fdim, prev = (fdim - 3) // (2 if i else 1) + 1, ch
        self.cnn = nn.Sequential(*layers)
        self.out_dim = prev * fdim

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.cnn(spec), 1, -2).transpose(1, 2)  # (B, C, K', M/2) -> (B, M/2, C*K')


class Transformer(nn.Module):
    def __init__(self, cfg: SpecModelConfig, in_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim)
        self.linear_proj = nn.Linear(in_dim, cfg.dim)
        n = cfg.crop_frames
        pos = torch.arange(n)[:, None]
        div = torch.exp(torch.arange(0, cfg.dim, 2) * (-math.log(2 * n) / cfg.dim))
        pe = torch.zeros(1, n, cfg.dim)
        pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 2 * cfg.dim, dropout=0.0, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_proj(self.norm(x.transpose(1, 2)).transpose(1, 2))
        return self.transformer_encoder(x + self.pe)  # (B, N, D)


class PoolHead(nn.Module):
    """NISQA's attention pooling and a linear readout: (B, N, D) -> (B,) in [0, 1]."""

    def __init__(self, cfg: SpecModelConfig, in_dim: int):
        super().__init__()
        self.norm_input = nn.BatchNorm1d(in_dim)
        self.transformer = Transformer(cfg, in_dim)
        self.norm_trans = nn.BatchNorm1d(cfg.dim)
        self.pool = nn.Module()
        self.pool.linear1 = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.pool.linear2 = nn.Linear(2 * cfg.dim, 1)
        self.pool.linear3 = nn.Linear(cfg.dim, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.hidden_and_score(feats)[1]

    def hidden_and_score(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Also the normed last hidden states, which a shallower head is taught to give:
        (B, N, C) -> (B, N, D), (B,) in [0, 1]."""
        x = self.norm_input(feats.transpose(1, 2)).transpose(1, 2)
        x = self.norm_trans(self.transformer(x).transpose(1, 2)).transpose(1, 2)
        p = self.pool
        att = torch.softmax(p.linear2(torch.relu(p.linear1(x))).transpose(1, 2), dim=2)  # (B, 1, N)
        return x, torch.sigmoid(p.linear3(torch.bmm(att, x)[:, 0])[:, 0])


class SpecMOSModel(nn.Module):
    """MOS from a waveform at any integer rate: SFI STFT -> CNN -> transformer -> attention pool."""

    crops_fixed_shapes = True  # batched, every kernel sees fixed-size crops: batches need no length buckets

    def __init__(self, cfg: SpecModelConfig):
        super().__init__()
        self.cfg = cfg
        self.cnn = SpecCNN(cfg)
        self.transformer_pool_attn = PoolHead(cfg, self.cnn.out_dim)

    @property
    def device(self) -> torch.device:
        return self.transformer_pool_attn.norm_input.weight.device

    def min_samples(self, sr: int) -> int:
        """One STFT window (20 ms): shorter input holds no frame of speech."""
        return math.ceil(self.cfg.window_hops / self.cfg.frames_per_s * sr)

    def crop_starts(self, n: int, sr: int) -> list[int]:
        """First sample of each 7.68 s crop of an n-sample input: one when it fits, else at most
        crop_hop_s apart (DistillMOS's segmenting, in seconds rather than 16 kHz samples)."""
        over = n - round(self.cfg.crop_s * sr)
        if over <= 0:
            return [0]
        count = math.ceil(over / (self.cfg.crop_hop_s * sr)) + 1
        return [int(c * over) for c in torch.linspace(0, 1, count).tolist()]

    def crops(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        """(T,) -> (N, S) crops of 7.68 s (zero-padded when shorter), each peak-normalised."""
        size = round(self.cfg.crop_s * sr)
        if x.shape[0] <= size:
            out = nn.functional.pad(x, (0, size - x.shape[0]))[None]
        else:
            out = torch.stack([x[c:c + size] for c in self.crop_starts(x.shape[0], sr)])
        return out / (out.abs().amax(dim=1, keepdim=True) + 1e-8)

    def crop_scores(self, crops: torch.Tensor, sr: int, content: int | None = None) -> torch.Tensor:
        """(N, S) normalised crops -> MOS (N,) on 1-5. `content`: samples of real audio in a single
        zero-padded crop, so the CNN runs only where they reach (see features)."""
        return 1 + 4 * self.transformer_pool_attn(self.features(crops, sr, content))

    def features(self, crops: torch.Tensor, sr: int, content: int | None = None) -> torch.Tensor:
        """(N, S) crops -> CNN features (N, crop_frames, D).

        A short file's crop is mostly zero padding, and the CNN sees 6 STFT frames either side of an
        output, so every output past the audio's reach is that of an all-zero crop: those come from a
        cached all-zero pass and the CNN runs on the audio's frames alone (a 3 s file costs 3 s, not
        7.68 s). The result equals the full pass to float rounding."""
        frames = 2 * self.cfg.crop_frames
        reach = self.cfg.cnn_layers  # STFT frames each side that one CNN output reads
        if content is not None and crops.shape[0] == 1:
            zero_from = math.ceil((content / sr + (self.cfg.window_hops - 1) / (2 * self.cfg.frames_per_s))
                                  * self.cfg.frames_per_s) + 1  # first STFT frame of padding alone
            j0 = (zero_from + reach + 1) // 2  # first output column that reads padding alone
            run = 2 * j0 + reach + 2
            if run < frames:
                head = self.cnn(sfi_stft(crops, sr, run, self.cfg))[:, :j0]
                return torch.cat([head, self.zero_features(crops)[:, j0:]], dim=1)
        return self.cnn(sfi_stft(crops, sr, frames, self.cfg))

    def forget_zero_features(self) -> None:
        """Drop the cached all-zero crop features: call after changing the CNN's weights (training)."""
        self.__dict__.pop("_zero_cache", None)

    def zero_features(self, like: torch.Tensor) -> torch.Tensor:
        """CNN features of an all-zero crop (1, crop_frames, D); cached per device and dtype."""
        key = (like.device, like.dtype)
        cache = self.__dict__.setdefault("_zero_cache", {})
        if key not in cache:
            with torch.inference_mode(False), torch.no_grad():
                zeros = torch.zeros(1, 2, self.cfg.bins, 2 * self.cfg.crop_frames, device=like.device, dtype=like.dtype)
                cache[key] = self.cnn(zeros)
        return cache[key]

    def frame_scores(self, wave: torch.Tensor, lengths: torch.Tensor | None, sr: int,
                     fixed_shapes: bool = False, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """wave (B, T) -> each row's score times its weight (B, 1), and its weight (B,): hops of audio.

        On a CPU each row runs alone, the CNN only over its audio's reach (measured fastest there).
        Batched on a GPU (`fixed_shapes`, batch size > 1): all rows' crops go through the network
        together (see batched_scores). An all-zero row is not run (scoring refuses silent input;
        batches are filled with such rows)."""
        lengths = torch.full((wave.shape[0],), wave.shape[-1]) if lengths is None else lengths.cpu()
        weight = torch.clamp(lengths * self.cfg.frames_per_s // sr, min=1)
        live = [(b, int(n)) for b, n in enumerate(lengths.tolist()) if n > 0 and bool(wave[b, :int(n)].any())]
        if fixed_shapes and wave.device.type == "cuda":
            scores = self.batched_scores([wave[b, :n] for b, n in live], sr, chunk=wave.shape[0])
        else:
            scores = [self.crop_scores(self.crops(wave[b, :n], sr), sr, n).mean() for b, n in live]
        out = wave.new_zeros(wave.shape[0])
        if live:
            out[[b for b, _ in live]] = torch.stack(scores).to(out.dtype)
        w = weight.to(wave.device)
        return (out * w)[:, None], w

    def batched_scores(self, waves: list[torch.Tensor], sr: int, chunk: int) -> list[torch.Tensor]:
        """Each wave's mean crop score, its crops run `chunk` at a time (zero crops fill the last chunk), so
        every call has the same shape and a crop's score never depends on the others in its chunk."""
        crops = [self.crops(x, sr) for x in waves]
        counts = [c.shape[0] for c in crops]
        flat = torch.cat(crops)  # (C, S)
        flat = nn.functional.pad(flat, (0, 0, 0, -flat.shape[0] % chunk))
        s = torch.cat([self.crop_scores(flat[i:i + chunk], sr) for i in range(0, flat.shape[0], chunk)])
        return [part.mean() for part in s[:sum(counts)].split(counts)]

    def score(self, wave, sr: int, **kw) -> torch.Tensor:
        """MOS on the 1-5 scale -> (B,), under the same input rules as `utmos score` (see MOSModel.score)."""
        return MOSModel.score(self, wave, sr, **kw)

    def score_files(self, paths, **kw) -> list:
        return MOSModel.score_files(self, paths, **kw)
