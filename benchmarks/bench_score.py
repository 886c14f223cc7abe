"""Scoring throughput and memory: batch sizes against each other, and the pipeline against a bare forward.

    python benchmarks/bench_score.py --batch-sizes 1,4 [--devices cpu,cuda] [--precisions fp32,bf16]
                                     [--workers 0,4] [--files 24] [--base-files 6] [--repeats 3]
                                     [--models bundled,msr-utmos-spec-distillmos]
    python benchmarks/bench_score.py [--preset base] [--files 24] [--seconds 6] [--repeats 3] [--long-minutes 30]

With --batch-sizes: `utmos score`'s engine (write_scores) over a mix of files of 1-30 s (log-uniform)
at 8-48 kHz, for the models named (default: the bundled one) and the `base` preset (random weights:
speed does not depend on them), each configuration in a fresh process: audio seconds per wall second
(median of the repeats after a warm-up), peak memory (RSS on CPU, allocated on CUDA), how full the
batches were (real windows / rows run), the ratio to batch size 1 with the same model, device and
precision, and the scores' largest difference from the model's first configuration (list cpu and
batch 1 first) and whether the rounds gave bitwise the same scores.

Without it, audio seconds per wall second (median of repeats) for
  - bare:     torchaudio.models.wav2vec2_base() forward on the 16 kHz audio (batch of equal-length clips),
  - pipeline: write_scores() over the same files as WAVs (read, window, SFI layer, encoder, head, CSV),
  - mixed:    the pipeline over the same audio written at 8-48 kHz,
and the peak RSS of scoring one long file in a fresh process.
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
import pandas as pd
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


def make_mix(folder: Path, n: int, rates: list[int], lo: float, hi: float, seed: int = 0) -> float:
    """n files of lo-hi s (log-uniform) at the given rates, as 16-bit WAVs; returns their audio seconds.
    Each is cut from one of a few long synthetic clips per rate, so thousands are quick to make."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    clips = {(sr, k): speechlike(sr, hi, seed=k) for sr in rates for k in range(3)}
    total = 0.0
    for i in range(n):
        sr, seconds = rates[rng.integers(len(rates))], float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        clip, frames = clips[sr, int(rng.integers(3))], int(sr * seconds)
        start = int(rng.integers(clip.shape[0] - frames + 1))
        sf.write(folder / f"{i:05d}_{sr}.wav", clip[start:start + frames], sr, subtype="PCM_16")
        total += frames / sr
    return total


def child(spec: dict) -> dict:
    """One configuration in this (fresh) process: warm-up, then the timed repeats."""
    import resource

    from msr_utmos_cli import batching

    model = load_model(spec["model"], spec["device"])
    cuda = model.device.type == "cuda"
    rows = [0, 0]
    launch = batching.launch

    def counting(model, waves, sr, length, batch_size, precision="fp32"):
        rows[0] += len(waves)
        rows[1] += max(batch_size, len(waves))
        return launch(model, waves, sr, length, batch_size, precision)
    batching.launch = counting
    kw = {"batch_size": spec["batch_size"], "precision": spec["precision"], "workers": spec["workers"]}
    out = str(Path(spec["folder"]).parent / f"out_{os.getpid()}.csv")
    write_scores(model, spec["warmup"], out, overwrite=True, **kw)  # kernels, taps, allocator
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["repeats"]):
        rows[:] = [0, 0]
        t0 = time.perf_counter()
        summary = write_scores(model, [spec["folder"]], out, overwrite=True, **kw)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mos = pd.read_csv(out).set_index("path")["mos"].sort_index()
    return {"wall": statistics.median(times), "peak_mib": peak, "fill": rows[0] / max(rows[1], 1),
            "scored": summary["scored"], "mos": mos.tolist()}


def batch_table(args) -> None:
    """The batching table: each (model, device, precision, workers, batch size) in a fresh process per
    round, every configuration once a round, so a load that drifts (a shared machine) hits all alike;
    the ratio to batch size 1 is the median of the rounds' ratios."""
    import itertools
    import json

    tmp = Path(tempfile.mkdtemp())
    models = {name: (None if name == "bundled" else name) for name in args.models.split(",")}
    files = {name: args.files for name in models}
    if args.base_files:
        models["base"], files["base"] = str(random_model(tmp / "base", "base")), args.base_files
    rates, (lo, hi) = [int(r) for r in args.rates.split(",")], [float(x) for x in args.seconds_range.split(",")]
    audio = {"mix": make_mix(tmp / "mix", args.files, rates, lo, hi)}
    if args.base_files:
        audio["base_mix"] = make_mix(tmp / "base_mix", args.base_files, rates, lo, hi)
    folder = {name: ("base_mix" if name == "base" else "mix") for name in models}
    configs = list(itertools.product(models, args.devices.split(","), args.precisions.split(","),
                                     [int(w) for w in args.workers.split(",")],
                                     [int(b) for b in args.batch_sizes.split(",")]))
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            name, dev, prec, workers, bs = c
            spec = {"model": models[name], "device": dev, "batch_size": bs, "precision": prec, "workers": workers,
                    "folder": str(tmp / folder[name]),
                    "warmup": sorted(str(p) for p in (tmp / folder[name]).iterdir())[:2],
                    "repeats": 1}
            p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                               text=True)
            if p.returncode:
                print(f"{c}: {p.stderr[-2000:]}", file=sys.stderr)
            else:
                runs[c].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"\nmachine: {describe_machine(args.devices)}; torch {torch.__version__}; median of {args.repeats} "
          f"rounds, each after a warm-up; {args.files} files ({args.base_files} for base); "
          f"{lo:g}-{hi:g} s at {args.rates} Hz")
    print("max |d|: the largest score difference from the same model's first configuration listed (list cpu and "
          "batch 1 first); repeat: whether every round gave bitwise the same scores")
    print("| model | device | precision | workers | batch | audio s | wall s | audio s / s | vs batch 1 | "
          "peak MiB | fill | max \\|d\\| | repeat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, rs in runs.items():
        if not rs:
            continue
        one = runs.get(c[:4] + (1,), [])
        ratios = [a["wall"] / r["wall"] for a, r in zip(one, rs)]
        wall = statistics.median(r["wall"] for r in rs)
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        ref = next((runs[k][0]["mos"] for k in configs if k[0] == c[0] and runs[k]), rs[0]["mos"])
        diff = float(np.max(np.abs(np.subtract(rs[0]["mos"], ref)))) if len(ref) == len(rs[0]["mos"]) else float("nan")
        same = all(r["mos"] == rs[0]["mos"] for r in rs)
        secs = audio[folder[c[0]]]
        print(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {c[4]} | {secs:.0f} | {wall:.1f} | "
              f"{secs / wall:.1f} | {ratio} | {max(r['peak_mib'] for r in rs):.0f} | {rs[0]['fill']:.2f} | "
              f"{diff:.1e} | {'yes' if same else 'no'} |")


def describe_machine(devices: str) -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if "cuda" in devices and torch.cuda.is_available() else ""
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads){gpu}"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        import json

        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="the bare baseline's batch")
    ap.add_argument("--long-minutes", type=float, default=30.0, help="0 skips the long-file run")
    ap.add_argument("--device", default="auto", type=lambda s: str(parse_device(s)))
    ap.add_argument("--batch-sizes", help="e.g. 1,4: the batching table instead of the bare comparison")
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--workers", default="0", help="reader threads, e.g. 0,4")
    ap.add_argument("--base-files", type=int, default=6, help="files in the base preset's mix (0 skips it)")
    ap.add_argument("--models", default="bundled", help="models timed on the mix, e.g. bundled,msr-utmos-spec-distillmos")
    ap.add_argument("--rates", default=",".join(map(str, MIXED)), help="rates of the mix's files")
    ap.add_argument("--seconds-range", default="1,30", help="shortest,longest file of the mix (log-uniform)")
    args = ap.parse_args()
    if args.batch_sizes:
        return batch_table(args)
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
