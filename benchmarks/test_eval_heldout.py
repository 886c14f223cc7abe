"""The held-out protocol (eval_heldout.py) end to end on a synthetic held-out split, with the teacher's
scores cached beforehand: no DistillMOS, no Debian tools, a tiny random model."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import eval_heldout as eh
import numpy as np
import pytest
import soundfile as sf
import torch

from msr_utmos_cli.testing import random_model, speechlike

COLS = ["path", "sample_rate", "bandwidth_hz", "split", "utt_id", "group_id", "degradation", "severity", "language",
        "voice"]


def write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 held-out utterances in 2 languages, each clean and with white noise at 3 severities, plus one train
    clip the protocol must not read, and a 3-rate ladder of one clean clip."""
    root = tmp_path_factory.mktemp("heldout")
    (root / "audio").mkdir()
    rows, ladder, teacher = [], [], {}
    rng = np.random.default_rng(0)
    for u, (lang, sr) in enumerate([("xx", 16000), ("xx", 24000), ("yy", 48000)]):
        clean = speechlike(sr, 1.5, seed=u)
        for sev in range(4):
            x = clean + (0.0 if sev == 0 else 10 ** (-(30 - 10 * sev) / 20)) * rng.standard_normal(clean.size)
            name = f"audio/u{u}_s{sev}.wav"
            sf.write(root / name, np.clip(x, -1, 1).astype(np.float32), sr, subtype="FLOAT")
            rows.append({"path": name, "sample_rate": sr, "bandwidth_hz": sr // 2, "split": "heldout",
                         "utt_id": f"v{u}/u{u}", "group_id": f"v{u}/u{u}", "degradation": "clean" if sev == 0 else
                         "noise_white", "severity": sev, "language": lang, "voice": f"v{u}"})
            teacher[root / name] = 4.0 - sev - 0.1 * u  # a teacher that ranks every ladder the right way round
    sf.write(root / "audio/train.wav", speechlike(16000, 1.0), 16000)
    rows.append({**rows[0], "path": "audio/train.wav", "split": "train", "utt_id": "t/u9", "group_id": "t/u9"})
    for sr in (8000, 16000, 48000):
        name = f"audio/ladder_{sr}.wav"
        sf.write(root / name, speechlike(8000, 1.5, seed=5), 8000) if sr == 8000 else \
            sf.write(root / name, eh.resample(torch.from_numpy(speechlike(8000, 1.5, seed=5)), 8000, sr).numpy(), sr)
        ladder.append({**rows[0], "ladder_id": "L0", "path": name, "sample_rate": sr})
    write_csv(root / "manifest.csv", rows, COLS)
    write_csv(root / "rate_ladder.csv", ladder, ["ladder_id"] + COLS)
    return root, teacher, f"distillmos {eh.version('distillmos')}"  # the cache's tag (the test extras have it)


def test_severity_counts_pairs_the_right_way_round():
    rows = [{"utt_id": "a", "group_id": "a", "degradation": d, "severity": str(s)}
            for d, s in [("clean", 0), ("noise", 1), ("noise", 2)]]
    good, bad, tie = [4.0, 3.0, 2.0], [2.0, 3.0, 4.0], [3.0, 3.0, 3.0]
    out = eh.severity(rows, {"good": good, "bad": bad, "tie": tie})
    assert out["good"]["all"] == 1.0 and out["bad"]["all"] == 0.0 and out["tie"]["all"] == 0.5
    assert out["good"]["pairs"] == 3 and out["good"]["noise"] == 1.0 and out["good"]["source:?"] == 1.0
    rows = [{**r, "source": "people"} for r in rows] + [{**r, "utt_id": "b", "source": "robot"} for r in rows]
    out = eh.severity(rows, {"people_only": good + bad})  # right on the recorded voice, wrong on the synthetic
    assert out["people_only"]["source:people"] == 1.0 and out["people_only"]["source:robot"] == 0.0
    assert out["people_only"]["all"] == 0.5 and out["people_only"]["pairs"] == 6
    # the interval draws utterances: one judge right on both is sure; one right on one of two could be 0 or 1
    assert eh.severity(rows, {"good": good + good})["good"]["all_ci95"] == [1.0, 1.0]
    assert out["people_only"]["all_ci95"] == [0.0, 1.0]


def test_level_and_silence_see_a_judge_that_hears_level_or_padding():
    clean = [(torch.from_numpy(speechlike(16000, 1.0, seed=1)), 16000)]
    blind = eh.level_and_silence({"j": lambda w, sr: 3.0}, clean)["j"]
    assert blind == {"level": [0.0, 0.0], "silence": [0.0, 0.0]}
    loud = eh.level_and_silence({"j": lambda w, sr: float(w.abs().max())}, clean)["j"]
    assert loud["level"][1] == pytest.approx(1 - 10 ** (-30 / 20)) and loud["silence"][1] == 0.0
    long = eh.level_and_silence({"j": lambda w, sr: w.shape[0] / sr}, clean)["j"]
    assert long["silence"][1] == pytest.approx(2.0)


def test_protocol_end_to_end_on_a_synthetic_held_out_split(corpus, tmp_path, monkeypatch, capsys):
    root, teacher, tag = corpus
    out = tmp_path / "res" / "heldout.json"
    out.parent.mkdir()
    keys = {f"{p.resolve()}|{p.stat().st_mtime_ns}": s for p, s in teacher.items()}
    (out.parent / "teacher_distillmos_cache.json").write_text(json.dumps({"teacher": tag, "scores": keys}))
    model = random_model(tmp_path / "m")
    monkeypatch.setattr(sys, "argv", ["eval_heldout.py", "--model", str(model), "--corpus", str(root),
                                      "--out", str(out), "--peers", "", "--robust-clips", "2"])
    eh.main()
    res = json.loads(out.read_text())
    assert res["n_clips"] == 12 and res["n_utts"] == 3 and res["languages"] == ["xx", "yy"]  # the train clip is not read
    assert res["severity"]["distillmos"]["all"] == 1.0 and res["severity"]["model"]["pairs"] == 18
    assert set(res["agreement"]) == {"native", "8000", "16000", "24000", "48000"}
    assert all(res["agreement"][r]["model"]["n"] == 12 for r in res["agreement"])
    assert set(res["by_language"]) == {"xx"} and res["by_language"]["xx"]["n"] == 8  # yy: too few clips (4 < 5)
    assert res["rate_spread"]["clips"] == 1 and res["rate_spread"]["worst"] >= 0
    assert set(res["robustness"]) == {"model"}
    assert [c["distillmos"] for c in res["clips"]][:4] == [4.0, 3.0, 2.0, 1.0]
    printed = capsys.readouterr().out
    assert "| severity order, all 18 pairs |" in printed and "| xx | 8 |" in printed
    assert "| SRCC / MAD with DistillMOS, at each file's own rate |" in printed
    monkeypatch.setattr(sys, "argv", sys.argv + ["--rates", ""])  # the quick run: each file's own rate only
    eh.main()
    quick = json.loads(out.read_text())
    assert set(quick["agreement"]) == {"native"} and quick["agreement"]["native"] == res["agreement"]["native"]


def test_with_the_distillmos_peer_the_8k_row_has_distillmos_hearing_8k(corpus, tmp_path, monkeypatch):
    """DistillMOS's own ranking of the clips heard at 8 kHz, against itself at the file's rate: the
    ceiling for any model that follows it. Cached heard-at-8k scores (reversed) give SRCC -1."""
    root, teacher, tag = corpus
    out = tmp_path / "heldout.json"
    keys = {f"{p.resolve()}|{p.stat().st_mtime_ns}": s for p, s in teacher.items()}
    keys.update({f"{k}|8000": 5.0 - s for k, s in keys.items()})
    (tmp_path / "teacher_distillmos_cache.json").write_text(json.dumps({"teacher": tag, "scores": keys}))
    monkeypatch.setattr(sys, "argv", ["eval_heldout.py", "--model", str(random_model(tmp_path / "m")), "--corpus",
                                      str(root), "--out", str(out), "--peers", "distillmos", "--robust-clips", "1",
                                      "--rates", "8000,16000"])
    eh.main()
    agree = json.loads(out.read_text())["agreement"]
    assert agree["8000"]["distillmos"]["srcc"] == pytest.approx(-1.0)
    assert "distillmos" not in agree["16000"]  # at 16 kHz and above it hears what it hears at the file's rate


def test_compare_heldout_pairs_the_runs_and_sees_a_gap_only_where_one_is(tmp_path, capsys, monkeypatch):
    import compare_heldout as ch

    manifest = tmp_path / "manifest.csv"
    ladder = [("clean", 0), ("noise", 1), ("noise", 2)]
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "utt_id", "source"])
        for u in range(4):
            for d, s in ladder:
                w.writerow([f"{u}_{d}{s}.flac", f"u{u}", "people" if u < 2 else "robot"])

    def run(scores):
        return {"model": "m", "clips": [{"path": f"{u}_{d}{s}.flac", "degradation": d, "severity": s, "model": m,
                                         "distillmos": 5.0 - s + 0.01 * u}
                                        for u in range(4) for (d, s), m in zip(ladder, scores[u])]}

    right, wrong = [4.0, 3.0, 2.0], [2.0, 3.0, 4.0]
    new, old = run([right] * 4), run([right, right, wrong, right])  # old reverses one robot utterance
    res = ch.compare(new, old, manifest)
    assert res["order"]["all"] == (1.0, 0.75) and res["order"]["source:people"] == (1.0, 1.0)
    assert res["order"]["source:robot"] == (1.0, 0.5) and res["pairs"] == 12
    lo, hi = res["gap_ci95"]
    assert 0.0 <= lo < 0.25 < hi <= 1.0  # the reversed utterance may or may not be drawn again
    assert res["srcc"][0] > res["srcc"][1]
    assert ch.compare(new, new, manifest)["gap_ci95"] == [0.0, 0.0]  # a model against itself: no gap at all
    with pytest.raises(SystemExit, match="different clips"):
        ch.compare(new, {**old, "clips": old["clips"][:-1]}, manifest)
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "old.json").write_text(json.dumps(old))
    monkeypatch.setattr(sys, "argv", ["compare_heldout.py", str(tmp_path / "new.json"), str(tmp_path / "old.json"),
                                      "--corpus", str(tmp_path)])
    ch.main()
    out = capsys.readouterr().out
    assert "| all 12 pairs (gap's 95 % interval" in out and "| 1.000 | 0.750 | +0.250 |" in out
