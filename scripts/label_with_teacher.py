"""Label audio with a teacher's MOS once, so distillation on a CPU does not rerun the teacher every step.

    python scripts/label_with_teacher.py --manifest corpus/manifest.csv --out corpus/teacher_distillmos.csv
    python scripts/label_with_teacher.py --manifest corpus/manifest.csv --teacher dnsmos --out corpus/teacher_dnsmos.csv

The teacher hears each whole clip resampled to 16 kHz (torchaudio), as its own users would
feed it. Rows already in --out are kept (the job can be stopped and restarted).

With --features DIR it also keeps the teacher's per-frame features of each clip (for DistillMOS its
transformer output, (frames, 200) at 50 frames/s, from the first 7.68 s window) as float16 safetensors
shards, for `model.teacher_features`: feature distillation without running the teacher every step.

With --hear-at RATE the teacher hears each clip as a student presented at RATE does (resampled to
RATE, then to 16 kHz): the targets for `model.teacher_at_rate` below 16 kHz.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from msr_utmos_cli.audio import heard_at
from msr_utmos_cli.training.teachers import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="CSV with a `path` column (relative to its folder)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher", default="distillmos")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--splits", default="", help="comma-separated `split` values to label (default: all)")
    ap.add_argument("--features", default=None, help="folder for per-frame feature shards (see above)")
    ap.add_argument("--layer", type=int, default=1, help="teacher layer kept by --features (DistillMOS: 1)")
    ap.add_argument("--hear-at", type=int, default=None, help="band-limit each clip to this rate first (see above)")
    args = ap.parse_args()
    if args.features and args.teacher == "dnsmos":  # before reading shards or loading any teacher
        sys.exit("error: --features: the DNSMOS teacher gives scores only, no per-frame features")
    root = Path(args.manifest).parent
    rows = list(csv.DictReader(open(args.manifest, newline="")))
    if args.splits:
        keep = set(args.splits.split(","))
        rows = [r for r in rows if r.get("split") in keep]
    labelled = set()
    if os.path.exists(args.out):
        labelled = {r["path"] for r in csv.DictReader(open(args.out, newline=""))}
    done, n_shards = labelled, 0  # n_shards: the next shard's number, past every existing one
    if args.features:  # a clip is done when it has both its features and its CSV row
        os.makedirs(args.features, exist_ok=True)
        cached = set()
        for sh in sorted(Path(args.features).glob("*.safetensors")):
            with safe_open(str(sh), "pt") as g:
                cached |= set(g.keys())
            if sh.stem.startswith("shard_") and sh.stem[6:].isdigit():
                n_shards = max(n_shards, int(sh.stem[6:]) + 1)
        done = cached & labelled
    # Similar lengths share a batch, so little time goes into padding.
    todo = [r["path"] for r in sorted(rows, key=lambda r: float(r["duration_s"])) if r["path"] not in done]
    teacher = load_teacher(args.teacher)
    new = not os.path.exists(args.out) or os.path.getsize(args.out) == 0
    t0 = time.perf_counter()
    with open(args.out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["path", "teacher_mos"])
        for i in range(0, len(todo), args.batch_size):
            paths = todo[i:i + args.batch_size]
            waves = []
            for p in paths:
                x, sr = sf.read(root / p, dtype="float32", always_2d=True)
                waves.append(heard_at(torch.from_numpy(x.mean(1)), sr, args.hear_at, 16000))
            lengths = torch.tensor([len(x) for x in waves])
            batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
            with torch.inference_mode():
                out = teacher(batch, lengths)
            mos = out["mos"].tolist()
            # Rows are flushed before their shard is published: a job stopped in between leaves rows
            # without features, which the next run redoes, never features without rows.
            w.writerows([p, f"{m:.5f}"] for p, m in zip(paths, mos) if p not in labelled)
            f.flush()
            if args.features:
                feats = {p: out["layers"][args.layer][j, : int(out["lengths"][j])].half().contiguous()
                         for j, p in enumerate(paths)}
                tmp = Path(args.features) / f".shard_{n_shards:05d}.tmp"
                save_file(feats, str(tmp), metadata={"teacher": args.teacher, "teacher_layer": str(args.layer)})
                os.replace(tmp, Path(args.features) / f"shard_{n_shards:05d}.safetensors")
                n_shards += 1
            print(f"{i + len(paths)}/{len(todo)} clips, {time.perf_counter() - t0:.0f} s", file=sys.stderr, end="\r")
    print(file=sys.stderr)


if __name__ == "__main__":
    main()
