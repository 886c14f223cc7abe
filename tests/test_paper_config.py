"""The paper's LightningCLI config and dotted flags drive `utmos distill` / `utmos finetune` as written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
import transformers
import yaml
from typer.testing import CliRunner

from msr_utmos_cli.cli import app
from msr_utmos_cli.training.train import TrainConfig

from conftest import speechlike

PAPER_DISTILL = Path(__file__).parent / "fixtures" / "paper_distill_config.yaml"  # the README's text, verbatim
RATES = (16000, 24000, 44100, 48000)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A random 2-layer wav2vec2 teacher saved as a Hugging Face folder (what the paper's teacher id names)
    and one 1 s clip at each of four rates."""
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(1)
    cfg = transformers.Wav2Vec2Config(conv_dim=(16,) * 7, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    transformers.Wav2Vec2Model(cfg).save_pretrained(root / "teacher")
    for i, sr in enumerate(RATES):
        (root / "wavs").mkdir(exist_ok=True)
        sf.write(root / "wavs" / f"clip{i}.wav", speechlike(sr, 1.0, seed=i), sr)
    return root


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_papers_distill_config_runs_as_written(local, tmp_path, monkeypatch):
    """Only the teacher and the data folder are pointed at local files, with the paper's own flag syntax."""
    monkeypatch.chdir(tmp_path)
    r = invoke("distill", "--config", PAPER_DISTILL, f"--model.init_args.teacher_model_path_or_name={local / 'teacher'}",
               "--data.init_args.data_dir", local / "wavs")
    assert r.exit_code == 0, r.output
    ignored = [line for line in r.output.splitlines() if "no meaning here" in line]
    assert len(ignored) == 1 and all(k in ignored[0] for k in (
        "model.class_path", "data.class_path", "model.init_args.student_model_path_or_name"))
    # 4 clips in batches of 16: one step per epoch, max_epochs 10 -> 10 steps, in the paper-run default folder.
    assert "distilled 10 steps" in r.output
    out = tmp_path / "runs" / "distill"
    assert metric_steps(out)[-1] == 10 and (out / "last" / "model.safetensors").is_file()
    cfg = yaml.safe_load((out / "last" / "run_config.yaml").read_text())
    want = {"lr": 1e-4, "weight_decay": 1e-5, "batch_size": 16, "max_epochs": 10, "max_steps": None, "device": "auto"}
    assert {k: cfg["trainer"][k] for k in want} == want
    assert cfg["data"]["rates"] == [16000, 24000, 48000] and cfg["data"]["dirs"] == [str(local / "wavs")]
    assert cfg["model"]["teacher"] == str(local / "teacher")


def test_the_papers_finetune_flags_run_without_a_config(tmp_path, tiny_model_dir, monkeypatch):
    """train_mos.py's command line: lists in one folder, audio under --data.wav_root, bounded by epochs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "audio").mkdir()
    for split, names in (("train", range(4)), ("val", range(2))):
        rows = [f"{split}{i}.wav,{1 + i}" for i in names]
        for i in names:  # all at 16 kHz: the batch count per epoch is fixed by the list length
            sf.write(tmp_path / "audio" / f"{split}{i}.wav", speechlike(16000, 0.5, seed=10 + i), 16000)
        (tmp_path / "lists" / f"{split}.csv").write_text("path,mos\n" + "\n".join(rows) + "\n")
    r = invoke("finetune", f"--model.ssl_model_path={tiny_model_dir}", "--data.train_mos_data_path=lists/train.csv",
               "--data.valid_mos_data_path=lists/val.csv", f"--data.wav_root={tmp_path / 'audio'}",
               "--trainer.max_epochs=3", "--set", "trainer.batch_size=2")
    assert r.exit_code == 0, r.output
    assert "no meaning here" not in r.output
    out = tmp_path / "runs" / "finetune"
    assert "fine-tuned 6 steps" in r.output and metric_steps(out)[-1] == 6  # 4 items / 2 per batch x 3 epochs
    assert (out / "best" / "predictions.csv").is_file()
    cfg = yaml.safe_load((out / "last" / "run_config.yaml").read_text())
    assert cfg["model"]["init"] == str(tiny_model_dir) and cfg["data"]["wav_root"] == str(tmp_path / "audio")
    assert cfg["data"]["train"] == [{"csv": "lists/train.csv"}] and cfg["data"]["valid"] == [{"csv": "lists/val.csv"}]


@pytest.mark.parametrize("flag", ["--print-config", "--print_config"])
def test_print_config_is_the_resolved_yaml_of_either_format(flag, tmp_path):
    paper = invoke("distill", "--config", PAPER_DISTILL, "--trainer.max_epochs=3", flag)
    assert paper.exit_code == 0, paper.output
    resolved = yaml.safe_load(paper.stdout)
    assert resolved["trainer"]["max_epochs"] == 3 and resolved["data"]["dirs"] == ["/path/to/your/unlabeled/wav/files"]
    assert resolved["model"]["teacher"] == "facebook/wav2vec2-base" and resolved["model"]["student"] == "small"
    # Our format in, the same YAML out: feeding the printed config back changes nothing.
    (tmp_path / "ours.yaml").write_text(paper.stdout)
    again = invoke("distill", "--config", tmp_path / "ours.yaml", flag)
    assert again.exit_code == 0 and yaml.safe_load(again.stdout) == resolved and "no meaning" not in again.output
    ours = invoke("finetune", "--config", Path(__file__).parents[1] / "configs" / "finetune_example.yaml", flag,
                  "--init", "base")
    assert ours.exit_code == 0, ours.output
    assert yaml.safe_load(ours.stdout)["model"]["init"] == "base"


def test_epochs_and_steps_bound_a_run_whichever_ends_first(local, tmp_path):
    base = ["distill", "--set", f"model.teacher={local / 'teacher'}", "--set", f"data.dirs=[{local / 'wavs'}]",
            "--set", "model.student=tiny", "--set", "model.sfi_fit_steps=5", "--set", "data.crop_s=0.3",
            "--set", "trainer.batch_size=2", "--set", "trainer.log_every=1"]
    for extra, steps in ((["--trainer.max_epochs=2"], 4), (["--trainer.max_epochs=2", "--trainer.max_steps=3"], 3)):
        out = tmp_path / str(steps)
        r = invoke(*base, "--set", f"trainer.out_dir={out}", *extra)
        assert r.exit_code == 0, r.output
        assert metric_steps(out) == list(range(1, steps + 1))
    assert TrainConfig(out_dir="x").max_steps == 1000 and TrainConfig(out_dir="x", max_epochs=2).max_steps is None


def test_bad_paper_input_is_one_line_exit_2(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(PAPER_DISTILL.read_text() + "  batch_size: 4\n")  # trainer.batch_size beside data's batch_size
    cases = [
        (PAPER_DISTILL, ["--trainer.max_epochz=3"], "did you mean trainer.max_epochs"),
        (PAPER_DISTILL, ["--model.config.lrr=1"], "unknown key model.config.lrr (known here: model.config.lr, "),
        (PAPER_DISTILL, ["--bogus"], "unknown option or argument '--bogus'"),
        (PAPER_DISTILL, ["--trainer.devices=2"], "torchrun --nproc_per_node 2"),
        (PAPER_DISTILL, ["--trainer.accelerator=tpu"], "trainer.accelerator: 'tpu'"),
        (both, [], "data.init_args.batch_size and trainer.batch_size both set trainer.batch_size"),
    ]
    for cfg, extra, message in cases:
        r = invoke("distill", "--config", cfg, "--print-config", *extra)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (extra, r.output)
