"""Two models on the held-out protocol, pair by pair: is the new one better, or was it the draw?

    python benchmarks/compare_heldout.py NEW.json OLD.json [--corpus corpus_ml/]

NEW.json and OLD.json are `benchmarks/eval_heldout.py --out` files scored on the same clips. Prints
the severity order of each overall, per degradation type and per source, the gap, and the gap's 95 %
interval when the utterances are drawn again (paired: both models judge the same pairs, so the
interval is much narrower than either model's own). SRCC with DistillMOS is added when both runs
scored it. The interval says nothing about training noise: run a recipe with a second
`scripts/shrink_spec.py --seed` before calling a gap of one run real.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from eval_default_model import agreement, severity_pairs  # noqa: E402
from eval_heldout import order_ci, severity  # noqa: E402


def compare(new: dict, old: dict, manifest: Path) -> dict:
    """{"order": {key: (new, old)}, "gap_ci95": [lo, hi], "srcc": (new, old) or None}."""
    if [c["path"] for c in new["clips"]] != [c["path"] for c in old["clips"]]:
        raise SystemExit("error: the two runs scored different clips (rerun both on one corpus build)")
    with open(manifest, newline="") as f:
        meta = {r["path"]: r for r in csv.DictReader(f)}
    missing = [c["path"] for c in new["clips"] if c["path"] not in meta]
    if missing:
        raise SystemExit(f"error: {manifest}: no row for {missing[0]} (and {len(missing) - 1} more)")
    rows = [{"utt_id": meta[c["path"]]["utt_id"], "source": meta[c["path"]].get("source", "?"),
             "degradation": c["degradation"], "severity": str(c["severity"])} for c in new["clips"]]
    a, b = [c["model"] for c in new["clips"]], [c["model"] for c in old["clips"]]
    sev = severity(rows, {"new": a, "old": b})
    keys = [k for k in sev["new"] if k not in ("all_ci95", "pairs")]
    srcc = None
    if all("distillmos" in c for c in new["clips"] + old["clips"]):
        dm = [c["distillmos"] for c in new["clips"]]
        srcc = (agreement(a, dm)["srcc"], agreement(b, dm)["srcc"])
    return {"pairs": sev["new"]["pairs"], "order": {k: (sev["new"][k], sev["old"][k]) for k in keys},
            "gap_ci95": order_ci(rows, severity_pairs(rows, "utt_id"), a, base=b), "srcc": srcc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path)
    ap.add_argument("--corpus", type=Path, default=Path("corpus_ml"), help="the corpus both runs scored")
    args = ap.parse_args()
    runs = [json.loads(p.read_text()) for p in (args.new, args.old)]
    res = compare(*runs, args.corpus / "manifest.csv")
    lo, hi = res["gap_ci95"]
    print(f"new: {args.new} ({runs[0]['model']})\nold: {args.old} ({runs[1]['model']})\n")
    print("| severity order | new | old | new − old |\n|---|---|---|---|")
    for k, (n, o) in res["order"].items():
        label = f"all {res['pairs']} pairs (gap's 95 % interval {lo:+.3f} to {hi:+.3f})" if k == "all" else k
        print(f"| {label} | {n:.3f} | {o:.3f} | {n - o:+.3f} |")
    if res["srcc"]:
        n, o = res["srcc"]
        print(f"| SRCC with DistillMOS, each file at its own rate | {n:.3f} | {o:.3f} | {n - o:+.3f} |")


if __name__ == "__main__":
    main()
