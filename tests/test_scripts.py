"""Tests of the small data scripts in scripts/ that need no Debian speech tools."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
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
        w.writerow(["path", "sample_rate", "split"])
        for i, (sr, split) in enumerate([(8000, "train"), (8000, "train"), (24000, "train"), (16000, "valid"),
                                         (48000, "valid")]):
            sf.write(corpus / "audio" / f"{i}.flac", speechlike(sr, 1.0 + i / 2, seed=i), sr)
            w.writerow([f"audio/{i}.flac", 8000 if i == 2 else sr, split])  # row 2: the manifest's rate is wrong
        sf.write(corpus / "audio" / "silent.flac", np.zeros(8000, np.float32), 16000)  # scoring refuses it
        w.writerow(["audio/silent.flac", 16000, "valid"])
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
