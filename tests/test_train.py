"""The shared training loop on a toy task: exact resume, interruption, NaN stop, best/patience, crash-safe folders."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import save_file

from msr_utmos_cli.training import OutDirError, TrainingError
from msr_utmos_cli.training.checkpoints import STATE_FILE, find_checkpoint
from msr_utmos_cli.training.train import TrainConfig, fit, lr_factor


class Toy:
    """y = w x regression with dropout; `interrupt_at` sends SIGINT to itself, `nan_at` returns NaN."""

    def __init__(self, interrupt_at=None, nan_at=None, valid=None):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
        self.interrupt_at, self.nan_at, self.valid = interrupt_at, nan_at, list(valid or [])

    def param_groups(self):
        return [{"params": list(self.model[0].parameters()), "lr_scale": 0.5}, {"params": list(self.model[2].parameters())}]

    def batches(self, rank, world, seed, start):
        g = start
        while True:
            gen = torch.Generator().manual_seed(seed * 100003 + g * 7 + rank)
            x = torch.randn(4, 4, generator=gen)
            yield {"x": x, "y": x.sum(1, keepdim=True)}
            g += 1

    def loss(self, batch, step):
        if step == self.interrupt_at:
            self.interrupt_at = None  # one Ctrl-C: finish the step, checkpoint, leave
            os.kill(os.getpid(), signal.SIGINT)
        loss = (self.model(batch["x"]) - batch["y"]).pow(2).mean()
        return (loss * float("nan") if step == self.nan_at else loss), {"mse": loss.item()}

    def validate(self):
        return {"score": self.valid.pop(0)} if self.valid else None

    def export(self, folder, metadata):
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(metadata))


def cfg(tmp_path, **kw):
    base = dict(max_steps=8, batch_size=4, lr=1e-2, warmup_steps=2, ckpt_every=3, log_every=1)
    return TrainConfig(out_dir=str(tmp_path), **{**base, **kw})


def weights(task):
    return {k: v.clone() for k, v in task.model.state_dict().items()}


def test_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(55, 10, 100) == pytest.approx(0.5) and lr_factor(100, 10, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("accum", [1, 2])
def test_interrupt_then_resume_is_bitwise_identical(tmp_path, accum):
    full = Toy()
    fit(full, cfg(tmp_path / "a", grad_accum=accum), {})
    part = Toy(interrupt_at=4)
    s = fit(part, cfg(tmp_path / "b", grad_accum=accum), {"why": "test"})
    assert s["interrupted"] and s["step"] == 5
    resumed = Toy()
    assert fit(resumed, cfg(tmp_path / "b", grad_accum=accum), {}, resume=True)["step"] == 8
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # no duplicate records after resume


def test_resume_mid_log_window_logs_what_the_uninterrupted_run_logs(tmp_path):
    """Stopped after step 5 with records every 3 steps: the step-6 record still averages steps 4-6."""
    def records(folder):
        rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "audio_s_per_s")} for r in rows]

    fit(Toy(), cfg(tmp_path / "a", log_every=3), {})
    assert fit(Toy(interrupt_at=4), cfg(tmp_path / "b", log_every=3), {})["step"] == 5
    fit(Toy(), cfg(tmp_path / "b", log_every=3), {}, resume=True)
    full, resumed = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in full] == [3, 6, 8]
    assert resumed == full


def test_trainer_state_is_weights_only_and_has_everything(tmp_path):
    fit(Toy(), cfg(tmp_path), {"trainer": {"lr": 0.01}})
    st = torch.load(tmp_path / "last" / STATE_FILE, weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "rng", "batches_consumed", "best", "log_window"} <= set(st)
    assert st["step"] == 8 and (tmp_path / "last" / "run_config.yaml").read_text().startswith("trainer:")


def test_nan_loss_stops_with_one_line_and_keeps_last_good(tmp_path):
    with pytest.raises(TrainingError) as e:
        fit(Toy(nan_at=4), cfg(tmp_path), {})
    assert "\n" not in str(e.value) and "step 3" in str(e.value)
    assert torch.load(tmp_path / "last" / STATE_FILE, weights_only=True)["step"] == 3


def test_best_checkpoint_and_patience(tmp_path):
    task = Toy(valid=[0.5, 0.9, 0.7, 0.6, 0.4])
    s = fit(task, cfg(tmp_path, valid_every=1, patience=2, max_steps=20), {}, select_metric="score")
    assert s["early_stopped"] and s["step"] == 4 and s["best"] == 0.9
    assert json.loads((tmp_path / "best" / "config.json").read_text())["step"] == 2


def test_a_kill_between_renames_leaves_a_loadable_checkpoint(tmp_path):
    fit(Toy(), cfg(tmp_path), {})
    os.replace(tmp_path / "last", tmp_path / ".last.old")  # the moment after `last` moved aside
    assert find_checkpoint(tmp_path) == tmp_path / ".last.old"
    assert fit(Toy(), cfg(tmp_path, max_steps=10), {}, resume=True)["step"] == 10


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        fit(Toy(), cfg(tmp_path), {}, resume=True)


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_untouched(tmp_path):
    fit(Toy(), cfg(tmp_path), {})
    before = {p.name: p.read_bytes() for p in (tmp_path / "metrics.jsonl", tmp_path / "last" / STATE_FILE)}
    with pytest.raises(OutDirError, match="already holds a run .*--resume.*--overwrite"):
        fit(Toy(), cfg(tmp_path, max_steps=4), {})
    assert {p.name: p.read_bytes() for p in (tmp_path / "metrics.jsonl", tmp_path / "last" / STATE_FILE)} == before
    with pytest.raises(OutDirError, match="exclude each other"):
        fit(Toy(), cfg(tmp_path), {}, resume=True, overwrite=True)
    fit(Toy(), cfg(tmp_path, max_steps=4), {}, overwrite=True)  # a new run, not the old one's tail
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and torch.load(find_checkpoint(tmp_path) / STATE_FILE)["step"] == 4


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps" if not torch.backends.mps.is_available() else "tpu"])
def test_trainer_device_follows_the_scoring_rule_with_one_line_errors(tmp_path, device):
    """trainer.device is read by the same rule as `utmos score --device`; a wrong one stops before training."""
    with pytest.raises(TrainingError, match=r"^trainer\.device: .*") as e:
        fit(Toy(), cfg(tmp_path, device=device), {})
    assert "\n" not in str(e.value) and not (tmp_path / "metrics.jsonl").exists()
