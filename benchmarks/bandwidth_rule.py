"""How often `bandwidth_hz` reads a clip's known band: a manifest's clips, then synthetic cases.

    python benchmarks/bandwidth_rule.py --manifest corpus_ml/manifest.csv --n 400

A manifest (scripts/build_multilingual.py, scripts/build_corpus.py) states each clip's band from how
it was made (resampling, low-pass, codec). A read counts when within 15 % of it; silent clips read
nothing and count as misses. Prints the share per degradation type and the misses.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import soundfile as sf

from msr_utmos_cli.bandwidth import effective_bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--n", type=int, default=400, help="clips drawn at random (seed 0)")
    ap.add_argument("--tolerance", type=float, default=0.15)
    a = ap.parse_args()
    m = pd.read_csv(a.manifest)
    m = m.sample(n=min(a.n, len(m)), random_state=0)
    rows = []
    for r in m.itertuples():
        x, sr = sf.read(a.manifest.parent / r.path, dtype="float32", always_2d=True)
        got = effective_bandwidth(x.mean(axis=1), sr)
        ok = got is not None and abs(got - r.bandwidth_hz) <= a.tolerance * r.bandwidth_hz
        rows.append({"degradation": getattr(r, "degradation", ""), "sample_rate": sr, "band_hz": r.bandwidth_hz,
                     "read_hz": got, "ok": ok, "path": r.path})
    e = pd.DataFrame(rows)
    print(f"{e.ok.mean():.3f} of {len(e)} clips read within {a.tolerance:.0%} of their band")
    print(e.groupby("degradation").ok.agg(["mean", "size"]).round(2).to_string())
    print(e[~e.ok].to_string(index=False))


if __name__ == "__main__":
    main()
