"""Tests of the small data scripts in scripts/ that need no Debian speech tools."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import soundfile as sf
from typer.testing import CliRunner

from msr_utmos_cli.cli import app
from msr_utmos_cli.testing import speechlike

ROOT = Path(__file__).resolve().parents[1]


def test_label_corpus_path_lists_feed_utmos_score(tiny_model_dir, tmp_path):
    """docs/training.md's fine-tuning example scores `@test_paths.txt`; label_corpus.py must write it, in CSV order."""
    spec = importlib.util.spec_from_file_location("label_corpus", ROOT / "scripts" / "label_corpus.py")
    label_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(label_corpus)

    corpus = tmp_path / "corpus"
    (corpus / "audio").mkdir(parents=True)
    fields = ["path", "split", "source", "degradation", "severity", "bandwidth_hz"]
    rows = [("a.wav", "test", "flite", "clean", 0, 8000, 16000), ("b.wav", "train", "espeak", "clipping", 2, 4000, 8000),
            ("c.wav", "test", "asterisk", "noise_white", 3, 4000, 8000)]
    with open(corpus / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for name, split, src, deg, sev, bw, sr in rows:
            sf.write(corpus / "audio" / name, speechlike(sr, 0.5, seed=sev), sr)
            w.writerow([f"audio/{name}", split, src, deg, sev, bw])
    label_corpus.main(str(corpus / "manifest.csv"), str(tmp_path / "labels"))
    listed = (tmp_path / "labels" / "test_paths.txt").read_text().splitlines()
    with open(tmp_path / "labels" / "test.csv", newline="") as f:
        assert listed == [r["path"] for r in csv.DictReader(f)] == [str(corpus / "audio" / n) for n in ("a.wav", "c.wav")]
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(app, ["score", "--model", str(tiny_model_dir), "-o", str(out), "--quiet",
                                   f"@{tmp_path / 'labels' / 'test_paths.txt'}"])
    assert res.exit_code == 0, res.output
    with open(out, newline="") as f:
        scored = list(csv.DictReader(f))
    assert [r["path"] for r in scored] == listed and all(r["error"] == "" and float(r["mos"]) > 0 for r in scored)
