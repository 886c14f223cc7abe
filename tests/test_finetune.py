"""`utmos finetune` on a synthetic labelled set whose MOS is a known function of the audio (noise level)."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from msr_utmos_cli import MOSModel, PRESETS, load_model, save_model
from msr_utmos_cli.cli import app
from msr_utmos_cli.rows import COLUMNS
from msr_utmos_cli.training.finetune import (FinetuneData, FinetuneLoss, FinetuneModel, FinetuneTask, SECTIONS,
                                    allowed_rates, build_model, load_corpora, run, utmos_loss)
from msr_utmos_cli.training.config import load_config
from msr_utmos_cli.training.labels import Utterance
from msr_utmos_cli.audio import AudioInfo
from msr_utmos_cli.training.train import TrainConfig
from msr_utmos_cli.testing import speechlike

CLIP_S = 0.4


def make_set(root: Path, n_systems: int, utts: int, split: str, seed: int, offset: float = 0.0) -> Path:
    """Systems = noise levels spread over [0, 1]; MOS = 5 - 4 * level; rates alternate 16/24 kHz."""
    rng = np.random.default_rng(seed)
    rows = ["path,mos,system"]
    for s, level in enumerate(np.linspace(offset, 1 - offset, n_systems)):
        name, sr = f"{split}{s:02d}", (16000, 24000)[s % 2]
        (root / name).mkdir(parents=True, exist_ok=True)
        for u in range(utts):
            lvl = float(np.clip(level + rng.normal(0, 0.05), 0, 1))
            x = speechlike(sr, CLIP_S, seed=int(rng.integers(1 << 30)))
            x = x + (0.003 + 0.25 * lvl) * rng.standard_normal(x.shape).astype(np.float32)
            sf.write(root / name / f"{name}-u{u}.wav", x, sr)
            rows.append(f"{name}/{name}-u{u}.wav,{5 - 4 * lvl:.3f},{name}")
    lst = root / f"{split}.csv"
    lst.write_text("\n".join(rows) + "\n")
    return lst


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_set(root, 8, 5, "train", seed=1)
    make_set(root, 6, 4, "valid", seed=2, offset=0.05)  # held-out systems between the training levels
    return root


def write_config(path: Path, data: Path, out: Path, **trainer) -> Path:
    doc = {"model": {"init": "tiny"},
           "data": {"train": [{"csv": str(data / "train.csv")}], "valid": [{"csv": str(data / "valid.csv")}],
                    "crop_s": CLIP_S},
           "trainer": {"out_dir": str(out), "max_steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
                       "ckpt_every": 30, "valid_every": 30, "log_every": 10, "seed": 0, **trainer}}
    path.write_text(yaml.safe_dump(doc))
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One CLI run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    cfg = write_config(out / "ft.yaml", data, out / "ft")
    res = invoke("finetune", "--config", cfg)
    assert res.exit_code == 0, res.output
    return out / "ft", res.output


def test_learns_the_noise_level_on_held_out_systems(trained):
    out, _ = trained
    records = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid" in r]
    assert [r["step"] for r in valid] == [30, 60]
    best = max(r["valid"]["sys_SRCC"] for r in valid)
    assert best >= 0.8, valid
    assert set(valid[-1]["valid"]) == {f"{lvl}_{m}" for lvl in ("utt", "sys") for m in ("MSE", "LCC", "SRCC", "KTAU")}


def test_best_is_a_scoring_model_and_predictions_are_readable(trained, data):
    out, output = trained
    assert "predictions in" in output and "best sys_SRCC" in output
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*COLUMNS, "true_mos", "system"]  # a score file's columns, then the truth
    assert COLUMNS[:5] == ["path", "sample_rate", "duration_s", "mos", "error"]
    assert len(rows) == 24 and {r["sample_rate"] for r in rows} == {"16000", "24000"}
    assert all(1 <= float(r["mos"]) <= 5 and r["error"] == "" for r in rows)
    # `utmos score --model best` reproduces the validation predictions; `utmos report` reads the file.
    res = invoke("score", "--model", out / "best", "--device", "cpu", "-q", rows[0]["path"], rows[1]["path"])
    assert res.exit_code == 0, res.output
    scored = list(csv.DictReader(res.stdout.splitlines()))
    assert [r["mos"] for r in scored] == [r["mos"] for r in rows[:2]]
    res = invoke("report", out / "predictions.csv", "--truth", data / "valid.csv", "--json", "-")
    assert res.exit_code == 0, res.output


def test_predictions_under_bf16_training_equal_fp32_scoring(data, tmp_path):
    """CUDA trains in bf16 by default; validation, and so predictions.csv, must still be what `score` gives."""
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "ft", max_steps=6, ckpt_every=6, valid_every=6,
                       precision="bf16")
    res = invoke("finetune", "--config", cfg)
    assert res.exit_code == 0, res.output
    with open(tmp_path / "ft" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))[:3]
    res = invoke("score", "--model", tmp_path / "ft" / "best", "--device", "cpu", "-q", *[r["path"] for r in rows])
    assert res.exit_code == 0, res.output
    scored = [r["mos"] for r in csv.DictReader(res.stdout.splitlines())]
    assert scored == [r["mos"] for r in rows]


def test_validation_scores_each_file_as_score_does(data, tmp_path):
    """Validation picks best/ on what `utmos score` will print for it: the model's input rule, windows
    and domain 0, even for a validation corpus with its own domain id."""
    torch.manual_seed(0)
    ruled = replace(PRESETS["tiny"](), input_rms_db=-26.0, input_trim_db=-40.0)
    save_model(MOSModel(ruled), tmp_path / "init")
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "ft", max_steps=2, ckpt_every=2, valid_every=2)
    res = invoke("finetune", "--config", cfg, "--init", tmp_path / "init", "--set",
                 f"data.valid=[{{csv: {data / 'valid.csv'}, domain: 1}}]")
    assert res.exit_code == 0, res.output
    assert "validation scores as `utmos score` does, with domain 0" in res.output
    with open(tmp_path / "ft" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and load_model(tmp_path / "ft" / "best", "cpu").cfg.domain_dim > 0
    res = invoke("score", "--model", tmp_path / "ft" / "best", "--device", "cpu", "-q", *[r["path"] for r in rows])
    assert res.exit_code == 0, res.output
    assert [r["mos"] for r in csv.DictReader(res.stdout.splitlines())] == [r["mos"] for r in rows]


def test_resume_is_exact(data, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "full", max_steps=4, ckpt_every=2, valid_every=100)
    overrides = ["data.valid=[]", "data.present_rates=[8000,16000]", "data.present_prob=1.0"]
    run(cfg, overrides, log=lambda s: None)
    interrupt_at = {"step": 2}
    loss = FinetuneTask.loss

    def interrupted(self, batch, step):
        if step == interrupt_at["step"]:
            raise KeyboardInterrupt
        return loss(self, batch, step)

    monkeypatch.setattr(FinetuneTask, "loss", interrupted)
    cut = [*overrides, f"trainer.out_dir={tmp_path / 'cut'}"]
    assert run(cfg, cut, log=lambda s: None)["interrupted"]
    monkeypatch.setattr(FinetuneTask, "loss", loss)
    assert run(cfg, cut, resume=True, log=lambda s: None)["step"] == 4
    a = load_file(tmp_path / "full" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_rows_stop_before_training_unless_skipped(data, tmp_path):
    bad = tmp_path / "bad.csv"
    good = (data / "train.csv").read_text().splitlines()
    bad.write_text("\n".join(good[:9] + ["train00/missing.wav,3", "train00/train00-u0.wav,6.5",
                                          "train00/train00-u1.wav,n/a"]) + "\n")
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "out", max_steps=2, valid_every=100)
    res = invoke("finetune", "--config", cfg, "--set", f"data.train=[{{csv: {bad}, wav_root: {data}}}]")
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert lines[0].startswith(f"{bad}: row 9 (line 10): no such file")
    assert lines[1] == f"{bad}: row 10 (line 11): mos 6.5 is outside the declared scale 1-5"
    assert lines[2] == f"{bad}: row 11 (line 12): mos 'n/a' is not a number"
    assert "3 bad row(s)" in lines[3] and "--skip-bad-rows" in lines[3]
    assert not (tmp_path / "out" / "last").exists()
    res = invoke("finetune", "--config", cfg, "--set", f"data.train=[{{csv: {bad}, wav_root: {data}}}]",
                 "--skip-bad-rows")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "last" / "model.safetensors").is_file()


def test_rerunning_into_the_same_out_dir_needs_resume_or_overwrite(data, tmp_path):
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "out", max_steps=2, valid_every=100)
    assert invoke("finetune", "--config", cfg).exit_code == 0
    metrics = (tmp_path / "out" / "metrics.jsonl").read_bytes()
    res = invoke("finetune", "--config", cfg)
    assert res.exit_code == 2 and "already holds a run" in res.stderr and "--overwrite" in res.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_bytes() == metrics
    res = invoke("finetune", "--config", cfg, "--overwrite")
    assert res.exit_code == 0, res.output
    assert invoke("finetune", "--config", cfg, "--resume").exit_code == 0


def test_malformed_list_and_unknown_key_are_one_line_errors(data, tmp_path):
    nomos = tmp_path / "nomos.csv"
    nomos.write_text("path,score\nx.wav,3\n")
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "out", max_steps=2)
    res = invoke("finetune", "--config", cfg, "--set", f"data.train=[{{csv: {nomos}}}]")
    assert res.exit_code == 2 and "nomos.csv: line 1: no 'mos' column" in res.stderr
    res = invoke("finetune", "--config", cfg, "--set", "loss.clip_ta=0.1")
    assert res.exit_code == 2 and "loss.clip_ta" in res.stderr


def test_clipped_mse_and_contrastive_terms():
    l = FinetuneLoss(clip_tau=0.25, mse_weight=1.0, contrast_weight=1.0, contrast_margin=0.1)
    true = torch.tensor([1.0, 3.0])
    total, parts = utmos_loss(true + 0.2, true, l)  # within tau, same differences: free
    assert total.item() == 0.0
    total, parts = utmos_loss(torch.tensor([1.5, 2.5]), true, l)
    assert parts["clipped_mse"] == pytest.approx(0.25)
    assert parts["contrast"] == pytest.approx(1.0 - 0.1)  # |(1-3) - (1.5-2.5)| - margin


def test_rebuilt_head_keeps_ssl_weights_and_predictions(tmp_path):
    torch.manual_seed(0)
    old = MOSModel(PRESETS["tiny"]())
    save_model(old, tmp_path / "init")
    new, note = build_model(str(tmp_path / "init"), FinetuneModel(), num_domains=3, num_listeners=5, seed=1)
    assert note["head"].startswith("rebuilt") and new.cfg.domain_dim == 16 and new.cfg.num_listeners == 5
    o, n = old.state_dict(), new.state_dict()
    assert all(torch.equal(o[k], n[k]) for k in o if not k.startswith("head."))
    # New embedding inputs start at zero weight, so the rebuilt head predicts what the old one did.
    x, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    old.eval(), new.eval()
    assert torch.allclose(old(x, lengths, 16000), new(x, lengths, 16000, torch.tensor([2, 1]), torch.tensor([0, 4])),
                          atol=1e-5)


def test_freeze_ssl_steps_and_ssl_lr_scale(data, tmp_path):
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "out", max_steps=2, valid_every=100)
    run(cfg, ["model.freeze_ssl_steps=2", "data.valid=[]"], log=lambda s: None)
    torch.manual_seed(0)
    init = MOSModel(PRESETS["tiny"]()).state_dict()
    after = load_model(tmp_path / "out" / "last", "cpu").state_dict()
    assert all(torch.equal(init[k], after[k]) for k in init if not k.startswith("head."))
    assert not all(torch.equal(init[k], after[k]) for k in init if k.startswith("head."))
    built, _ = load_config(cfg, ["model.ssl_lr_scale=0.1"], SECTIONS)
    utts = load_corpora(built["data"].train, "data.train", None, (1, 5), False)
    task = FinetuneTask(built["model"], built["data"], built["loss"], built["trainer"], utts, [])
    groups = task.param_groups()
    assert [g["name"] for g in groups] == ["ssl", "head"] and groups[0]["lr_scale"] == 0.1


def test_presentation_rates_never_remove_content_or_upsample():
    info = AudioInfo("x.wav", 48000, 48000, 1)
    wide = Utterance("x.wav", 3.0, "s", 0, info)
    narrow = Utterance("x.wav", 3.0, "s", 0, info, bandwidth_hz=4000)
    rates = [8000, 16000, 24000, 96000]
    assert allowed_rates(wide, rates, upsample=False) == {48000}
    assert allowed_rates(narrow, rates, upsample=False) == {8000, 16000, 24000, 48000}
    assert allowed_rates(narrow, rates, upsample=True) == {8000, 16000, 24000, 48000, 96000}


def test_batches_are_deterministic_and_resume_where_they_left_off(data, tmp_path):
    cfg = write_config(tmp_path / "ft.yaml", data, tmp_path / "out", batch_size=4)
    built, _ = load_config(cfg, ["data.present_rates=[8000]", "data.present_prob=0.5"], SECTIONS)
    utts = load_corpora(built["data"].train, "data.train", None, (1, 5), False)
    for u in utts[:20]:  # as if a bandwidth_hz column said these carry nothing above 3.5 kHz
        u.bandwidth_hz = 3500
    task = FinetuneTask(built["model"], built["data"], built["loss"], built["trainer"], utts, [])
    first = [b for _, b in zip(range(14), task.batches(0, 1, seed=0, start=0))]  # 10 batches per epoch
    later = [b for _, b in zip(range(4), task.batches(0, 1, seed=0, start=10))]
    for a, b in zip(first[10:], later):
        assert a["sr"] == b["sr"] and torch.equal(a["wave"], b["wave"]) and torch.equal(a["mos"], b["mos"])
    assert {b["sr"] for b in first} == {8000, 16000, 24000}
    low = [i for i, u in enumerate(utts) if u.bandwidth_hz is None]
    assert all(b["sr"] != 8000 or not set(b["mos"].tolist()) & {utts[i].mos for i in low} for b in first)
    assert all(b["wave"].shape[0] <= 4 for b in first)
    two = [b for _, b in zip(range(5), task.batches(1, 2, seed=0, start=0))]  # rank 1 of 2: its own half
    assert not torch.equal(two[0]["mos"], first[0]["mos"]) or not torch.equal(two[0]["wave"], first[0]["wave"])


@pytest.mark.parametrize("name", ["finetune_example", "pretrain_large_mos", "finetune_amc2025_track3"])
def test_shipped_configs_parse(name):
    from msr_utmos_cli.training.config import build
    from msr_utmos_cli.training.finetune import Corpus

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    built, _ = load_config(path, [], SECTIONS)
    for i, spec in enumerate(built["data"].train + built["data"].valid):
        build(Corpus, spec, f"data[{i}]")
    built["trainer"].validate()
