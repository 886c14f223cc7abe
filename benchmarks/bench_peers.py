"""Speed and memory of utmos vs DistillMOS and DNSMOS, in one run on the same corpus clips.

    python benchmarks/bench_peers.py --model models/<name> [--baseline-model models/<other>] [--corpus corpus/]
        [--split test] [--files 36] [--repeats 3] [--peers distillmos,distillmos+resample,dnsmos]

Files: --files clips of the corpus's --split, spread over it (mixed rates, 8-48 kHz).
  - utmos:      `utmos score`'s pipeline (write_scores) on the files as they are: read, native-rate
                batches, CSV. Model loading is not timed. --baseline-model: a second model, same run.
  - DistillMOS: ConvTransformerSQAModel() called per file, as its README does, on 16 kHz arrays in memory
                (files read and resampled to 16 kHz beforehand, not timed; a second row times reading and
                resampling too, as its own CLI does).
  - DNSMOS:     speechmos.dnsmos.run(x, 16000) per file (P.835 SIG/BAK/OVRL + P.808), same 16 kHz arrays.
Throughput is audio seconds per wall second (and per CPU second of this process, all threads: steadier
on a shared machine), median of --repeats after a warm-up; the tools take turns within each repeat so that
load from other processes hits them alike. Peak RSS (ru_maxrss) is measured
for each tool in its own fresh process doing one pass over the same files (imports and model included).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile as sf

PEERS = ("distillmos", "distillmos+resample", "dnsmos")


def pick_files(corpus: Path, n: int, split: str = "test") -> list[Path]:
    with open(corpus / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split and float(r.get("duration_s") or 1) > 0]
    step = max(1, len(rows) // n)
    return [corpus / r["path"] for r in rows[::step][:n]]


def read16k(path: Path) -> np.ndarray:
    """As DistillMOS's own CLI: read, first channel, torchaudio resampling to 16 kHz."""
    import torch
    import torchaudio.functional as AF

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = torch.from_numpy(x[:, 0].copy())
    return (AF.resample(x, sr, 16000) if sr != 16000 else x).numpy()


# --- one tool, one pass ------------------------------------------------------------------
def runner(tool: str, model_dir: str, files: list[Path], w16_dir: Path):
    """Load the tool and return a function doing one pass over the files (what is timed)."""
    if tool.startswith("utmos"):
        from msr_utmos_cli import load_model
        from msr_utmos_cli.output import write_scores

        model = load_model(model_dir, "cpu")
        out = str(w16_dir / f"utmos_{os.getpid()}.csv")
        return lambda: write_scores(model, [str(p) for p in files], out, overwrite=True)
    waves = [sf.read(str(w16_dir / f"{i:04d}.wav"), dtype="float32")[0] for i in range(len(files))]
    if tool.startswith("distillmos"):
        import contextlib
        import io

        import distillmos
        import torch

        with contextlib.redirect_stdout(io.StringIO()):
            model = distillmos.ConvTransformerSQAModel().eval()

        def run_distill():
            src = (read16k(p) for p in files) if tool == "distillmos+resample" else waves
            with torch.no_grad():
                return [model(torch.from_numpy(x)[None]).item() for x in src]
        return run_distill
    if tool == "dnsmos":
        from speechmos import dnsmos

        return lambda: [dnsmos.run(np.clip(x, -1, 1), 16000)["ovrl_mos"] for x in waves]
    raise ValueError(tool)


def peak_rss_child(tool: str, model_dir: str, files: list[Path], w16_dir: Path) -> None:
    """Entry point of the fresh process: one pass, then print peak RSS in MiB (ru_maxrss and VmHWM)."""
    import resource

    runner(tool, model_dir, files, w16_dir)()
    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm / 1024)


def peak_rss(tool: str, model: str, listing: Path, w16_dir: Path) -> float:
    """Peak RSS of a fresh process. Linux carries the parent's RSS at fork into the child's ru_maxrss across
    exec, so the child is started through a shell that forks it (small parent); VmHWM, the new process's
    own high-water mark, is taken when present and must agree."""
    cmd = [sys.executable, __file__, "--_child", tool, "--model", model, "--_list", str(listing),
           "--_w16", str(w16_dir)]
    out = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], capture_output=True, text=True, check=True)
    maxrss, hwm = (float(v) for v in out.stdout.split()[-2:])
    return hwm or maxrss


# --- machine -----------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder or bundled model name")
    ap.add_argument("--corpus", type=Path, default=Path("corpus"))
    ap.add_argument("--files", type=int, default=36)
    ap.add_argument("--split", default="test", help="manifest split to take the clips from (corpus_ml: heldout)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    ap.add_argument("--baseline-model", default=None,
                    help="a second utmos model timed in the same run (row utmos-baseline), e.g. the previous default")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of peers to time (of {', '.join(PEERS)})")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_list", help=argparse.SUPPRESS)
    ap.add_argument("--_w16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        files = [Path(p) for p in Path(args._list).read_text().splitlines()]
        return peak_rss_child(args._child, args.model, files, Path(args._w16))

    import importlib.util

    import torch

    peers = [t for t in args.peers.split(",") if t]
    if "distillmos" not in peers or any(t not in PEERS for t in peers):
        sys.exit(f"bench_peers: --peers must include distillmos (the ratio's baseline) and name only {', '.join(PEERS)}")
    models = {"utmos": args.model, **({"utmos-baseline": args.baseline_model} if args.baseline_model else {})}
    tools = (*models, *peers)
    for module, extra in (("distillmos", "distillmos"), ("speechmos", "dnsmos")):
        if module == "speechmos" and "dnsmos" not in peers:
            continue
        if importlib.util.find_spec(module) is None:
            sys.exit(f"bench_peers: peer '{module}' is not installed: pip install -e '.[{extra}]'")
    files = pick_files(args.corpus, args.files, args.split)
    tmp = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    listing = tmp / "files.txt"
    listing.write_text("\n".join(str(p.resolve()) for p in files))
    audio_s, rates = 0.0, []
    for i, p in enumerate(files):
        info = sf.info(str(p))
        audio_s += info.frames / info.samplerate
        rates.append(info.samplerate)
        sf.write(str(tmp / f"{i:04d}.wav"), read16k(p), 16000, subtype="FLOAT")

    load0 = os.getloadavg()[0]
    runs = {t: runner(t, models.get(t, args.model), files, tmp) for t in tools}
    for fn in runs.values():  # warm-up: ONNX sessions, tap design, kernel selection
        fn()
    times, cpu = {t: [] for t in tools}, {t: [] for t in tools}
    for _ in range(args.repeats):
        for t, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[t].append(time.perf_counter() - t0)
            cpu[t].append(time.process_time() - c0)
    load1 = os.getloadavg()[0]
    del runs
    rss = {t: peak_rss(t, models.get(t, args.model), listing, tmp) for t in tools if t != "distillmos+resample"}
    wall = {t: statistics.median(v) for t, v in times.items()}
    speed = {t: audio_s / wall[t] for t in tools}
    cpu_speed = {t: audio_s / statistics.median(cpu[t]) for t in tools}  # less sensitive to other load

    labels = {**{t: f"utmos score pipeline ({Path(m).name}), files at native rates" for t, m in models.items()},
              "distillmos": f"DistillMOS {version('distillmos')}, 16 kHz arrays (resampling not timed)",
              "distillmos+resample": f"DistillMOS {version('distillmos')}, incl. read + resample to 16 kHz",
              "dnsmos": f"DNSMOS P.835+P.808 (speechmos {version('speechmos')}), 16 kHz arrays"}
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), onnxruntime {version('onnxruntime')}; load average {load0:.1f} -> {load1:.1f} (1 min)")
    print(f"files: {len(files)} {args.split}-split clips, {audio_s:.0f} s of audio, rates "
          f"{', '.join(f'{r}x{rates.count(r)}' for r in sorted(set(rates)))}; "
          f"median of {args.repeats} after a warm-up\n")
    print("| scorer | wall s | audio s / wall s | audio s / CPU s | peak RSS (MiB, fresh process) |")
    print("|---|---|---|---|---|")
    for t in tools:
        r = f"{rss[t]:.0f}" if t in rss else "(as above)"
        print(f"| {labels[t]} | {wall[t]:.2f} | {speed[t]:.1f} | {cpu_speed[t]:.1f} | {r} |")
    ratio = speed["utmos"] / speed["distillmos"]
    ratio_r = f"{speed['utmos'] / speed['distillmos+resample']:.2f}x" if "distillmos+resample" in speed else "not run"
    print(f"\nutmos / DistillMOS throughput: {ratio:.2f}x (vs DistillMOS incl. resampling: {ratio_r}; "
          f"per CPU second: {cpu_speed['utmos'] / cpu_speed['distillmos']:.2f}x); "
          f"target >= 3x: {'met' if ratio >= 3 else 'NOT met'}")
    if "utmos-baseline" in speed:
        print(f"utmos-baseline / DistillMOS throughput: {speed['utmos-baseline'] / speed['distillmos']:.2f}x; "
              f"utmos / utmos-baseline: {speed['utmos'] / speed['utmos-baseline']:.2f}x")
    if "dnsmos" in speed:
        print(f"utmos / DNSMOS throughput: {speed['utmos'] / speed['dnsmos']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"models": models, "cpu": cpu_name(), "cores": os.cpu_count(),
                                        "torch": torch.__version__, "load_avg_1min": [load0, load1], "files": len(files), "audio_s": audio_s,
                                        "wall_s": times, "cpu_s": cpu, "audio_s_per_s": speed,
                                        "audio_s_per_cpu_s": cpu_speed, "peak_rss_mib": rss,
                                        "ratio_utmos_distillmos": ratio}, indent=1))


if __name__ == "__main__":
    main()
