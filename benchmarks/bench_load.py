"""Load benchmark for `utmos score`: many short files and one 2-hour file.

    python benchmarks/bench_load.py                       # 20,000 files + 200-file baseline + 2 h file, tiny model
    python benchmarks/bench_load.py --preset small --files 5000 --time-limit 300

Reports peak RSS of the `utmos` process (VmHWM), time to the first row on disk (the walk is lazy,
so it must not grow with the number of files), and throughput against a 200-file directory.
A run that passes --time-limit is stopped there and its figures cover the rows written so far.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from msr_utmos_cli import PRESETS
from msr_utmos_cli.testing import random_model, speechlike, write_long_wav

RATES = [8000, 16000, 22050, 24000, 44100, 48000]


def make_files(root: Path, n: int, per_dir: int = 1000) -> float:
    """n files of 0.5-1 s at mixed rates, `per_dir` per folder; returns total audio seconds."""
    rng = np.random.default_rng(0)
    base = {sr: (speechlike(sr, 1.0, seed=i) * 32767).astype(np.int16) for i, sr in enumerate(RATES)}
    total = 0.0
    for i in range(n):
        sr = RATES[i % len(RATES)]
        d = root / f"d{i // per_dir:03d}"
        d.mkdir(parents=True, exist_ok=True)
        k = int(sr * rng.uniform(0.5, 1.0))
        sf.write(d / f"f{i:06d}_{sr}.wav", base[sr][:k], sr, subtype="PCM_16")
        total += k / sr
    return total


def peak_rss_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_score(inputs: list[str], model: Path, out: Path, time_limit: float | None) -> dict:
    """Run `utmos score`, polling its output and VmHWM; returns timings, rows and peak RSS."""
    cmd = [sys.executable, "-m", "msr_utmos_cli", "score", *inputs, "--model", str(model), "--out", str(out),
           "-q", "--device", "cpu", "--overwrite"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    first, peak, stopped = None, 0.0, False
    while p.poll() is None:
        peak = max(peak, peak_rss_mb(p.pid))
        if first is None and out.exists() and out.read_bytes().count(b"\n") >= 2:
            first = time.monotonic() - t0
        if time_limit is not None and time.monotonic() - t0 > time_limit:
            stopped = True
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    wall = time.monotonic() - t0
    rows = max(0, out.read_bytes().count(b"\n") - 1) if out.exists() else 0
    return {"wall_s": wall, "first_row_s": first, "rows": rows, "peak_rss_mb": peak, "stopped": stopped,
            "rc": p.returncode, "stderr": p.stderr.read().decode()[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--baseline-files", type=int, default=200)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--time-limit", type=float, default=None, help="stop each run after this many seconds")
    ap.add_argument("--no-long", action="store_true", help="skip the 2-hour file")
    ap.add_argument("--tmp", default=None, help="where to write the audio (default: a temp dir)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="utmos_load_", dir=args.tmp))
    try:
        model = random_model(root / "model", args.preset)
        t = time.monotonic()
        audio_big = make_files(root / "big", args.files)
        audio_small = make_files(root / "small", args.baseline_files)
        print(f"made {args.files}+{args.baseline_files} files in {time.monotonic() - t:.0f} s", flush=True)
        results = [("200-file dir", args.baseline_files, audio_small,
                    run_score([str(root / "small")], model, root / "small.csv", args.time_limit)),
                   (f"{args.files}-file dir", args.files, audio_big,
                    run_score([str(root / "big")], model, root / "big.csv", args.time_limit))]
        if not args.no_long:
            write_long_wav(root / "two_hours.wav")
            r = run_score([str(root / "two_hours.wav")], model, root / "long.csv", args.time_limit)
            lines = (root / "long.csv").read_text().splitlines() if (root / "long.csv").exists() else []
            r["score"] = lines[1] if len(lines) > 1 else "(not finished)"
            results.append(("one 2 h file, 8 kHz", 1, 7200.0, r))

        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s) visible, "
              f"load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}, "
              f"model preset {args.preset!r}, CPU")
        print(f"{'input':<22}{'files':>7}{'rows':>7}{'wall s':>8}{'1st row s':>10}{'files/s':>9}"
              f"{'audio x RT':>11}{'peak RSS MB':>12}")
        for name, n, audio, r in results:
            rate = r["rows"] / r["wall_s"] if r["wall_s"] else float("nan")
            rt = audio * r["rows"] / n / r["wall_s"]
            first = f"{r['first_row_s']:.1f}" if r["first_row_s"] is not None else "-"
            note = " (stopped at the time limit)" if r["stopped"] else "" if r["rc"] == 0 else f" rc={r['rc']}"
            print(f"{name:<22}{n:>7}{r['rows']:>7}{r['wall_s']:>8.1f}{first:>10}{rate:>9.1f}{rt:>11.1f}"
                  f"{r['peak_rss_mb']:>12.0f}{note}")
            if "score" in r:
                print(f"  2 h file row: {r['score']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
