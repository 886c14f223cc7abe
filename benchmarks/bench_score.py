"""Scoring throughput and memory: `utmos score`'s pipeline vs a bare torchaudio wav2vec2 forward.

    python benchmarks/bench_score.py [--preset base] [--files 24] [--seconds 6] [--repeats 3] [--long-minutes 30]

Prints audio seconds per wall second (median of repeats) for
  - bare:     torchaudio.models.wav2vec2_base() forward on the 16 kHz audio (batch of equal-length clips),
  - pipeline: write_scores() over the same files as WAVs (read, window, SFI layer, encoder, head, CSV),
  - mixed:    the pipeline over the same audio written at 8-48 kHz,
and the peak RSS of scoring one long file in a fresh process. Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from msr_utmos_cli import PRESETS, load_model
from msr_utmos_cli.checkpoint import parse_device
from msr_utmos_cli.output import write_scores
from msr_utmos_cli.testing import random_model, speechlike

MIXED = [8000, 16000, 22050, 24000, 44100, 48000]


def timed(fn, repeats):
    fn()  # warm-up: kernel selection, tap design, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def long_file_peak(model_dir: str, minutes: float, device: str) -> tuple[float, float]:
    code = f"""
import resource, time, numpy as np, soundfile as sf, tempfile, os
from msr_utmos_cli import load_model
from msr_utmos_cli.output import write_scores
d = tempfile.mkdtemp(); p = os.path.join(d, "long.wav")
sr = 16000; rng = np.random.default_rng(0)
with sf.SoundFile(p, "w", sr, 1, "PCM_16") as f:
    for _ in range(int({minutes} * 60)):
        f.write((0.1 * rng.standard_normal(sr)).astype(np.float32))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = load_model({model_dir!r}, {device!r})
t0 = time.perf_counter()
s = write_scores(m, [p], os.path.join(d, "out.csv"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t0, s["scored"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="the bare baseline's batch")
    ap.add_argument("--long-minutes", type=float, default=30.0, help="0 skips the long-file run")
    ap.add_argument("--device", default="auto", type=lambda s: str(parse_device(s)))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = load_model(random_model(tmp / "model", args.preset), args.device)
    clips = [speechlike(16000, args.seconds, seed=i) for i in range(args.files)]
    (tmp / "w16").mkdir()
    (tmp / "mixed").mkdir()
    for i, x in enumerate(clips):
        sf.write(tmp / "w16" / f"{i:04d}.wav", x, 16000)
        sr = MIXED[i % len(MIXED)]
        sf.write(tmp / "mixed" / f"{i:04d}.wav", speechlike(sr, args.seconds, seed=i), sr)
    audio_s = args.files * args.seconds

    bare = torchaudio.models.wav2vec2_base().eval().to(args.device)
    batch = torch.from_numpy(np.stack(clips)).to(args.device)

    def run_bare():
        with torch.inference_mode():
            for i in range(0, len(batch), args.batch_size):
                bare(batch[i:i + args.batch_size])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_pipeline(folder):
        return lambda: write_scores(model, [str(tmp / folder)], str(tmp / "out.csv"), overwrite=True)

    t_bare = timed(run_bare, args.repeats)
    t_pipe = timed(run_pipeline("w16"), args.repeats)
    t_mixed = timed(run_pipeline("mixed"), args.repeats)
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({cpu}, {os.cpu_count()} cores)"
    print(f"\nmachine: {dev}; torch {torch.__version__}; {args.files} files x {args.seconds:.0f} s; "
          f"bare batch {args.batch_size}; median of {args.repeats}")
    print(f"{'run':<44}{'wall s':>9}{'audio s / s':>13}{'vs bare':>9}")
    print(f"{'bare torchaudio wav2vec2_base forward, 16 kHz':<44}{t_bare:>9.2f}{audio_s / t_bare:>13.1f}{1.0:>9.2f}")
    print(f"{'utmos score pipeline (' + args.preset + '), same 16 kHz WAVs':<44}{t_pipe:>9.2f}"
          f"{audio_s / t_pipe:>13.1f}{t_pipe / t_bare:>9.2f}")
    print(f"{'utmos score pipeline (' + args.preset + '), 8-48 kHz WAVs':<44}{t_mixed:>9.2f}"
          f"{audio_s / t_mixed:>13.1f}{t_mixed / t_bare:>9.2f}")
    if args.long_minutes > 0:
        peak, wall = long_file_peak(str(tmp / "model"), args.long_minutes, args.device)
        print(f"one {args.long_minutes:.0f}-minute 16 kHz file: peak RSS {peak:.0f} MiB, {wall:.1f} s wall "
              f"({args.long_minutes * 60 / wall:.1f} audio s / s)")


if __name__ == "__main__":
    main()
