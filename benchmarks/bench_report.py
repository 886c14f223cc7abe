"""Time `utmos report` on 10,000 synthetic score rows: library call, HTML, whole CLI.

Run: .venv/bin/python benchmarks/bench_report.py [--rows 10000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from msr_utmos_cli.report import build_report
from msr_utmos_cli.report_render import render_html

RATES = (16000, 24000, 44100, 48000)


def make_data(folder: Path, rows: int, systems: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """Scores, a baseline run (same files, small drift) and truth with 3 ratings per file."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(2.0, 4.2, systems)
    sys_idx = np.arange(rows) % systems
    true = np.clip(quality[sys_idx] + rng.normal(0, 0.6, rows), 1, 5)
    pred = np.clip(true + rng.normal(0, 0.35, rows), 1, 5)
    old = np.clip(pred + rng.normal(0.02, 0.1, rows), 1, 5)
    paths = [f"/corpus/sys{s:02d}/utt{i:05d}.wav" for i, s in enumerate(sys_idx)]
    failed = rng.random(rows) < 0.005
    out = []
    for name, mos in (("scores.csv", pred), ("baseline.csv", old)):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "sample_rate", "duration_s", "mos", "error"])
            for i, p in enumerate(paths):
                w.writerow([p, RATES[i % len(RATES)], 3.0, "" if failed[i] else f"{mos[i]:.4f}",
                            "could not decode" if failed[i] else ""])
        out.append(folder / name)
    with open(folder / "truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mos", "listener"])
        for i, p in enumerate(paths):
            for listener in range(3):
                w.writerow([p, f"{np.clip(true[i] + rng.normal(0, 0.3), 1, 5):.2f}", listener])
    out.append(folder / "truth.csv")
    return tuple(out)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--systems", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="also write the HTML report here, to look at")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scores, base, truth = make_data(tmp, args.rows, args.systems)
        html = tmp / "report.html"
        cases = {
            "build_report (scores only)": lambda: build_report([scores]),
            "build_report (+ truth + baseline)": lambda: build_report([scores], truth, baseline=base),
            "build_report + render_html (+ truth + baseline)":
                lambda: render_html(build_report([scores], truth, baseline=base), html),
            "CLI: utmos report --truth --baseline --html (new process)":
                lambda: subprocess.run([sys.executable, "-m", "msr_utmos_cli", "report", str(scores),
                                        "--truth", str(truth), "--baseline", str(base), "--html", str(html)],
                                       check=True, capture_output=True),
        }
        print(f"{args.rows} score rows, {args.systems} systems, n_boot=2000; "
              f"median of {args.repeats} runs on {machine()}")
        print(f"{'case':<60} {'seconds':>8}")
        for name, fn in cases.items():
            print(f"{name:<60} {timed(fn, args.repeats):8.2f}")
        print(f"HTML size: {html.stat().st_size / 1e3:.0f} kB")
        if args.keep:
            args.keep.write_bytes(html.read_bytes())


if __name__ == "__main__":
    main()
