"""Audio I/O and pure DSP helpers. Audio is never resampled for scoring; only training uses `resample`."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

MIN_RATE = 8000      # below this the SFI layer would have fewer than 5 taps per window
MAX_RATE = 192000    # above this the taps per window (and memory) grow with no benefit for speech
READ_BLOCK = 1 << 20  # samples (all channels) read at a time: bounds memory for many-channel files
SILENCE_PEAK = 1e-5  # -100 dBFS: a file whose peak stays below this is treated as silent
SNDFILE_EXTENSIONS = frozenset(  # what libsndfile reads itself; its verdict on these is final
    {f".{k.lower()}" for k in sf.available_formats()} | {".wave", ".oga", ".opus", ".aif"})
AUDIO_EXTENSIONS = SNDFILE_EXTENSIONS | {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".au", ".caf", ".w64"}
FFMPEG_EXTENSIONS = frozenset({  # libsndfile cannot read these; ffmpeg, when installed, decodes them
    ".m4a", ".m4b", ".mp4", ".aac", ".wma", ".webm", ".mka", ".mkv", ".amr", ".awb", ".3gp", ".ac3",
    ".wv", ".ape", ".spx", ".mov"})


NAN_ERROR = "audio contains NaN or Inf samples"
SILENT_ERROR = "all-silent audio (peak below -100 dBFS)"


class AudioError(ValueError):
    """Audio that cannot be scored (a file or an array); the message is the one-line cause,
    the same for both, so a CSV row and a Python exception read alike."""


def check_rate(sr) -> int:
    """The supported rate range, one rule for files and arrays."""
    try:
        ok = not isinstance(sr, bool) and float(sr).is_integer()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AudioError(f"sampling rate {sr!r} is not a whole number of Hz")
    if not MIN_RATE <= int(sr) <= MAX_RATE:
        raise AudioError(f"sampling rate {int(sr)} Hz outside the supported {MIN_RATE}-{MAX_RATE} Hz")
    return int(sr)


def to_float32(x: np.ndarray) -> np.ndarray:
    """Samples as float32 in [-1, 1]: integer PCM is scaled by its full range, as libsndfile
    does when it reads an integer file, so an array and its file give the same samples."""
    x = np.asarray(x)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind in "iu":
        half = float(2 ** (8 * x.dtype.itemsize - 1))
        return ((x.astype(np.float64) - (half if x.dtype.kind == "u" else 0.0)) / half).astype(np.float32)
    raise AudioError(f"samples must be integer or float numbers, not {x.dtype}")


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    frames: int
    channels: int
    decoded: np.ndarray | None = field(default=None, compare=False, repr=False)  # (T, C), read through ffmpeg

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate > 0 else 0.0


def _cause(e: Exception) -> str:
    """libsndfile's message without the path it repeats (the row already names the file)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = re.sub(r"^Error opening .*?: ", "", msg)
    return msg.replace(str(getattr(e, "filename", "") or "\0"), "").strip(" :") or type(e).__name__


def _native(path: str) -> str | bytes:
    """The path libsndfile can open: a regular file (a FIFO or device would block or never end),
    as bytes so names that are not valid UTF-8 still open."""
    try:  # opening (not just stat) surfaces "Permission denied" that libsndfile reports as "System error"
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
    except (OSError, ValueError) as e:
        raise AudioError(f"cannot read audio ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(mode):
        raise AudioError("is a directory")
    if not stat.S_ISREG(mode):
        raise AudioError("not a regular file (a pipe, socket or device)")
    return path if os.name == "nt" else os.fsencode(path)


def ffmpeg_tools() -> tuple[str, str] | None:
    """(ffmpeg, ffprobe) when both are installed: they read what libsndfile cannot."""
    tools = shutil.which("ffmpeg"), shutil.which("ffprobe")
    return tools if all(tools) else None


def audio_extensions() -> frozenset[str]:
    """Extensions a directory walk scores: libsndfile's, and ffmpeg's when it is installed."""
    return AUDIO_EXTENSIONS | FFMPEG_EXTENSIONS if ffmpeg_tools() else AUDIO_EXTENSIONS


def _ffmpeg_error(p: subprocess.CompletedProcess, path: str) -> str:
    lines = p.stderr.decode("utf-8", "replace").strip().splitlines()
    msg = lines[-1].replace(f"file:{path}", "").strip(" :") if lines else f"exit status {p.returncode}"
    return f"cannot read audio (ffmpeg: {msg or 'no audio'})"


def decode_ffmpeg(path: str, cause: str) -> AudioInfo:
    """A file libsndfile cannot read (m4a/AAC, wma, ...) decoded whole by ffmpeg to float32 at its own rate.

    The channels are kept and mixed (or picked) as for any file, so a file and its decoded wav score
    alike. Raises the one-line error, with a hint, when ffmpeg is not installed."""
    ext = os.path.splitext(path)[1].lower()
    tools = ffmpeg_tools()
    if tools is None:
        hint = f"; install ffmpeg to read {ext}" if ext in FFMPEG_EXTENSIONS else ""
        raise AudioError(f"cannot read audio ({cause}){hint}")
    src = b"file:" + os.fsencode(path)  # `file:`: a name with a colon is not taken for a protocol
    p = subprocess.run([tools[1], "-v", "error", "-select_streams", "a:0", "-show_entries",
                        "stream=sample_rate,channels", "-of", "json", src], capture_output=True, stdin=subprocess.DEVNULL)
    try:
        stream = json.loads(p.stdout or b"{}").get("streams", [None])[0]
        sr, channels = int(stream["sample_rate"]), int(stream["channels"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise AudioError(_ffmpeg_error(p, path) if p.returncode else "cannot read audio (no audio stream)") from None
    check_rate(sr)
    if channels < 1:
        raise AudioError("cannot read audio (ffmpeg: no audio channels)")
    p = subprocess.run([tools[0], "-nostdin", "-v", "error", "-i", src, "-map", "0:a:0", "-ac", str(channels),
                        "-ar", str(sr), "-c:a", "pcm_f32le", "-f", "f32le", "-"],
                       capture_output=True, stdin=subprocess.DEVNULL)
    if p.returncode:
        raise AudioError(_ffmpeg_error(p, path))
    x = np.frombuffer(p.stdout, dtype="<f4")
    x = x[: x.size - x.size % channels].reshape(-1, channels)  # (T, C)
    if not x.shape[0]:
        raise AudioError("empty audio (0 samples)")
    return AudioInfo(path, sr, int(x.shape[0]), channels, x)


def probe(path: str) -> AudioInfo:
    """Header only: rate, length and channels, without reading the samples (except through ffmpeg,
    which decodes the whole file: for formats libsndfile cannot read)."""
    native = _native(path)
    try:
        info = sf.info(native)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
        if os.path.splitext(path)[1].lower() in SNDFILE_EXTENSIONS:
            raise AudioError(f"cannot read audio ({_cause(e)})") from None
        return decode_ffmpeg(path, _cause(e))
    if info.frames <= 0:
        raise AudioError("empty audio (0 samples)")
    check_rate(info.samplerate)
    return AudioInfo(path, int(info.samplerate), int(info.frames), int(info.channels))


def to_mono(x: np.ndarray, channel: int | None = None) -> np.ndarray:
    """(T, C) -> (T,): mean of the channels, or the one picked (0-based)."""
    if channel is None:
        return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if not 0 <= channel < x.shape[1]:
        raise AudioError(f"channel {channel} requested but the audio has {x.shape[1]} channel(s)")
    return x[:, channel]


def read_segment(info: AudioInfo, start: int, stop: int, channel: int | None = None) -> np.ndarray:
    """Samples [start, stop) as float32 mono, read without loading the rest of the file.

    Read in blocks of at most READ_BLOCK samples and mixed down block by block, so memory is
    one mono window whatever the channel count."""
    if info.decoded is not None:
        return to_mono(info.decoded[start:stop], channel).copy()  # writable, as a file read gives
    parts, got = [], 0
    try:
        with sf.SoundFile(_native(info.path)) as f:
            f.seek(start)
            step = max(1024, READ_BLOCK // max(f.channels, 1))
            while got < stop - start:
                x = f.read(min(step, stop - start - got), dtype="float32", always_2d=True)
                if not x.shape[0]:
                    break
                parts.append(to_mono(x, channel))
                got += x.shape[0]
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise AudioError(f"cannot read audio ({_cause(e)})") from None
    if got < stop - start:  # header promised more than the file holds
        raise AudioError(f"truncated audio (header says {info.frames} samples, data ends at {start + got})")
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.float32)


@dataclass(frozen=True)
class Span:
    """What of a file the model hears: samples [start, stop), multiplied by gain; peak of the whole file."""

    start: int
    stop: int
    gain: float
    peak: float


def input_span(read, frames: int, sr: int, rms_db: float | None, trim_db: float | None,
               pad_s: float = 0.1, need: int = 0) -> Span:
    """The level and silence rule a model was trained with, applied to any input before scoring.

    Leading and trailing samples below `trim_db` re the peak are cut, keeping `pad_s` either side
    (padding with silence then leaves the score alone), and the rest is scaled to `rms_db` dBFS RMS,
    lowered where the peak would pass 0.99 (so the level a file was rendered at leaves it alone too).
    Both are ratios to the file's own peak and energy, hence the same for the file at any gain.
    `read(a, b)` returns samples [a, b) as float32 (T,): files are read block by block, never whole.
    """
    blocks = [(a, min(a + READ_BLOCK, frames)) for a in range(0, frames, READ_BLOCK)]
    peak = max((float(np.abs(read(a, b)).max(initial=0.0)) for a, b in blocks), default=0.0)
    start, stop = 0, frames
    if trim_db is not None and peak > 0:
        thr = peak * 10 ** (trim_db / 20)
        first = next(a + int(np.argmax(np.abs(x) > thr)) for a, b in blocks if (np.abs(x := read(a, b)) > thr).any())
        last = next(a + int(np.flatnonzero(np.abs(x) > thr)[-1]) for a, b in reversed(blocks)
                    if (np.abs(x := read(a, b)) > thr).any())
        pad = int(pad_s * sr)
        start, stop = max(first - pad, 0), min(last + 1 + pad, frames)
        if stop - start < need:  # too short once trimmed: widen about the middle, within the file
            mid = (start + stop) // 2
            start = max(0, min(mid - need // 2, frames - need))
            stop = min(frames, start + need)
    gain = 1.0
    if rms_db is not None and peak > 0:
        energy = sum(float(np.square(read(a, min(a + READ_BLOCK, stop)), dtype=np.float64).sum())
                     for a in range(start, stop, READ_BLOCK))
        rms = math.sqrt(energy / max(stop - start, 1))
        gain = min(10 ** (rms_db / 20) / max(rms, 1e-12), 0.99 / peak)
    return Span(start, stop, gain, peak)


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling (torchaudio's windowed sinc). (..., T) -> (..., T')."""
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    return AF.resample(wave, orig_sr // g, new_sr // g)


def heard_at(wave: torch.Tensor, sr: int, rate: int | None, out_sr: int) -> torch.Tensor:
    """The audio as a listener at `rate` gets it (resampled there first when `rate` is below `sr`), at
    `out_sr`: what a teacher must hear to judge what a student presented at `rate` hears. (T,) -> (T',)."""
    if rate and rate < sr:
        wave, sr = resample(wave, sr, rate), rate
    return resample(wave, sr, out_sr)
