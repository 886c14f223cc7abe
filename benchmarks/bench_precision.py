"""What bf16 and fp16 do to the scores: each file scored in fp32 and under autocast, on one device.

    python benchmarks/bench_precision.py examples/ [more files or folders] [--model NAME|PATH]
        [--device cpu|cuda] [--precisions bf16,fp16] [--batch-size 8]

Prints, per precision, the largest and mean |score - fp32 score| and the share of files whose score moved
by more than 0.01 and 0.05 MOS; fp32 at the same batch size is the reference.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from msr_utmos_cli import load_model
from msr_utmos_cli.scoring import iter_inputs, score_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precisions", default="bf16,fp16")
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    model = load_model(a.model, a.device)
    paths = [p for p, err, _ in iter_inputs(a.inputs) if not err]
    scores = {}
    for prec in ["fp32", *a.precisions.split(",")]:
        scores[prec] = [r.mos for r in score_files(model, paths, batch_size=a.batch_size, precision=prec)]
    ok = [i for i, s in enumerate(scores["fp32"]) if s is not None]
    print(f"{len(ok)} files on {model.device} (torch {torch.__version__}), batch size {a.batch_size}")
    print("| precision | max abs diff | mean abs diff | moved > 0.01 | moved > 0.05 |\n|---|---|---|---|---|")
    for prec, s in scores.items():
        if prec == "fp32":
            continue
        d = [abs(s[i] - scores["fp32"][i]) for i in ok if s[i] is not None]
        print(f"| {prec} | {max(d):.4f} | {statistics.fmean(d):.4f} | {sum(x > 0.01 for x in d) / len(d):.0%} | "
              f"{sum(x > 0.05 for x in d) / len(d):.0%} |")


if __name__ == "__main__":
    main()
