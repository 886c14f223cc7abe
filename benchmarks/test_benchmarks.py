"""Tests of the evaluation and benchmark scripts beside them, on a tiny random model and a synthetic corpus.

They sit here, not in tests/, so that tests/ never imports benchmarks/; pytest collects both folders.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import bench_peers
import eval_default_model as ev
import pytest
import soundfile as sf
import torch

from msr_utmos_cli import load_model
from msr_utmos_cli.testing import random_model, speechlike

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # tiny models: one thread beats an oversubscribed pool on a 2-core machine


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("tiny_model"))


FIELDS = ["path", "sample_rate", "split", "utt_id", "group_id", "degradation", "severity"]


def row(utt, deg, sev, group="g"):
    return {"utt_id": utt, "group_id": group, "degradation": deg, "severity": str(sev)}


def test_severity_pairs_same_type_or_clean():
    rows = [row("u1", "clean", 0), row("u1", "noise_white", 3),  # clean vs noise: a noise pair
            row("u2", "packet_loss", 1), row("u2", "packet_loss", 3),  # same type
            row("u3", "noise_white", 2), row("u3", "clipping", 3),  # two types: no pair
            row("u4", "packet_loss", 3), row("u4", "packet_loss", 3)]  # same severity: no pair
    assert sorted(ev.severity_pairs(rows, "utt_id")) == [(0, 1, "noise_white"), (2, 3, "packet_loss")]
    res = ev.severity_order(rows, student=[4, 2, 3, 3.5, 0, 0, 0, 0], teacher=[4, 2, 3, 2, 0, 0, 0, 0])
    assert res["utt_id"]["student"] == 0.5 and res["utt_id"]["teacher"] == 1.0
    assert res["utt_id"]["by_type"]["packet_loss"]["pairs"] == 1


def test_agreement_perfect_rank():
    a = ev.agreement([1.0, 2.0, 3.0], [1.5, 2.5, 4.0])
    assert a["srcc"] == pytest.approx(1.0) and a["mad"] == pytest.approx(2 / 3)


def test_print_tables_adds_what_8k_costs_teacher_and_student_and_still_reads_older_results(capsys):
    import json

    res = json.loads((ROOT / "docs" / "eval_default_model.json").read_text())
    for key in ("teacher_8000_vs_itself", "student_8000_vs_itself"):
        res.pop(key, None)  # as results written before these rows existed
    ev.print_tables(res)
    out = capsys.readouterr().out
    assert "lowest SRCC over presentation rates" in out and "hearing each clip at 8 kHz" not in out
    res["teacher_8000_vs_itself"] = ev.agreement([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 3.0])
    res["student_8000_vs_itself"] = ev.agreement([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0])
    ev.print_tables(res)
    lines = [x for x in capsys.readouterr().out.splitlines() if "hearing each clip at 8 kHz" in x]
    assert lines[0].startswith("the teacher ") and "SRCC 0.800, mean abs diff 0.500, mean diff +0.000" in lines[0]
    assert lines[1].startswith("the student ") and "SRCC 1.000, mean abs diff 1.000, mean diff -1.000" in lines[1]


def test_breakdown_splits_seen_from_held_out_recipes_and_narrow_from_wide():
    """Subsets by recipe (in the train split or not) at every rate, by real band at 8 and 16 kHz: a student
    right on seen recipes and backwards on the held-out one shows it in the subsets, not in one average."""
    rows = [{"degradation": d, "severity": str(s), "bandwidth_hz": str(bw)}
            for d, s, bw in [("noise_white", 1, 4000), ("noise_white", 2, 8000), ("clipping", 1, 4000),
                             ("clipping", 2, 8000), ("codec_codec2", 3, 4000), ("codec_codec2", 3, 4000),
                             ("codec_codec2", 3, 4000)]]
    teacher = [1.0, 2.0, 3.0, 4.0, 1.5, 2.5, 3.5]
    s8 = [1.0, 2.0, 3.0, 4.0, 3.5, 2.5, 1.5]  # right on the 4 seen, backwards on the 3 held out
    student = {str(r): s8 for r in ev.RATES}
    res = ev.breakdown(rows, {("noise_white", "1"), ("noise_white", "2"), ("clipping", "1"), ("clipping", "2")},
                       student, teacher)
    assert res["recipe seen in training"]["8000"]["srcc"] == pytest.approx(1.0)
    assert res["recipe seen in training"]["48000"]["n"] == 4
    assert res["recipe never trained on"]["8000"]["srcc"] == pytest.approx(-1.0)
    assert res["band fits below 4 kHz"]["8000"]["n"] == 5 and set(res["band fits below 4 kHz"]) == {"8000", "16000"}
    assert "band wider than 4 kHz" not in res  # two clips: too few for a rank correlation


@pytest.fixture
def tiny_corpus(tmp_path):
    rates = [8000, 16000, 32000]
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for i, sr in enumerate(rates):
            p = f"audio/{i}.wav"
            (tmp_path / "audio").mkdir(exist_ok=True)
            sf.write(tmp_path / p, speechlike(sr, 1.0, seed=i), sr)
            w.writerow({"path": p, "sample_rate": sr, "split": "test", "utt_id": "u", "group_id": "u",
                        "degradation": "clean" if i == 0 else "noise_white", "severity": i})
    with open(tmp_path / "rate_ladder.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["ladder_id", "path", "sample_rate"])
        w.writeheader()
        for sr in (8000, 16000, 48000):
            p = f"rate_ladder/a/{sr}.wav"
            (tmp_path / "rate_ladder/a").mkdir(parents=True, exist_ok=True)
            sf.write(tmp_path / p, speechlike(sr, 1.0, seed=5, bandwidth=3500), sr)
            w.writerow({"ladder_id": "a", "path": p, "sample_rate": sr})
    return tmp_path


def test_student_and_ladder_on_tiny_model(tiny_model_dir, tiny_corpus):
    model = load_model(tiny_model_dir, "cpu")
    rows = ev.read_rows(tiny_corpus / "manifest.csv", "test")
    paths = [tiny_corpus / r["path"] for r in rows]
    out = ev.student_at_rates(model, paths, (8000, 16000, 48000))
    assert set(out) == {"8000", "16000", "48000", "native"}
    assert out["native"][0] == out["8000"][0] and out["native"][1] == out["16000"][1]  # reused, not rescored
    assert all(1 <= s <= 5 for v in out.values() for s in v)
    narrow = ev.student_heard_at(model, paths, 8000, 16000)
    assert narrow[0] == out["16000"][0]  # an 8 kHz file heard at 8 kHz is the file itself, at 16 kHz
    assert narrow[2] != out["16000"][2]  # a 32 kHz file loses its band above 4 kHz first
    lad = ev.rate_ladder(model, tiny_corpus)
    assert lad["clips"] == 1 and lad["rates"] == [8000, 16000, 48000] and lad["worst_spread"] >= 0


def test_ladder_stats_spread_and_offsets():
    st = ev.ladder_stats({"a": {8000: 3.0, 16000: 2.8, 48000: 2.9}, "b": {8000: 4.0, 16000: 4.0, 48000: 4.3}})
    assert st["mean_spread"] == pytest.approx(0.25) and st["worst_clip"] == "b"
    assert st["worst_spread"] == pytest.approx(0.3) and st["median_spread"] == pytest.approx(0.25)
    off = st["mean_offset_by_rate"]
    assert (off["8000"], off["16000"], off["48000"]) == pytest.approx((0.0, -0.1, 0.1))
    # without 8 kHz: a 0.1 and b 0.3
    assert st["mean_spread_without_lowest_rate"] == pytest.approx(0.2)
    assert st["worst_spread_without_lowest_rate"] == pytest.approx(0.3)


def test_bench_peers_picks_spread_files(tiny_corpus):
    files = bench_peers.pick_files(tiny_corpus, 2)
    assert len(files) == 2 and all(p.exists() for p in files)


def _result(srcc: float, mad: float, spread: float) -> dict:
    return {"agreement": {str(r): {"srcc": srcc, "mad": mad} for r in ev.RATES},
            "rate_ladder": {"mean_spread": spread}}


def test_within_tolerance_flags_only_the_number_that_moved():
    ref = _result(0.90, 0.23, 0.049)
    assert all(ok for *_, ok in ev.within_tolerance(_result(0.86, 0.27, 0.065), ref))
    moved = _result(0.90, 0.23, 0.049)
    moved["agreement"]["8000"]["srcc"] = 0.84  # 0.06 below
    moved["rate_ladder"]["mean_spread"] = 0.075  # 0.026 above
    bad = [name for name, *_, ok in ev.within_tolerance(moved, ref) if not ok]
    assert bad == ["SRCC at 8000 Hz", "mean rate-ladder spread"]


def test_probe_ridge_recovers_a_linear_target():
    import numpy as np

    import probe_frozen_features as probe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) * [1, 10, 0.1, 1, 1, 1] + 5
    y = x @ [0.5, -0.02, 3.0, 0.0, 0.0, 0.0] + 1.0
    assert np.allclose(probe.ridge(x, y, 1e-6)(x), y, atol=1e-4)
    flat = probe.ridge(x, y, 1e9)(x)  # all shrinkage: the mean remains
    assert np.allclose(flat, y.mean(), atol=1e-3)


def test_probe_ridge_cv_picks_the_penalty_that_predicts_held_out_clips():
    import numpy as np

    import probe_frozen_features as probe

    rng = np.random.default_rng(1)
    clips = np.tile(np.arange(60), 2)  # two rates per clip, kept in one fold
    signal = rng.standard_normal((120, 1))
    clean = np.c_[signal, rng.standard_normal((120, 3))]
    f, lam = probe.ridge_cv(clean, signal[:, 0] * 2 + 1, clips)
    assert lam == 1.0 and np.allclose(f(clean), signal[:, 0] * 2 + 1, atol=0.05)
    noisy = rng.standard_normal((120, 100))  # 100 features of pure noise: only heavy shrinkage generalises
    _, lam = probe.ridge_cv(noisy, rng.standard_normal(120), clips)
    assert lam == 1e4


def test_probe_frozen_features_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    """probe_frozen_features.py on a synthetic labelled corpus: pooled features are the frame mean and
    std of the head layer, unlabelled clips are left out, and the model's own row matches its scores."""
    import json

    import numpy as np
    import torch
    from scipy.stats import spearmanr

    import probe_frozen_features as probe

    rows, labels = [], {"train": [], "test": []}
    (tmp_path / "audio").mkdir()
    for i in range(14):
        split = "train" if i < 9 else "test"
        sr = (8000, 16000, 24000)[i % 3]
        noise = 0.02 * (i % 5)
        x = speechlike(sr, 0.8, seed=i) + noise * np.random.default_rng(i).standard_normal(int(sr * 0.8))
        p = f"audio/{i}.wav"
        sf.write(tmp_path / p, x.astype("float32"), sr)
        rows.append({"path": p, "sample_rate": sr, "split": split, "utt_id": str(i), "group_id": "g",
                     "degradation": "noise_white", "severity": i % 5})
        if i != 0:  # clip 0 has no label: left out
            labels[split].append(f"{p},{4.5 - 10 * noise}\n")
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    for split, lines in labels.items():
        (tmp_path / f"{split}.csv").write_text("path,teacher_mos\n" + "".join(lines))
    out = tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["probe", "--model", str(tiny_model_dir), "--train-manifest",
                                      str(tmp_path / "manifest.csv"), "--train-labels", str(tmp_path / "train.csv"),
                                      "--test-manifest", str(tmp_path / "manifest.csv"), "--test-labels",
                                      str(tmp_path / "test.csv"), "--seeds", "0", "--mlp-steps", "20", "--out", str(out)])
    probe.main()
    res = json.loads(out.read_text())
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--per-layer"])
    probe.main()
    per_layer = json.loads(out.read_text())
    argv = list(sys.argv)
    argv[argv.index("--test-labels") + 1] = str(tmp_path / "missing.csv")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="missing.csv"):  # one line naming the file, no traceback
        probe.main()
    assert res["train_clips"] == 8 and res["test_clips"] == 5 and res["rates"] == [8000, 16000]
    assert set(res["srcc"]) == {"the model's own head", "ridge on frame mean + std", "MLP on frame mean + std, seed 0"}
    layers = [k for k in per_layer["srcc"] if k.startswith("ridge on ") and "(penalty" in k]
    assert [k.split(" (penalty")[0] for k in layers] == [
        "ridge on CNN output", "ridge on encoder layer 1", "ridge on encoder layer 2", "ridge on all of them"]
    assert {k: per_layer["srcc"][k] for k in res["srcc"]} == res["srcc"]  # the same fits, with more beside them
    model = load_model(tiny_model_dir, "cpu")
    test, t = probe.labelled(tmp_path / "manifest.csv", tmp_path / "test.csv", "test")
    own = ev.student_at_rates(model, test, (8000,))["8000"]
    assert res["srcc"]["the model's own head"]["8000"] == pytest.approx(spearmanr(own, t)[0])
    feats = probe.pooled(model, test[:1], [16000])[16000][0]
    wave, sr = ev.load(test[0])
    with torch.no_grad():
        f, n = model.extract_features(ev.resample(wave, sr, 16000)[None].float(), None, 16000)
    frames = f[-1][0, :int(n[0])].double()
    assert np.allclose(feats, torch.cat([frames.mean(0), frames.std(0, unbiased=False)]).numpy(), atol=1e-6)
    every = probe.pooled_layers(model, test[:1], [16000])[16000]
    assert len(every) == 3 and np.array_equal(every[-1][0], feats)  # CNN output, layer 1, layer 2 (the head's)
    with torch.no_grad():
        w16 = ev.resample(wave, sr, 16000)[None].float()
        x, n = model.conv_features(w16, torch.tensor([w16.shape[-1]]), 16000)
    cnn = x[0, :int(n[0])].double()
    assert every[0].shape == (1, 2 * x.shape[-1])
    assert np.allclose(every[0][0], torch.cat([cnn.mean(0), cnn.std(0, unbiased=False)]).numpy(), atol=1e-6)


def test_eval_bandwidth_scores_each_file_at_full_band_and_low_passed(tiny_model_dir, tmp_path, capsys):
    import eval_bandwidth

    sf.write(tmp_path / "a.wav", speechlike(24000, 1.0, seed=2), 24000, subtype="PCM_16")
    model = load_model(tiny_model_dir, "cpu")
    rows = eval_bandwidth.measure(model, str(tmp_path / "a.wav"), [8000.0, 4000.0])
    assert [r["cutoff_hz"] for r in rows] == [None, 8000.0, 4000.0]
    assert rows[0]["mos"] == pytest.approx(float(model.score(sf.read(tmp_path / "a.wav", dtype="float32")[0], 24000)[0]))
    assert rows[0]["bandwidth_hz"] == 12000 and rows[2]["bandwidth_hz"] < 12000
    assert len({r["mos"] for r in rows}) == 3  # the low-pass changed what the model heard
    eval_bandwidth.main([str(tmp_path / "a.wav"), "--model", str(tiny_model_dir), "--cutoffs", "8000"])
    assert capsys.readouterr().out.count("a.wav") == 2


def test_bench_score_table_compares_each_configuration_with_the_first(tmp_path, capsys, monkeypatch):
    import bench_score

    spec = random_model(tmp_path / "spec", "tiny-spec")
    monkeypatch.setattr(sys, "argv", ["bench_score.py", "--batch-sizes", "1,3", "--devices", "cpu", "--files", "4",
                                      "--base-files", "0", "--models", str(spec), "--repeats", "2",
                                      "--seconds-range", "0.5,1.5", "--rates", "16000"])
    bench_score.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {spec}")]
    assert [int(r[4]) for r in rows] == [1, 3]
    assert float(rows[0][11]) == 0.0 and float(rows[1][11]) <= 1e-5  # batch 3 against batch 1
    assert [r[12].strip() for r in rows] == ["yes", "yes"]  # every round bitwise the same
    assert float(rows[1][10]) > 0.5  # one rate, any lengths: the batches of a crop model fill
