"""Sampling-frequency-independent (SFI) convolution.

Each output channel is a continuous-time latent analog filter (a sum of modulated
Gaussians). For an input at rate `fs` the layer designs discrete taps from the
analog filter and correlates them with the signal at the sample times of that rate,
so the same parameters serve every rate and no resampling is needed.

Frame geometry follows the ordinary conv it replaces: at `base_rate` frame j reads
samples [stride*j, stride*j + kernel). At any other rate frame j is centred on the
same instant, so the layer always emits base_rate / stride frames per second,
aligned with the base-rate output. When that hop is a non-integer number of samples
(24 kHz: 7.5, 44.1 kHz: 13.78) consecutive frames sit at different fractional
offsets from the sample grid; each distinct offset ("phase") gets its own taps.
"""
from __future__ import annotations

import math

import torch
from torch import nn

TWO_PI = 2.0 * math.pi

# The 0.625 ms window cannot realise filters much narrower than ~1 kHz, so the published
# initial bandwidth (100 Hz) would make the taps differ between rates; start wider.
INIT_SIGMA_HZ = 1500.0
SIGMA_FLOOR_HZ = 150.0
PEAK_GRID_HZ = torch.arange(0.0, 96000.0 + 1.0, 25.0, dtype=torch.float64)


def mgf_response(w: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, phi: torch.Tensor,
                 amp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary part of the modulated-Gaussian analog response.

    H(w) = sum_j amp_j [e^{i phi_j} G(w - mu_j) + e^{-i phi_j} G(w + mu_j)],  G(v) = exp(-v^2 / 2 sigma_j^2)
    (the second term makes the impulse response real). Shapes: w (M,), params (C, J) -> (C, M) each.
    """
    w = w[None, None, :]
    mu, sigma, phi, amp = (p[..., None] for p in (mu, sigma, phi, amp))
    g_pos = torch.exp(-0.5 * ((w - mu) / sigma) ** 2)
    g_neg = torch.exp(-0.5 * ((w + mu) / sigma) ** 2)
    re = amp * torch.cos(phi) * (g_pos + g_neg)
    im = amp * torch.sin(phi) * (g_pos - g_neg)
    return re.sum(1), im.sum(1)


def mgf_impulse(t: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, phi: torch.Tensor,
                amp: torch.Tensor) -> torch.Tensor:
    """Impulse response of `mgf_response` (its inverse Fourier transform). (..., L) times, (C, J) -> (C, ..., L)."""
    shape = (mu.shape[0], mu.shape[1]) + (1,) * t.dim()
    mu, sigma, phi, amp = (p.reshape(shape) for p in (mu, sigma, phi, amp))
    h = amp * sigma / math.sqrt(TWO_PI) * 2.0 * torch.exp(-0.5 * (sigma * t) ** 2) * torch.cos(mu * t + phi)
    return h.sum(1)


class FrameGeometry:
    """Integer bookkeeping of where each output frame's window falls on the sample grid of `fs`.

    Window of frame j (seconds, half-open): [(stride*j - 1/2)/base_rate, (stride*j + kernel - 1/2)/base_rate).
    All arithmetic is exact on integers, so long inputs do not drift.
    """

    def __init__(self, fs: int, base_rate: int, kernel: int, stride: int, max_phases: int):
        if int(fs) != fs or fs <= 0:
            raise ValueError(f"sampling rate must be a positive integer, got {fs}")
        self.fs, self.base_rate, self.kernel, self.stride = int(fs), base_rate, kernel, stride
        self.den = 2 * base_rate  # time unit of offsets: 1 / (2 * base_rate * fs) seconds
        self.period = self.den // math.gcd(2 * stride * self.fs, self.den)  # frames before the offsets repeat
        self.taps = math.ceil(kernel * self.fs / base_rate) + 1  # upper bound of samples in one window
        self.left_pad = math.ceil(self.fs / self.den) + 1
        offsets = [self._first_sample(j)[1] for j in range(self.period)]  # in [0, den)
        if self.period <= max_phases:
            self.phase_of_position = list(range(self.period))
            self.phase_offsets = offsets
        else:  # rare rates (e.g. 7999 Hz): share taps between offsets closer than den / max_phases
            levels = [round(r * max_phases / self.den) for r in offsets]
            uniq = sorted(set(levels))
            index = {lv: i for i, lv in enumerate(uniq)}
            self.phase_of_position = [index[lv] for lv in levels]
            self.phase_offsets = [lv * self.den / max_phases for lv in uniq]

    def _first_sample(self, j: int) -> tuple[int, int]:
        num = (2 * self.stride * j - 1) * self.fs
        first = -((-num) // self.den)  # ceil(num / den)
        return first, first * self.den - num

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Frames whose whole window lies inside `num_samples`: the same count as the base-rate conv."""
        n = (num_samples * self.base_rate - self.kernel * self.fs) // (self.stride * self.fs) + 1
        return n.clamp(min=0)

    def tap_times(self) -> torch.Tensor:
        """Time of each tap relative to its window centre, per phase: (P, L) seconds, NaN outside the window."""
        k = torch.arange(self.taps, dtype=torch.float64)
        offs = torch.tensor(self.phase_offsets, dtype=torch.float64)[:, None]
        ticks = offs + 2 * self.base_rate * k  # in 1 / (den * fs) s from the window start
        t = ticks / (self.den * self.fs) - self.kernel / (2 * self.base_rate)
        return t.masked_fill(ticks >= 2 * self.kernel * self.fs, float("nan"))

    def frame_index(self, num_frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """First (left-padded) sample of every frame, and its phase id: (F,), (F,)."""
        j = torch.arange(num_frames, device=device, dtype=torch.int64)
        num = (2 * self.stride * j - 1) * self.fs
        first = torch.div(num + self.den - 1, self.den, rounding_mode="floor") + self.left_pad
        pos = torch.tensor(self.phase_of_position, device=device, dtype=torch.int64)
        return first, pos[j % self.period]


def _lstsq_operator(times: torch.Tensor, fs: int, points: int) -> torch.Tensor:
    """Least-squares map from a target response sampled at `points` frequencies in [0, fs/2]
    to taps at `times`: (P, L) -> (P, L, 2 * points), float64. Taps outside the window stay zero."""
    w = torch.linspace(0.0, math.pi * fs, points, dtype=torch.float64)
    valid = ~torch.isnan(times)
    t = torch.nan_to_num(times)
    # D(w) = sum_k h_k e^{-i w t_k}:  Re = cos(w t) h,  Im = -sin(w t) h
    arg = w[None, :, None] * t[:, None, :]  # (P, M, L)
    a = torch.cat([torch.cos(arg), -torch.sin(arg)], dim=1) * valid[:, None, :]
    return torch.linalg.pinv(a, rtol=1e-10)


class SFIConv1d(nn.Module):
    """First conv of a wav2vec2 feature extractor, for audio at any integer sampling rate.

    Args:
        channels: output channels (512 in wav2vec2-base).
        components: modulated Gaussians summed per channel (1 = the published MGF).
        base_rate, kernel, stride: the ordinary conv it stands in for (16 kHz, 10, 5).
        design: "freq" fits the analog response below Nyquist by least squares (nothing
            aliases); "time" samples the impulse response (cheaper, aliases at low rates).
        freq_points: frequencies in the least-squares fit.
        max_phases: distinct fractional offsets given their own taps before sharing.
        mute_above_nyquist: below the base rate, switch off channels whose peak lies above fs/2.
            The "time" design needs it (those taps alias). The "freq" design only fits the response
            below Nyquist, so an unmuted channel keeps its in-band skirt, which it also has at the
            base rate: a band-limited clip then gives the same channel at 8 kHz as at 16 kHz.
    """

    def __init__(self, channels: int = 512, components: int = 1, base_rate: int = 16000, kernel: int = 10,
                 stride: int = 5, design: str = "freq", freq_points: int = 640, max_phases: int = 128,
                 mute_above_nyquist: bool = True):
        super().__init__()
        if design not in ("freq", "time"):
            raise ValueError(f"design must be 'freq' or 'time', got {design!r}")
        if base_rate % stride:
            raise ValueError("base_rate / stride must be an integer frame rate")
        self.channels, self.components = channels, components
        self.base_rate, self.kernel, self.stride = base_rate, kernel, stride
        self.design, self.freq_points, self.max_phases = design, freq_points, max_phases
        self.mute_above_nyquist = mute_above_nyquist
        # Analog parameters, in kHz so that Adam's step sizes suit them.
        self.mu_khz = nn.Parameter(torch.zeros(channels, components))
        self.log_sigma_khz = nn.Parameter(torch.zeros(channels, components))
        self.phi = nn.Parameter(torch.zeros(channels, components))
        self.amp = nn.Parameter(torch.zeros(channels, components))
        self._geometry: dict[int, FrameGeometry] = {}
        self._operators: dict[int, torch.Tensor] = {}
        self._taps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    @property
    def frame_rate(self) -> int:
        return self.base_rate // self.stride

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Centres equally spaced on the ERB scale from 50 Hz to the base Nyquist, random phases."""
        erb = lambda f: 21.4 * math.log10(1 + 0.00437 * f)  # noqa: E731
        inv = lambda e: (10 ** (e / 21.4) - 1) / 0.00437  # noqa: E731
        lo, hi = erb(50.0), erb(self.base_rate / 2)
        centres = torch.tensor([inv(lo + (hi - lo) * i / max(self.channels - 1, 1)) for i in range(self.channels)])
        with torch.no_grad():
            self.mu_khz.copy_((centres / 1000)[:, None].expand(-1, self.components))
            self.log_sigma_khz.fill_(math.log(INIT_SIGMA_HZ / 1000))
            self.phi.copy_(torch.rand(self.channels, self.components, generator=generator) * math.pi)
            self.amp.zero_()
            self.amp[:, 0] = 1.0
        self._taps.clear()

    def analog_params(self) -> tuple[torch.Tensor, ...]:
        """(mu, sigma, phi, amp) in rad/s, each (C, J)."""
        sigma = torch.exp(self.log_sigma_khz.clamp(min=math.log(SIGMA_FLOOR_HZ / 1000)))
        return TWO_PI * 1000 * self.mu_khz, TWO_PI * 1000 * sigma, self.phi, self.amp

    def geometry(self, fs: int) -> FrameGeometry:
        if fs not in self._geometry:
            self._geometry[fs] = FrameGeometry(fs, self.base_rate, self.kernel, self.stride, self.max_phases)
        return self._geometry[fs]

    def peak_hz(self) -> torch.Tensor:
        """Frequency of each channel's largest analog response, on a 25 Hz grid. (C,)"""
        with torch.no_grad():
            grid = PEAK_GRID_HZ.to(self.mu_khz.device, torch.float32)
            re, im = mgf_response(TWO_PI * grid, *self.analog_params())
            return grid[(re ** 2 + im ** 2).argmax(dim=1)]

    def active_channels(self, fs: int) -> torch.Tensor:
        """Anti-aliasing: below the base rate, channels whose peak lies above fs/2 are off. (C,) bool."""
        if fs >= self.base_rate or not self.mute_above_nyquist:
            return torch.ones(self.channels, dtype=torch.bool, device=self.mu_khz.device)
        return self.peak_hz() < fs / 2

    def taps(self, fs: int) -> torch.Tensor:
        """Discrete taps for rate `fs`, one set per phase: (P, C, L). Differentiable in the analog params."""
        geo = self.geometry(fs)
        params = self.analog_params()
        dtype = self.mu_khz.dtype
        times = geo.tap_times().to(self.mu_khz.device)
        if self.design == "time":
            h = mgf_impulse(torch.nan_to_num(times).to(dtype), *params) / fs  # (C, P, L)
            h = (h * (~torch.isnan(times)).to(dtype)).transpose(0, 1)
        else:
            if fs not in self._operators:
                self._operators[fs] = _lstsq_operator(geo.tap_times(), fs, self.freq_points)
            op = self._operators[fs].to(self.mu_khz.device, dtype)  # (P, L, 2M)
            w = torch.linspace(0.0, math.pi * fs, self.freq_points, device=op.device, dtype=dtype)
            re, im = mgf_response(w, *params)
            target = torch.cat([re, im], dim=1)  # (C, 2M)
            h = torch.einsum("plm,cm->pcl", op, target)
        return h * self.active_channels(fs)[None, :, None].to(dtype)

    def _cached_taps(self, fs: int) -> torch.Tensor:
        """Taps are fixed between parameter updates, so inference designs them once per rate."""
        if torch.is_grad_enabled() and self.mu_khz.requires_grad:
            return self.taps(fs)
        params = (self.mu_khz, self.log_sigma_khz, self.phi, self.amp)
        # inference tensors (a model loaded under torch.inference_mode) keep no version counter
        key = (fs, self.mu_khz.device, self.mu_khz.dtype) + tuple(
            (p.data_ptr(), -1 if p.is_inference() else p._version) for p in params)
        hit = self._taps.get(fs)
        if hit is None or hit[0] != key:
            self._taps[fs] = (key, self.taps(fs).detach())
        return self._taps[fs][1]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, fs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) at rate fs, lengths (B,) valid samples -> (B, C, F) frames, (B,) valid frames."""
        geo = self.geometry(int(fs))
        out_lengths = geo.num_frames(lengths)
        frames = int(geo.num_frames(torch.tensor(x.shape[-1])).item())
        taps = self._cached_taps(int(fs)).to(x.dtype)
        x = nn.functional.pad(x, (geo.left_pad, geo.taps))
        first, phase = geo.frame_index(frames, x.device)
        out = x.new_zeros(x.shape[0], self.channels, frames)
        offsets = torch.arange(geo.taps, device=x.device)
        for p in range(taps.shape[0]):
            idx = (phase == p).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            windows = x[:, first[idx, None] + offsets]  # (B, F_p, L)
            out[:, :, idx] = torch.einsum("bfl,cl->bcf", windows, taps[p]).to(out.dtype)  # bf16 under autocast
        return out, out_lengths

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, components={self.components}, base_rate={self.base_rate}, "
                f"kernel={self.kernel}, stride={self.stride}, design={self.design!r}, "
                f"mute_above_nyquist={self.mute_above_nyquist}")


def fit_to_kernel(layer: SFIConv1d, weight: torch.Tensor, refine_steps: int = 300, lr: float = 0.01,
                  ridge: float = 1e-6) -> float:
    """Fit the analog filters so that the taps at the base rate reproduce an ordinary conv kernel.

    Used to initialise a student from a 16 kHz teacher's first conv. Components start on a
    fixed frequency grid, where the response is linear in (amp cos phi, amp sin phi), so a
    least-squares solve gives the starting point; Adam then refines all parameters.
    With components >= kernel / 2 the fit can be exact. weight: (C, 1, kernel).
    Returns the relative error ||taps - weight|| / ||weight|| over all channels.
    """
    C, J, K, fs = layer.channels, layer.components, layer.kernel, layer.base_rate
    target = weight.detach().reshape(C, K).to(torch.float64)
    nyq = fs / 2
    grid = torch.linspace(0.0, nyq, J, dtype=torch.float64) if J > 1 else torch.tensor([nyq / 4], dtype=torch.float64)
    sigma_hz = max(0.75 * nyq / max(J - 1, 1), SIGMA_FLOOR_HZ)
    op = _lstsq_operator(layer.geometry(fs).tap_times()[:1], fs, layer.freq_points)[0, :K]  # (K, 2M)
    w = torch.linspace(0.0, math.pi * fs, layer.freq_points, dtype=torch.float64)
    ones = torch.ones(J, J, dtype=torch.float64)
    eye = torch.eye(J, dtype=torch.float64)
    mu, sig = TWO_PI * grid.expand(J, J), torch.full((J, J), TWO_PI * sigma_hz, dtype=torch.float64)
    basis = []
    for phi in (0.0, math.pi / 2):  # a = amp cos(phi) and b = amp sin(phi) directions, one component each
        re, im = mgf_response(w, mu, sig, torch.full((J, J), phi, dtype=torch.float64), eye * ones)
        basis.append(torch.cat([re, im], dim=1) @ op.T)  # (J, K)
    B = torch.cat(basis, dim=0)  # (2J, K)
    coef = torch.linalg.solve(B @ B.T + ridge * torch.eye(2 * J, dtype=torch.float64), B @ target.T).T  # (C, 2J)
    a, b = coef[:, :J], coef[:, J:]
    with torch.no_grad():
        layer.mu_khz.copy_((grid / 1000).expand(C, J))
        layer.log_sigma_khz.fill_(math.log(sigma_hz / 1000))
        layer.phi.copy_(torch.atan2(b, a))
        layer.amp.copy_(torch.hypot(a, b))
    params = [layer.mu_khz, layer.log_sigma_khz, layer.phi, layer.amp]
    opt = torch.optim.Adam(params, lr=lr)
    tgt = target.float()
    scale = tgt.norm(dim=1, keepdim=True).clamp(min=1e-8)
    best = None
    for _ in range(refine_steps + 1):
        opt.zero_grad(set_to_none=True)
        err = ((layer.taps(fs)[0, :, :K] - tgt) / scale).pow(2).sum()
        if best is None or err.item() < best[0]:
            best = (err.item(), [p.detach().clone() for p in params])
        err.backward()
        opt.step()
    with torch.no_grad():
        for p, v in zip(params, best[1]):
            p.copy_(v)
        layer._taps.clear()
        taps = layer.taps(fs)[0, :, :K].double()
    return float((taps - target).norm() / target.norm())
