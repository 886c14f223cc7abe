"""Tests of the small data scripts in scripts/ that need no Debian speech tools."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
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


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pruning_keeps_the_strongest_filters_and_at_full_width_is_the_teacher(tmp_path):
    import torch

    from msr_utmos_cli import load_model
    from msr_utmos_cli.testing import random_model

    shrink = _load_script("shrink_spec")
    teacher = load_model(random_model(tmp_path / "t", preset="tiny-spec"), device="cpu")
    wave = torch.from_numpy(speechlike(24000, 1.5, seed=3))
    same = shrink.prune(teacher, [16] * 5 + [16])
    assert float(same.score(wave, 24000)[0]) == float(teacher.score(wave, 24000)[0])
    half = shrink.prune(teacher, [8, 8, 8, 8, 8, 16])
    first_t, first_s = teacher.cnn.cnn[0].weight, half.cnn.cnn[0].weight
    strongest = first_t.abs().sum((1, 2, 3)).topk(8).indices.sort().values
    torch.testing.assert_close(first_s, first_t[strongest], rtol=0, atol=0)
    assert not any(p.requires_grad for p in half.transformer_pool_attn.parameters())  # the head is the teacher's


def _shrink_corpus(corpus):
    (corpus / "audio").mkdir(parents=True)
    with open(corpus / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "sample_rate", "split", "utt_id", "degradation", "severity"])
        for i, (sr, split) in enumerate([(8000, "train"), (8000, "train"), (24000, "train"), (16000, "valid"),
                                         (48000, "valid")]):
            sf.write(corpus / "audio" / f"{i}.flac", speechlike(sr, 1.0 + i / 2, seed=i), sr)
            kind = ("clean", 0) if i != 4 else ("noise", 1)  # rows 3 and 4: one valid utterance's severity pair
            w.writerow([f"audio/{i}.flac", 8000 if i == 2 else sr, split, f"u{min(i, 3)}", *kind])  # row 2: the manifest's rate is wrong
        sf.write(corpus / "audio" / "silent.flac", np.zeros(8000, np.float32), 16000)  # scoring refuses it
        w.writerow(["audio/silent.flac", 16000, "valid", "u5", "clean", 0])
    return corpus


def test_shrink_spec_trains_resumes_and_writes_a_model_utmos_scores(tmp_path):
    import json

    from msr_utmos_cli import load_model
    from msr_utmos_cli.testing import random_model

    shrink = _load_script("shrink_spec")
    teacher = random_model(tmp_path / "t", preset="tiny-spec")
    corpus = _shrink_corpus(tmp_path / "corpus")
    args = ["--teacher", str(teacher), "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--widths",
            "8,8,8,8,8,16", "--batch-size", "2", "--ckpt-every", "1", "--valid-clips", "3"]
    shrink.main(args + ["--steps", "2"])
    shrink.main(args + ["--steps", "3", "--resume"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid" in r] == [1, 2, 3]  # the resumed run went on at step 3
    assert all(r["valid"]["pairs"] == 1 and 0 <= r["valid"]["order"] <= 1 for r in records if "valid" in r)
    model = load_model(tmp_path / "run" / "model", device="cpu")  # the release folder, from the best checkpoint
    assert model.cfg.cnn_widths == [8, 8, 8, 8, 8, 16]
    assert model.metadata["task"] == "shrink" and model.metadata["step"] in (1, 2, 3)
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == ["config.json", "model.safetensors"]
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(app, ["score", "--model", str(tmp_path / "run" / "model"), "-o", str(out), "--quiet",
                                   str(corpus / "audio")])
    assert res.exit_code == 0, res.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and sum(r["error"] != "" for r in rows) == 1
    assert all(1 <= float(r["mos"]) <= 5 for r in rows if not r["error"])


def test_shrink_spec_seed_changes_the_run_and_the_same_seed_repeats_it(tmp_path):
    from safetensors.torch import load_file

    from msr_utmos_cli.testing import random_model

    shrink = _load_script("shrink_spec")
    teacher = random_model(tmp_path / "t", preset="tiny-spec")
    corpus = _shrink_corpus(tmp_path / "corpus")

    def weights(name, seed):
        shrink.main(["--teacher", str(teacher), "--corpus", str(corpus), "--out", str(tmp_path / name), "--widths",
                     "8,8,8,8,8,16", "--batch-size", "2", "--ckpt-every", "2", "--valid-clips", "3", "--steps", "2",
                     "--seed", str(seed)])
        return load_file(tmp_path / name / "model" / "model.safetensors")

    a, again, b = weights("a", 0), weights("again", 0), weights("b", 1)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_shrink_spec_head_mode_keeps_spaced_layers_and_trains_only_them(tmp_path):
    from msr_utmos_cli import load_model
    from msr_utmos_cli.checkpoint import save_model
    from msr_utmos_cli.spec_model import SpecModelConfig, SpecMOSModel

    shrink = _load_script("shrink_spec")
    assert shrink.kept_layers(7, 4) == [0, 2, 4, 6] and shrink.kept_layers(3, 2) == [0, 2]
    torch.manual_seed(0)
    teacher = SpecMOSModel(SpecModelConfig(cnn_channels=16, dim=16, heads=2, layers=3)).eval()
    layers = lambda m: m.transformer_pool_attn.transformer.transformer_encoder.layers  # noqa: E731
    student = shrink.prune(teacher, [16] * 6, head_layers=2)
    assert student.cfg.layers == 2
    for s_layer, t_layer in zip(layers(student), [layers(teacher)[0], layers(teacher)[2]]):
        assert all(torch.equal(a, b) for a, b in zip(s_layer.state_dict().values(), t_layer.state_dict().values()))
    t_dir = save_model(teacher, tmp_path / "t", {})
    run = tmp_path / "run"
    shrink.main(["--teacher", str(t_dir), "--corpus", str(_shrink_corpus(tmp_path / "corpus")), "--out", str(run),
                 "--head-layers", "2", "--batch-size", "2", "--steps", "2", "--ckpt-every", "1", "--valid-clips", "3",
                 "--lr", "0.01"])
    model = load_model(run / "model", device="cpu")
    assert model.cfg.layers == 2 and model.metadata["layers"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.cnn.state_dict().values(), teacher.cnn.state_dict().values()))
    assert not torch.equal(layers(model)[1].linear1.weight, layers(teacher)[2].linear1.weight)  # trained
    assert torch.equal(model.transformer_pool_attn.pool.linear3.weight, teacher.transformer_pool_attn.pool.linear3.weight)
    with pytest.raises(SystemExit, match="--head-layers must be 1-2"):
        shrink.main(["--teacher", str(t_dir), "--out", str(tmp_path / "x"), "--head-layers", "3"])


def _head_setup(tmp_path):
    """A tiny 2-layer spectrogram teacher saved to tmp_path/t, and the 6-clip corpus: for head-mode runs."""
    from msr_utmos_cli.checkpoint import save_model
    from msr_utmos_cli.spec_model import SpecModelConfig, SpecMOSModel

    torch.manual_seed(0)
    teacher = SpecMOSModel(SpecModelConfig(cnn_channels=16, dim=16, heads=2, layers=2)).eval()
    return teacher, save_model(teacher, tmp_path / "t", {}), _shrink_corpus(tmp_path / "corpus")


def test_shrink_spec_score_shift_retargets_the_whole_head_towards_the_shifted_teacher(tmp_path):
    from msr_utmos_cli import load_model

    shrink = _load_script("shrink_spec")
    teacher, t_dir, corpus = _head_setup(tmp_path)
    paths = [r["path"] for r in csv.DictReader(open(corpus / "manifest.csv"))]
    shift_csv = tmp_path / "shift.csv"
    with open(shift_csv, "w", newline="") as f:
        csv.writer(f).writerows([["path", "shift"]] + [[p, 1.0] for p in paths])
    wave = torch.from_numpy(speechlike(16000, 2.0, seed=7))
    before = float(teacher.score(wave, 16000)[0])
    run = tmp_path / "run"
    args = ["--teacher", str(t_dir), "--corpus", str(corpus), "--out", str(run), "--score-shift", str(shift_csv),
            "--hidden-weight", "0", "--batch-size", "2", "--ckpt-every", "5", "--valid-clips", "3", "--lr", "0.01"]
    shrink.main(args + ["--steps", "10"])
    model = load_model(run / "model", device="cpu")
    assert model.cfg.layers == 2 and model.metadata["task"] == "retarget"
    assert all(torch.equal(a, b) for a, b in zip(model.cnn.state_dict().values(), teacher.cnn.state_dict().values()))
    assert float(model.score(wave, 16000)[0]) > before + 0.2  # every clip's target was the teacher + 1 MOS
    with open(shift_csv, "w", newline="") as f:
        csv.writer(f).writerows([["path", "shift"]] + [[p, 1.0] for p in paths[:2]])
    with pytest.raises(SystemExit, match="target table has no row for"):
        shrink.main(args + ["--steps", "1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not both"):
        shrink.main(args + ["--targets", str(shift_csv), "--steps", "1", "--out", str(tmp_path / "x")])


def test_shrink_spec_targets_pull_the_head_to_the_labels_themselves(tmp_path):
    from msr_utmos_cli import load_model

    shrink = _load_script("shrink_spec")
    teacher, t_dir, corpus = _head_setup(tmp_path)
    wave = torch.from_numpy(speechlike(16000, 2.0, seed=7))
    before = float(teacher.score(wave, 16000)[0])
    goal = 1.2 if before > 3 else 4.8  # every clip's label, far from what the teacher says
    targets = tmp_path / "targets.csv"
    rows = pd.read_csv(corpus / "manifest.csv")
    pd.DataFrame({"path": rows.path, "mos": goal + 0.01 * rows.index}).to_csv(targets, index=False)
    run = tmp_path / "run"
    shrink.main(["--teacher", str(t_dir), "--corpus", str(corpus), "--out", str(run), "--targets", str(targets),
                 "--hidden-weight", "0", "--batch-size", "2", "--ckpt-every", "5", "--valid-clips", "3",
                 "--lr", "0.01", "--steps", "10"])
    after = float(load_model(run / "model", device="cpu").score(wave, 16000)[0])
    assert abs(after - goal) < abs(before - goal) - 0.2, (before, after, goal)
    pd.DataFrame({"path": ["audio/0.flac"], "shift": [0.0]}).to_csv(targets, index=False)
    with pytest.raises(SystemExit, match="expected columns path,mos"):
        shrink.main(["--teacher", str(t_dir), "--corpus", str(corpus), "--out", str(tmp_path / "x"),
                     "--targets", str(targets)])


def test_shrink_spec_low_rate_share_presents_batches_at_8k_and_fits_ranks_not_level(tmp_path):
    import json

    shrink = _load_script("shrink_spec")
    teacher, t_dir, corpus = _head_setup(tmp_path)
    paths = list(pd.read_csv(corpus / "manifest.csv").path)
    mos = {p: 1.5 + 0.5 * i for i, p in enumerate(paths)}
    student = shrink.prune(teacher, [16] * 6, head_layers=2)
    task = shrink.ShrinkTask(teacher, student, corpus, 2, 3, mos, 0.0, absolute=True, low_share=1.0)
    stream = task.batches(0, 1, seed=0, start=0)
    seen = {}
    for _ in range(12):
        batch = next(stream)
        seen[int(batch[1])] = bool(batch[3])
    assert seen == {8000: False, 24000: True}  # a batch already at 8 kHz is never "presented" there
    x, sr, labels, low = next(b for b in stream if bool(b[3]))
    lifted = labels + 0.5
    for flag, same in ((torch.tensor(True), True), (torch.tensor(False), False)):
        a = task.loss((x, sr, labels, flag), 0)[0].item()
        b = task.loss((x, sr, lifted, flag), 0)[0].item()
        assert (abs(a - b) < 1e-6) == same, (flag, a, b)  # at 8 kHz only the ranks count
    targets = tmp_path / "targets.csv"
    pd.DataFrame({"path": paths, "mos": [mos[p] for p in paths]}).to_csv(targets, index=False)
    run = tmp_path / "run"
    shrink.main(["--teacher", str(t_dir), "--corpus", str(corpus), "--out", str(run), "--targets", str(targets),
                 "--low-rate-share", "0.5", "--batch-size", "2", "--ckpt-every", "1", "--valid-clips", "3",
                 "--steps", "2"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid"] for r in records if "valid" in r]
    assert len(valid) == 2 and all(v["srcc_both"] == pytest.approx((v["srcc"] + v["srcc8k"]) / 2) for v in valid)
    with pytest.raises(SystemExit, match="needs head mode"):
        shrink.main(["--teacher", str(t_dir), "--corpus", str(corpus), "--out", str(tmp_path / "x"),
                     "--low-rate-share", "0.5", "--widths", "8,8,8,8,8,16"])


def test_blend_teachers_weights_the_second_judge_where_it_orders_the_training_ladders_better(tmp_path, monkeypatch):
    import sys

    import pandas as pd

    blend = _load_script("blend_teachers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    man, first, second = [], [], []
    for u in range(40):  # noise ladders: the first judge ranks them at random, the second gets them right
        split = "heldout" if u >= 36 else "valid" if u >= 32 else "train"
        base = 2.5 + rng.uniform(-1, 1)
        for sev in range(4):
            path = f"audio/u{u}_{sev}.flac"
            man.append({"path": path, "split": split, "utt_id": f"u{u}", "degradation": "noise" if sev else "clean",
                        "severity": sev})
            first.append({"path": path, "teacher_mos": base + rng.normal(0, 0.3)})
            second.append({"path": path, "teacher_mos": base - 0.4 * sev})
    pd.DataFrame(man).to_csv(corpus / "manifest.csv", index=False)
    pd.DataFrame(first[:-16]).to_csv(corpus / "teacher_distillmos.csv", index=False)  # no held-out labels needed
    pd.DataFrame(second[:-16]).to_csv(tmp_path / "second.csv", index=False)
    out = tmp_path / "shift.csv"
    argv = ["blend_teachers.py", "--corpus", str(corpus), "--second", str(tmp_path / "second.csv"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--min-srcc", "0"])
    blend.main()
    shift = pd.read_csv(out)
    assert len(shift) == 144 and shift["shift"].abs().max() > 0.1
    d1 = np.array([r["teacher_mos"] for r in first[:-16]])
    pairs = [(i, i + k) for i in range(0, 144, 4) for k in (1, 2, 3)]
    mixed = d1 + shift["shift"].to_numpy()
    assert blend.order_share([(a, b, "noise") for a, b in pairs], mixed) > \
        blend.order_share([(a, b, "noise") for a, b in pairs], d1) + 0.2
    monkeypatch.setattr(sys, "argv", argv + ["--weight", "1"])  # the first judge alone: no shift
    blend.main()
    assert pd.read_csv(out)["shift"].abs().max() < 1e-4
    pd.DataFrame(second[:10]).to_csv(tmp_path / "second.csv", index=False)
    with pytest.raises(SystemExit, match="lack a score"):
        blend.main()


def test_blend_teachers_margin_orders_each_utterances_ladder_and_moves_nothing_else(tmp_path, monkeypatch):
    import sys

    import pandas as pd

    blend = _load_script("blend_teachers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    man, first = [], []
    for u in range(12):  # a clean clip and a 3-step noise ladder; u0-u5 in the right order, u6-u11 shuffled
        split = "heldout" if u >= 10 else "valid" if u >= 8 else "train"
        levels = [3.5, 3.0, 2.5, 2.0] if u < 6 else list(rng.permutation([3.5, 3.0, 2.5, 2.0]))
        for sev in range(4):
            path = f"audio/u{u}_{sev}.flac"
            man.append({"path": path, "split": split, "utt_id": f"u{u}", "degradation": "noise" if sev else "clean",
                        "severity": sev})
            first.append({"path": path, "teacher_mos": levels[sev]})
    man.append({"path": "audio/u0_pink1.flac", "split": "train", "utt_id": "u0", "degradation": "pink", "severity": 1})
    first.append({"path": "audio/u0_pink1.flac", "teacher_mos": 3.9})  # above its clean clip
    pd.DataFrame(man).to_csv(corpus / "manifest.csv", index=False)
    pd.DataFrame(first).to_csv(corpus / "teacher_distillmos.csv", index=False)
    out = tmp_path / "shift.csv"
    monkeypatch.setattr(sys, "argv", ["blend_teachers.py", "--corpus", str(corpus), "--out", str(out),
                                      "--margin", "0.2", "--targets-out", str(tmp_path / "targets.csv")])
    blend.main()
    target = pd.read_csv(out).merge(pd.DataFrame(first), on="path")
    target["t"] = target.teacher_mos + target["shift"]
    written = pd.read_csv(tmp_path / "targets.csv").merge(target, on="path")
    assert len(written) == len(target) and np.allclose(written.mos, written.t, atol=2e-5)
    t = dict(zip(target.path, target.t))
    assert not any("u10" in p or "u11" in p for p in t)  # held-out clips get no target
    for u in range(10):
        ladder = [t[f"audio/u{u}_{sev}.flac"] for sev in range(4)]
        assert all(a - b >= 0.2 - 1e-4 for a, b in zip(ladder, ladder[1:])), (u, ladder)
    assert t["audio/u0_0.flac"] - t["audio/u0_pink1.flac"] >= 0.2 - 1e-4
    moved = target[target["shift"].abs() > 1e-4].path
    assert not any(p.startswith(f"audio/u{u}_") for p in moved for u in range(1, 6))  # ordered ladders stay
    assert set(moved) >= {"audio/u0_0.flac", "audio/u0_pink1.flac"}
