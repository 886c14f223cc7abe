"""What the bandwidth_hz column costs `utmos score`: the same files scored with and without it, in one process.

    python benchmarks/bench_bandwidth.py [--model NAME|PATH] [--files 24] [--seconds 3] [--repeats 5]

Synthetic speech-like clips at 8-48 kHz; prints audio seconds per CPU second (median of interleaved
repeats, after a warm-up) with the column and with its measurement switched off, and their ratio.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

from msr_utmos_cli import load_model, scoring
from msr_utmos_cli.output import write_scores
from msr_utmos_cli.testing import speechlike

RATES = (8000, 16000, 22050, 24000, 44100, 48000)


def timed_pair(fn, repeats: int, clock=time.process_time) -> tuple[float, float]:
    """Median time of fn with the bandwidth measured and switched off, runs interleaved so load on a
    shared machine falls on both alike. CPU time by default: on a busy machine wall time mostly measures
    the neighbours."""
    measure = scoring.file_bandwidth
    skip = lambda info, channel=None: None  # noqa: E731
    fn()
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(repeats):
            for on in (True, False):
                scoring.file_bandwidth = measure if on else skip
                t0 = clock()
                fn()
                times[on].append(clock() - t0)
    finally:
        scoring.file_bandwidth = measure
    return statistics.median(times[True]), statistics.median(times[False])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is not spin-waiting)")
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.files):
            sr = RATES[i % len(RATES)]
            sf.write(Path(d) / f"{i:03d}_{sr}.wav", speechlike(sr, args.seconds, seed=i), sr, subtype="PCM_16")
        out = str(Path(d) / "scores.csv")
        with_bw, without = timed_pair(lambda: write_scores(model, [d], out, overwrite=True), args.repeats)
    audio = args.files * args.seconds
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"{args.files} x {args.seconds:g} s at 8-48 kHz")
    print(f"with bandwidth_hz {audio / with_bw:.1f} audio s per CPU s, without {audio / without:.1f}: "
          f"the column costs {100 * (with_bw / without - 1):.1f} % of the scoring time")


if __name__ == "__main__":
    main()
