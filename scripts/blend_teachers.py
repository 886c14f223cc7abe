"""Blend two teachers' MOS into one training target, weighted by how well the blend orders known ladders.

    python scripts/blend_teachers.py --corpus corpus_ml --second corpus_ml/teacher_dnsmos.csv \\
        --out corpus_ml/shift_blend.csv [--weight W] [--min-srcc 0.98]

DistillMOS (corpus/teacher_distillmos.csv) and a second judge (DNSMOS P.808, from
`scripts/label_with_teacher.py --teacher dnsmos`) err on different degradations, so a blend ranks a
corpus' severity ladders better than either. The blend is w * z(DistillMOS) + (1 - w) * z(second),
z-scored on the training split and mapped back to DistillMOS's mean and spread, so its scale stays
DistillMOS's. Without --weight, w is the one of 1.0, 0.95, ..., 0.5 whose blend orders the *training*
split's same-utterance severity pairs best while keeping SRCC >= --min-srcc with DistillMOS (held-out
clips are never looked at). The output has one row per clip, `path,shift`: blend minus DistillMOS,
the amount `scripts/shrink_spec.py --score-shift` adds to the teacher's crop scores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from eval_default_model import severity_pairs  # noqa: E402

WEIGHTS = [round(1 - 0.05 * i, 2) for i in range(11)]


def order_share(pairs: list[tuple[int, int, str]], s: np.ndarray) -> float:
    """Share of (less severe, more severe) pairs scored the right way round; a tie counts half."""
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    return float(np.mean(np.where(s[a] > s[b], 1.0, np.where(s[a] == s[b], 0.5, 0.0))))


def blend(first: np.ndarray, second: np.ndarray, w: float, ref: np.ndarray) -> np.ndarray:
    """w z(first) + (1 - w) z(second), with z and the mapping back to first's scale taken on `ref` rows."""
    z1 = (first - first[ref].mean()) / first[ref].std()
    z2 = (second - second[ref].mean()) / second[ref].std()
    mix = w * z1 + (1 - w) * z2
    return first[ref].mean() + first[ref].std() * (mix - mix[ref].mean()) / mix[ref].std()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("corpus_ml"))
    ap.add_argument("--second", type=Path, required=True, help="CSV path,teacher_mos of the second judge")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weight", type=float, help="DistillMOS's weight w (default: chosen on the training split)")
    ap.add_argument("--min-srcc", type=float, default=0.98, help="least SRCC of the blend with DistillMOS")
    args = ap.parse_args()
    man = pd.read_csv(args.corpus / "manifest.csv", dtype={"severity": int}).drop_duplicates("path")
    first = pd.read_csv(args.corpus / "teacher_distillmos.csv").drop_duplicates("path", keep="last")
    second = pd.read_csv(args.second).drop_duplicates("path", keep="last")
    first, second = first.set_index("path").teacher_mos, second.set_index("path").teacher_mos
    rows = man[man.path.isin(first.index) & man.path.isin(second.index)].reset_index(drop=True)
    missing = int((man.split != "heldout").sum()) - len(rows)
    if missing:
        sys.exit(f"error: {missing} training or validation clips lack a score from one of the two teachers")
    d1, d2 = first[rows.path].to_numpy(), second[rows.path].to_numpy()
    train = (rows.split == "train").to_numpy()
    pairs = severity_pairs([r for _, r in rows[train].iterrows()], "utt_id")
    idx = np.flatnonzero(train)
    pairs = [(idx[a], idx[b], k) for a, b, k in pairs]
    table = []
    for w in WEIGHTS if args.weight is None else [args.weight]:
        t = blend(d1, d2, w, train)
        srcc = float(pd.Series(t[train]).corr(pd.Series(d1[train]), method="spearman"))
        table.append({"w": w, "order": order_share(pairs, t), "srcc": srcc})
        print(f"w {w:.2f}: severity order {table[-1]['order']:.3f} ({len(pairs)} training pairs), "
              f"SRCC with DistillMOS {srcc:.3f}")
    ok = [r for r in table if r["srcc"] >= args.min_srcc] or table[:1]
    best = max(ok, key=lambda r: r["order"])
    t = blend(d1, d2, best["w"], train)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": rows.path, "shift": np.round(t - d1, 5)}).to_csv(args.out, index=False)
    print(json.dumps({"chosen": best, "out": str(args.out), "clips": len(rows)}))


if __name__ == "__main__":
    main()
