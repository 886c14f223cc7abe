"""Label the corpus of build_corpus.py (corpus/manifest.csv) with a documented rule, for fine-tuning experiments.

The corpus has no listening test, so the labels are a stand-in: a fixed function of how each clip
was made. They test whether the fine-tuning pipeline learns graded quality, not human naturalness.

    MOS = clip(BASE[source] - PENALTY[degradation] * severity - NARROWBAND, 1, 5)

BASE: natural recorded speech (asterisk, alsa) 4.5; HTS (festival-slt-hts) 3.6; diphone festival
voices 3.0; flite 2.8; espeak (formant) 2.4. PENALTY per severity level (1-4): additive noise 0.6,
codec2 0.6, packet loss 0.5, clipping 0.45, other codecs 0.4, low-pass 0.3; clean clips 0.
NARROWBAND: 0.25 when the clip's content stops at or below 4 kHz (bandwidth_hz <= 4000).
System = the condition `degradation-severity` (as in a listening test's condition list).

    python scripts/label_corpus.py corpus/manifest.csv runs/corpus_labels/
writes train.csv, valid.csv and test.csv (path,mos,system,domain,bandwidth_hz; absolute paths) and
train_paths.txt, valid_paths.txt, test_paths.txt (the same paths, one per line, for `utmos score @FILE`).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

BASE = {"asterisk": 4.5, "alsa": 4.5, "festival-slt-hts": 3.6, "festival-kal": 3.0, "festival-ked": 3.0,
        "flite": 2.8, "espeak": 2.4}
PENALTY = {"noise_white": 0.6, "noise_pink": 0.6, "noise_babble": 0.6, "codec_codec2": 0.6, "packet_loss": 0.5,
           "clipping": 0.45, "lowpass": 0.3, "clean": 0.0}
CODEC_PENALTY = 0.4
NARROWBAND_HZ, NARROWBAND_PENALTY = 4000, 0.25


def label(row: dict) -> float:
    pen = PENALTY.get(row["degradation"], CODEC_PENALTY if row["degradation"].startswith("codec_") else None)
    if pen is None or row["source"] not in BASE:
        raise ValueError(f"no labelling rule for source {row['source']!r} / degradation {row['degradation']!r}")
    mos = BASE[row["source"]] - pen * int(row["severity"])
    mos -= NARROWBAND_PENALTY if float(row["bandwidth_hz"]) <= NARROWBAND_HZ else 0.0
    return min(5.0, max(1.0, mos))


def main(manifest: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    root = Path(manifest).resolve().parent
    for split in ("train", "valid", "test"):
        picked = [r for r in rows if r["split"] == split]
        paths = [str(root / r["path"]) for r in picked]
        with open(out_dir / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["path", "mos", "system", "domain", "bandwidth_hz"])
            for path, r in zip(paths, picked):
                w.writerow([path, f"{label(r):.3f}", f"{r['degradation']}-{r['severity']}", 0, r["bandwidth_hz"]])
        (out_dir / f"{split}_paths.txt").write_text("".join(f"{p}\n" for p in paths))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/label_corpus.py MANIFEST.csv OUT_DIR")
    try:
        main(sys.argv[1], sys.argv[2])
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"label_corpus: {sys.argv[1]}: {e}")
