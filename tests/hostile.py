"""Hostile audio files for robustness tests: broken headers, odd formats, odd paths.

    from hostile import make_suite, wav_header
    cases = make_suite(tmp_dir)          # [Case(name, path, expect, cause)]

Every case says what a correct scorer does with it: `expect="mos"` (scores) or `expect="error"`
(one error row whose message contains `cause`). `expect="any"` means either is acceptable, as long
as it is exactly one row and nothing crashes. Nothing here needs a network or fixture files.
"""
from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from msr_utmos_cli.testing import write_long_wav


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    expect: str       # "mos", "error" or "any"
    cause: str = ""   # substring of the error message when expect == "error"


def wav_header(rate: int, channels: int = 1, bits: int = 16, data_bytes: int = 0, fmt_tag: int = 1,
               block_align: int | None = None, byte_rate: int | None = None, riff_size: int | None = None,
               fmt_size: int = 16) -> bytes:
    """A canonical 44-byte RIFF/WAVE header; every field can be made to lie."""
    block_align = channels * ((bits + 7) // 8) if block_align is None else block_align
    byte_rate = rate * block_align if byte_rate is None else byte_rate
    fmt = struct.pack("<HHIIHH", fmt_tag & 0xFFFF, channels & 0xFFFF, rate & 0xFFFFFFFF,
                      byte_rate & 0xFFFFFFFF, block_align & 0xFFFF, bits & 0xFFFF)
    fmt = fmt + b"\0" * max(0, fmt_size - 16)
    riff = 4 + 8 + len(fmt) + 8 + data_bytes if riff_size is None else riff_size
    return (b"RIFF" + struct.pack("<I", riff & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", fmt_size)
            + fmt + b"data" + struct.pack("<I", data_bytes & 0xFFFFFFFF))


def speech(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Cheap speech-like signal: a few harmonics under a syllable-rate envelope, float32 (T,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = rng.uniform(90, 220)
    if not t.size:
        return np.zeros(0, np.float32)
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6) if f0 * k < sr / 2)
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) + 0.01 * rng.standard_normal(t.shape)
    return (0.4 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def _pcm(path, x, sr, subtype, fmt=None):
    sf.write(str(path), x, sr, subtype=subtype, format=fmt)


def make_suite(root: str | os.PathLike, long_file: bool = False, odd_paths: bool = True) -> list[Case]:
    """Write the hostile suite under `root` and return its cases (one row each when scored).

    `long_file` adds the 2-hour 8 kHz file (230 MB, a few seconds to write)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    sr = 16000
    x = speech(sr, 0.6)

    def add(name, expect, cause=""):
        cases.append(Case(name, str(root / name), expect, cause))

    # --- broken containers ---------------------------------------------------
    (root / "zero_bytes.wav").write_bytes(b"")
    add("zero_bytes.wav", "error", "cannot read")
    (root / "header_only.wav").write_bytes(wav_header(sr, 1, 16, 0))
    add("header_only.wav", "error", "empty")
    _pcm(root / "truncated_mid_frame.wav", np.stack([x, x], 1), sr, "PCM_24")  # 6-byte frames
    full = (root / "truncated_mid_frame.wav").read_bytes()
    (root / "truncated_mid_frame.wav").write_bytes(full[: 44 + 6 * (len(x) // 2) + 4])  # cut inside a frame
    add("truncated_mid_frame.wav", "any")
    (root / "header_lies_4gb.wav").write_bytes(wav_header(sr, 1, 16, 0xFFFFFFF0) + (x * 32767).astype("<i2").tobytes())
    add("header_lies_4gb.wav", "any")
    (root / "garbage_after_riff.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    add("garbage_after_riff.wav", "error", "cannot read")
    (root / "text.wav").write_text("this is not audio\n" * 50)
    add("text.wav", "error", "cannot read")
    (root / "random.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    add("random.flac", "error", "cannot read")
    buf = root / "_tmp.flac"
    _pcm(buf, x, sr, "PCM_16")
    os.replace(buf, root / "flac_named.wav")
    add("flac_named.wav", "mos")
    _pcm(root / "wav_named.mp3", x, sr, "PCM_16", "WAV")
    add("wav_named.mp3", "mos")

    # --- sample formats and content -----------------------------------------
    for st in ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"):
        _pcm(root / f"fmt_{st.lower()}.wav", x, sr, st)
        add(f"fmt_{st.lower()}.wav", "mos")
    for name, val in (("nan", np.nan), ("inf", np.inf), ("neg_inf", -np.inf)):
        y = x.copy()
        y[len(y) // 3] = val
        _pcm(root / f"float_{name}.wav", y, sr, "FLOAT")
        add(f"float_{name}.wav", "error", "NaN or Inf")
    _pcm(root / "float_huge.wav", x * np.float32(1e30), sr, "FLOAT")  # finite but absurd
    add("float_huge.wav", "any")
    _pcm(root / "all_zero.wav", np.zeros_like(x), sr, "PCM_16")
    add("all_zero.wav", "error", "silent")
    _pcm(root / "dc_only.wav", np.full_like(x, 0.5), sr, "PCM_16")
    add("dc_only.wav", "mos")
    _pcm(root / "clipped_full_scale.wav", np.sign(x).astype(np.float32), sr, "PCM_16")
    add("clipped_full_scale.wav", "mos")
    _pcm(root / "one_sample.wav", x[:1], sr, "PCM_16")
    add("one_sample.wav", "error", "too short")
    _pcm(root / "ten_ms.wav", x[: sr // 100], sr, "PCM_16")
    add("ten_ms.wav", "error", "too short")
    for ch in range(1, 9):
        _pcm(root / f"channels_{ch}.wav", np.stack([speech(sr, 0.5, seed=c) for c in range(ch)], 1), sr, "PCM_16")
        add(f"channels_{ch}.wav", "mos")

    # --- sampling rates -----------------------------------------------------
    for rate, expect in ((1, "error"), (4000, "error"), (7999, "error"), (8000, "mos"), (192000, "mos"),
                         (384000, "error"), (1000000, "error")):
        y = speech(rate, 0.5) if rate >= 1000 else np.full(4, 0.3, np.float32)
        (root / f"rate_{rate}.wav").write_bytes(wav_header(rate, 1, 16, 2 * len(y)) + (y * 32767).astype("<i2").tobytes())
        add(f"rate_{rate}.wav", expect, "outside the supported" if expect == "error" else "")

    if long_file:
        write_long_wav(root / "two_hours_8k.wav")
        add("two_hours_8k.wav", "mos")

    if odd_paths:
        cases += make_odd_paths(root / "odd")
    return cases


def make_odd_paths(root: str | os.PathLike) -> list[Case]:
    """Odd names and odd file types. Paths are as a directory walk of `root` reports them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sr = 16000
    x = speech(sr, 0.5, seed=3)
    cases: list[Case] = []

    def add(name, expect, cause=""):
        cases.append(Case(name, os.path.join(str(root), name), expect, cause))

    for name in ("with space.wav", "ünïcødé 音声.wav", "-leading-dash.wav", "--help.wav", "quote\"comma,.wav",
                 "new\nline.wav"):
        sf.write(str(root / name), x, sr)
        add(name, "mos")
    if sys.platform != "darwin":  # a file name that is not valid UTF-8
        bad = os.fsdecode(os.fsencode(str(root)) + b"/latin1-\xe9t\xe9.wav")
        sf.write(os.fsencode(bad), x, sr, format="WAV")
        cases.append(Case(os.path.basename(bad), bad, "mos"))
    os.symlink("with space.wav", root / "symlink.wav")
    add("symlink.wav", "mos")
    os.symlink("loop_b.wav", root / "loop_a.wav")
    os.symlink("loop_a.wav", root / "loop_b.wav")
    add("loop_a.wav", "error", "cannot read")
    add("loop_b.wav", "error", "cannot read")
    os.symlink("does-not-exist.wav", root / "dangling.wav")
    add("dangling.wav", "error", "cannot read")
    os.mkfifo(root / "fifo.wav")  # opening it for reading would block forever
    add("fifo.wav", "error", "not a regular file")
    os.symlink("/dev/zero", root / "dev_zero.wav")  # endless zeros
    add("dev_zero.wav", "error", "not a regular file")
    (root / "dir_named.wav").mkdir()  # a directory named like a file: walked, not scored
    sf.write(str(root / "dir_named.wav" / "inner.wav"), x, sr)
    cases.append(Case("dir_named.wav/inner.wav", str(root / "dir_named.wav" / "inner.wav"), "mos"))
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up_loop")  # a directory loop: walked once
    return cases
