"""Training targets beyond one teacher: a blend of two teachers' MOS, and the corpus' own severity order.

    python scripts/blend_teachers.py --corpus corpus_ml --second corpus_ml/teacher_dnsmos.csv \\
        --out corpus_ml/shift_blend.csv [--weight W] [--min-srcc 0.98] [--margin M]
    python scripts/blend_teachers.py --corpus corpus_ml --margin 0.1 --out corpus_ml/shift_order.csv

DistillMOS (corpus/teacher_distillmos.csv) and a second judge (DNSMOS P.808, from
`scripts/label_with_teacher.py --teacher dnsmos`) err on different degradations, so a blend ranks a
corpus' severity ladders better than either. The blend is w * z(DistillMOS) + (1 - w) * z(second),
z-scored on the training split and mapped back to DistillMOS's mean and spread, so its scale stays
DistillMOS's. Without --weight, w is the one of 1.0, 0.95, ..., 0.5 whose blend orders the *training*
split's same-utterance severity pairs best while keeping SRCC >= --min-srcc with DistillMOS (held-out
clips are never looked at). The output has one row per clip, `path,shift`: blend minus DistillMOS,
the amount `scripts/shrink_spec.py --score-shift` adds to the teacher's crop scores.
--targets-out also writes the targets themselves, `path,mos`, for `scripts/shrink_spec.py --targets`.

With --margin M the targets (DistillMOS's, or the blend) are then moved as little as possible (least
squares, per utterance) so that each training and validation utterance's severity pairs are ordered
with at least M MOS between them: a clean clip above each of its degraded versions, a milder
degradation of one type above a harsher one. The corpus knows which of two versions of one utterance
is worse; a teacher that ranks them the wrong way round (DistillMOS: 22 % of corpus_ml's training pairs) is overruled
there and nowhere else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

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


def enforce_order(t: np.ndarray, pairs: list[tuple[int, int, str]], group: np.ndarray, margin: float) -> np.ndarray:
    """The nearest scores (least squares) with t[a] >= t[b] + margin for every (a, b) pair. Pairs only
    join clips of one `group` (utterance), so each is solved on its own, and only where one is violated."""
    t = t.astype(float).copy()
    by_group: dict[str, list[tuple[int, int]]] = {}
    for a, b, _ in pairs:
        by_group.setdefault(group[a], []).append((a, b))
    for cons in by_group.values():
        if all(t[a] - t[b] >= margin for a, b in cons):
            continue
        idx = sorted({i for c in cons for i in c})
        pos = {i: k for k, i in enumerate(idx)}
        rows = np.zeros((len(cons), len(idx)))
        for r, (a, b) in enumerate(cons):
            rows[r, pos[a]], rows[r, pos[b]] = 1.0, -1.0
        d = t[idx]
        res = minimize(lambda x: ((x - d) ** 2).sum(), d, jac=lambda x: 2 * (x - d), method="SLSQP",
                       constraints=[{"type": "ineq", "fun": lambda x: rows @ x - margin, "jac": lambda x: rows}])
        t[idx] = res.x
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("corpus_ml"))
    ap.add_argument("--second", type=Path, help="CSV path,teacher_mos of a second judge to blend in")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weight", type=float, help="DistillMOS's weight w (default: chosen on the training split)")
    ap.add_argument("--min-srcc", type=float, default=0.98, help="least SRCC of the blend with DistillMOS")
    ap.add_argument("--margin", type=float, help="then order each utterance's severity pairs at least this far apart")
    ap.add_argument("--targets-out", type=Path, help="also write the targets themselves here (path,mos)")
    args = ap.parse_args()
    man = pd.read_csv(args.corpus / "manifest.csv", dtype={"severity": int}).drop_duplicates("path")
    judges = [args.corpus / "teacher_distillmos.csv"] + ([args.second] if args.second else [])
    scores = [pd.read_csv(p).drop_duplicates("path", keep="last").set_index("path").teacher_mos for p in judges]
    rows = man[(man.split != "heldout") & np.logical_and.reduce([man.path.isin(s.index) for s in scores])]
    rows = rows.reset_index(drop=True)
    missing = int((man.split != "heldout").sum()) - len(rows)
    if missing:
        sys.exit(f"error: {missing} training or validation clips lack a score from "
                 f"{' or '.join(str(p) for p in judges)}")
    d1 = scores[0][rows.path].to_numpy()
    train = (rows.split == "train").to_numpy()
    pairs = severity_pairs([r for _, r in rows.iterrows()], "utt_id")  # utt_ids never cross splits
    train_pairs = [p for p in pairs if train[p[0]]]
    t, chosen = d1, {"w": 1.0}
    if args.second:
        d2 = scores[1][rows.path].to_numpy()
        table = []
        for w in WEIGHTS if args.weight is None else [args.weight]:
            t = blend(d1, d2, w, train)
            srcc = float(pd.Series(t[train]).corr(pd.Series(d1[train]), method="spearman"))
            table.append({"w": w, "order": order_share(train_pairs, t), "srcc": srcc})
            print(f"w {w:.2f}: severity order {table[-1]['order']:.3f} ({len(train_pairs)} training pairs), "
                  f"SRCC with DistillMOS {srcc:.3f}")
        ok = [r for r in table if r["srcc"] >= args.min_srcc] or table[:1]
        chosen = max(ok, key=lambda r: r["order"])
        t = blend(d1, d2, chosen["w"], train)
    if args.margin is not None:
        t = enforce_order(t, pairs, rows.utt_id.to_numpy(), args.margin)
        chosen.update(margin=args.margin, ordered_pairs=len(pairs), moved=int((np.abs(t - d1) > 1e-6).sum()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": rows.path, "shift": np.round(t - d1, 5)}).to_csv(args.out, index=False)
    if args.targets_out:
        args.targets_out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"path": rows.path, "mos": np.round(t, 5)}).to_csv(args.targets_out, index=False)
    print(json.dumps({"chosen": chosen, "out": str(args.out), "clips": len(rows)}))


if __name__ == "__main__":
    main()
