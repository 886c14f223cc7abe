"""MSR-UTMOS architecture: a wav2vec2 backbone whose first conv is an SFI layer, plus a UTMOS-style MOS head."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torchaudio.models.wav2vec2 import components

from .audio import check_rate
from .rows import DEFAULT_WINDOW_S
from .scoring import as_waveforms, min_samples, score_files, score_waveforms
from .sfi import SFIConv1d


class SavedConfig:
    """JSON round trip of a config dataclass; an unknown key is an error, not silently dropped."""

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelConfig(SavedConfig):
    """Everything needed to rebuild a model; saved as JSON beside its weights."""

    # SFI first layer: stands in for a conv of `sfi_kernel` taps and hop `sfi_stride` at `sfi_base_rate`.
    sfi_channels: int = 512
    sfi_components: int = 6  # modulated Gaussians per channel; >= kernel/2 lets it fit any teacher conv
    sfi_design: str = "freq"  # "freq": least squares below Nyquist (no aliasing); "time": sampled impulse response
    sfi_base_rate: int = 16000
    sfi_kernel: int = 10
    sfi_stride: int = 5
    sfi_freq_points: int = 640
    sfi_max_phases: int = 128
    sfi_mute_above_nyquist: bool = True  # False: "freq" channels peaked above fs/2 keep their in-band skirt
    # Later conv layers as (out_channels, kernel, stride), as in wav2vec2.
    conv_layers: list = field(default_factory=lambda: [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2)
    extractor_mode: str = "group_norm"  # "group_norm" (base) or "layer_norm" (large)
    conv_bias: bool = False
    # Transformer encoder (torchaudio's wav2vec2 components).
    embed_dim: int = 768
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    num_layers: int = 12
    num_heads: int = 12
    ff_dim: int = 3072
    layer_norm_first: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_drop: float = 0.0  # 0 keeps training runs deterministic across ranks
    # UTMOS head: BLSTM + projection per frame, mean over valid frames.
    head_layer: int = -1  # encoder layer that feeds the head (-1: last)
    lstm_hidden: int = 256
    head_hidden: int = 2048
    head_dropout: float = 0.3
    num_domains: int = 1
    domain_dim: int = 0  # 0: no domain embedding
    num_listeners: int = 0
    listener_dim: int = 0  # 0: no listener embedding; id 0 is the "mean listener" used for prediction
    # Input rule (audio.input_span): edge silence below input_trim_db re the peak is cut and the rest scaled
    # to input_rms_db dBFS RMS before scoring, as the training clips were; None leaves the input as it is.
    input_rms_db: float | None = None
    input_trim_db: float | None = None


def tiny() -> ModelConfig:
    """For tests: same frame geometry as base, a few thousand parameters."""
    return ModelConfig(sfi_channels=32, sfi_components=2, conv_layers=[[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
                       embed_dim=32, pos_conv_kernel=16, pos_conv_groups=4, num_layers=2, num_heads=2,
                       ff_dim=64, lstm_hidden=16, head_hidden=32, dropout=0.0, attention_dropout=0.0,
                       head_dropout=0.0)


def small() -> ModelConfig:
    """Released default size: 3M parameters. Chosen by measurement (docs/sfi.md, "Model sizes"): the
    conv stack runs at 3200-100 frames/s and dominates CPU time, so it starts narrow (64 channels)
    and widens as the frame rate falls; ~50 audio s/s on 2 CPU cores vs ~8 for 256 channels throughout."""
    return ModelConfig(sfi_channels=64, conv_layers=[[128, 3, 2], [128, 3, 2], [256, 3, 2], [256, 3, 2],
                                                     [256, 2, 2], [256, 2, 2]],
                       embed_dim=192, pos_conv_kernel=64, pos_conv_groups=16, num_layers=4, num_heads=4, ff_dim=768,
                       layer_norm_first=True,  # pre-LN: trains from scratch without collapsing
                       lstm_hidden=128, head_hidden=256)


def base() -> ModelConfig:
    """wav2vec2-base dimensions (the paper's setting)."""
    return ModelConfig()


PRESETS = {"tiny": tiny, "small": small, "base": base}


class MaskedGroupNorm(nn.Module):
    """Per-channel normalisation over valid frames only, so padding never changes a score."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, C, F), lengths (B,) -> (B, C, F); padded frames are 0.

        One native group_norm per item on its valid frames: ~2.8x faster than masked sums at 3200
        frames/s, and each item's result is bitwise the same whatever batch or padding it is in.
        """
        C, F = x.shape[1], x.shape[-1]
        out = [nn.functional.pad(nn.functional.group_norm(x[b:b + 1, :, :n], C, self.weight, self.bias, self.eps),
                                 (0, F - n)) if n > 0 else x[b:b + 1].new_zeros(1, C, F)
               for b, n in enumerate(lengths.clamp(0, F).tolist())]
        return torch.cat(out)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, F) tensor (wav2vec2's "layer_norm" extractor mode)."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class MOSHead(nn.Module):
    """UTMOS22-style strong learner head: frame features -> BLSTM -> MLP -> one score per frame."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.domain = nn.Embedding(cfg.num_domains, cfg.domain_dim) if cfg.domain_dim else None
        self.listener = nn.Embedding(cfg.num_listeners + 1, cfg.listener_dim) if cfg.listener_dim else None
        in_dim = cfg.embed_dim + cfg.domain_dim + cfg.listener_dim
        self.lstm = nn.LSTM(in_dim, cfg.lstm_hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Sequential(nn.Linear(2 * cfg.lstm_hidden, cfg.head_hidden), nn.ReLU(),
                                  nn.Dropout(cfg.head_dropout), nn.Linear(cfg.head_hidden, 1))
        nn.init.constant_(self.proj[-1].bias, 3.0)  # start mid-scale so an untrained head is not clipped

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None, domain: torch.Tensor | None = None,
                listener: torch.Tensor | None = None, fixed_shapes: bool = False) -> torch.Tensor:
        """x (B, F, D), lengths (B,) -> per-frame scores (B, F); padded frames are 0. lengths None: no padding.

        fixed_shapes: every kernel's shape comes from x's shape alone, never from the other items'
        lengths (packing sizes each step by how many items are still running), so a batched item's
        scores cannot depend on its neighbours."""
        B, F, _ = x.shape
        extra = []
        for emb, ids in ((self.domain, domain), (self.listener, listener)):
            if emb is not None:
                ids = torch.zeros(B, dtype=torch.long, device=x.device) if ids is None else ids
                extra.append(emb(ids)[:, None, :].expand(B, F, -1))
        x = torch.cat([x, *extra], dim=-1) if extra else x
        if lengths is None:  # every frame valid (the fixed-length ONNX graph): nothing to pack
            return self.proj(self.lstm(x)[0]).squeeze(-1)
        if fixed_shapes:
            frames = self.proj(self._lstm_fixed(x, lengths)).squeeze(-1)  # (B, F, 2H) -> (B, F)
            return frames * (torch.arange(F, device=x.device)[None, :] < lengths[:, None])
        # Packing makes the backward direction start at each item's own last frame.
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=F)
        frames = self.proj(out).squeeze(-1)  # (B, F, 1) -> (B, F)
        valid = torch.arange(F, device=x.device)[None, :] < lengths[:, None]
        return frames * valid


    def _lstm_fixed(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The BLSTM over padded items without packing: (B, F, D) -> (B, F, 2H).

        The forward direction reads frames in order, so padding after an item never reaches its
        valid frames. For the backward direction the same rows run again with each item moved to
        the end (its padding first), so that direction starts at the item's own last frame."""
        B, F, _ = x.shape
        t = torch.arange(F, device=x.device)[None, :]
        shift = (F - lengths.clamp(0, F))[:, None]  # (B, 1)
        moved = x.gather(1, ((t - shift) % F)[..., None].expand_as(x))  # frame f at position f + shift
        out = self.lstm(torch.cat([x, moved]))[0]  # (2B, F, 2H)
        H = out.shape[-1] // 2
        back = out[B:, :, H:].gather(1, ((t + shift) % F)[..., None].expand(B, F, H))
        return torch.cat([out[:B, :, :H], back], dim=-1)


class MOSModel(nn.Module):
    """SFI-wav2vec2 backbone + MOS head. Takes waveforms at any integer sampling rate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.extractor_mode not in ("group_norm", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'group_norm' or 'layer_norm', got {cfg.extractor_mode!r}")
        self.sfi = SFIConv1d(cfg.sfi_channels, cfg.sfi_components, cfg.sfi_base_rate, cfg.sfi_kernel,
                             cfg.sfi_stride, cfg.sfi_design, cfg.sfi_freq_points, cfg.sfi_max_phases,
                             cfg.sfi_mute_above_nyquist)
        norm = MaskedGroupNorm if cfg.extractor_mode == "group_norm" else ChannelLayerNorm
        self.sfi_norm = norm(cfg.sfi_channels)
        blocks, in_ch = [], cfg.sfi_channels
        for out_ch, k, s in cfg.conv_layers:
            ln = nn.LayerNorm(out_ch) if cfg.extractor_mode == "layer_norm" else None
            blocks.append(components.ConvLayerBlock(in_ch, out_ch, k, s, cfg.conv_bias, ln))
            in_ch = out_ch
        self.convs = nn.ModuleList(blocks)
        self.encoder = components._get_encoder(
            in_features=in_ch, embed_dim=cfg.embed_dim, dropout_input=cfg.dropout,
            pos_conv_kernel=cfg.pos_conv_kernel, pos_conv_groups=cfg.pos_conv_groups, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, attention_dropout=cfg.attention_dropout, ff_interm_features=cfg.ff_dim,
            ff_interm_dropout=0.0, dropout=cfg.dropout, layer_norm_first=cfg.layer_norm_first,
            layer_drop=cfg.layer_drop)
        self.head = MOSHead(cfg)

    @property
    def device(self) -> torch.device:
        return self.sfi.mu_khz.device

    def conv_features(self, wave: torch.Tensor, lengths: torch.Tensor, sr: int) -> tuple[torch.Tensor, torch.Tensor]:
        """wave (B, T) at rate sr -> CNN features (B, F, C) at 50 frames/s, valid frames (B,)."""
        x, n = self.sfi(wave, lengths, sr)  # (B, T) -> (B, C, F0) at 3200 frames/s
        x = nn.functional.gelu(self.sfi_norm(x, n))
        for block in self.convs:
            x, n = block(x, n)
        return x.transpose(1, 2), n

    def extract_features(self, wave: torch.Tensor, lengths: torch.Tensor | None, sr: int,
                         num_layers: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-layer encoder outputs [(B, F, D)] with padded frames masked out of attention, and (B,) frames."""
        if lengths is None:
            lengths = torch.full((wave.shape[0],), wave.shape[-1], device=wave.device)
        x, n = self.conv_features(wave, lengths, sr)
        return self.encoder.extract_features(x, n, num_layers), n

    @property
    def readout_depth(self) -> int:
        """Encoder layers to run for the head: up to the one it reads (cfg.head_layer, -1 the last)."""
        return self.cfg.head_layer % self.cfg.num_layers + 1

    def readout(self, layers: list[torch.Tensor], n: torch.Tensor | None, domain: torch.Tensor | None = None,
                listener: torch.Tensor | None = None, fixed_shapes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs [(B, F, D)] (readout_depth or more), valid frames (B,) -> per-frame scores (B, F)
        (padding 0) and unclipped utterance scores (B,), the mean over valid frames. n None: all valid.
        fixed_shapes: as for MOSHead.forward."""
        frames = self.head(layers[self.readout_depth - 1], n, domain, listener, fixed_shapes)
        return frames, frames.mean(dim=1) if n is None else frames.sum(1) / n.clamp(min=1)

    def frame_scores(self, wave: torch.Tensor, lengths: torch.Tensor | None, sr: int,
                     domain: torch.Tensor | None = None, listener: torch.Tensor | None = None,
                     fixed_shapes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """wave (B, T) -> per-frame scores (B, F) (padding = 0) and valid frames (B,).
        fixed_shapes: shapes from wave's shape alone (MOSHead.forward), for batched scoring."""
        feats, n = self.extract_features(wave, lengths, sr, num_layers=self.readout_depth)
        return self.readout(feats, n, domain, listener, fixed_shapes)[0], n

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None, sr: int,
                domain: torch.Tensor | None = None, listener: torch.Tensor | None = None) -> torch.Tensor:
        """wave (B, T) -> unclipped utterance scores (B,): mean of the valid frames' scores."""
        feats, n = self.extract_features(wave, lengths, sr, num_layers=self.readout_depth)
        return self.readout(feats, n, domain, listener)[1]

    def score(self, wave, sr: int, window_s: float = DEFAULT_WINDOW_S, channel: int | None = None,
              channel_axis: int | None = None, batch_size: int | str = "auto", precision: str = "fp32"
              ) -> torch.Tensor:
        """MOS on the 1-5 scale -> (B,), under the same input rules as `utmos score`.

        `wave`: (T,), a (B, T) batch, or one multichannel recording: (T, C) as soundfile.read
        gives it is recognised, (C, T) needs channel_axis=0 (see scoring.as_waveforms). Integer
        PCM is scaled to [-1, 1]. Bad input raises AudioError (a ValueError) whose message is the
        CLI's row error. Long inputs are cut into equal windows of at most `window_s` seconds;
        the score is the mean of all frame scores, so it does not depend on where windows fall.
        batch_size and precision: as for `utmos score` (a score never depends on the rest of the batch).
        """
        need = min_samples(self, check_rate(sr))
        waves = as_waveforms(wave, sr, need, channel, channel_axis)
        return torch.tensor(score_waveforms(self, waves, sr, window_s, batch_size, precision))

    def score_files(self, paths, window_s: float = DEFAULT_WINDOW_S, channel: int | None = None,
                    batch_size: int | str = "auto", precision: str = "fp32", workers: int | None = None) -> list:
        """One rows.Row per audio file path (mos, or the CLI's one-line error), in order: `utmos score`'s
        engine, with its --batch-size, --precision and --workers."""
        return list(score_files(self, paths, window_s=window_s, channel=channel, batch_size=batch_size,
                                precision=precision, workers=workers))
