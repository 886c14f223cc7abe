"""Distillation end to end on a tiny teacher and synthetic multi-rate audio (CPU, seconds each)."""
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from torchaudio.models import wav2vec2_model
from typer.testing import CliRunner

from msr_utmos_cli.training import distill, distill_data, distill_student
from msr_utmos_cli.cli import app
from msr_utmos_cli.training.distill_data import Presenting
from msr_utmos_cli.training.teacher_cache import CachedTargets, Target, TeacherCache, read_teacher_labels
from msr_utmos_cli.training.teachers import default_params
from msr_utmos_cli.training.train import fit

RATES = [8000, 16000, 22050, 24000, 44100, 48000]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random tiny wav2vec2 teacher (torchaudio format) and six chirps at six native rates."""
    root = tmp_path_factory.mktemp("distill")
    p = default_params(extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
                       encoder_embed_dim=32, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4,
                       encoder_num_layers=2, encoder_num_heads=2, encoder_ff_interm_features=64)
    torch.manual_seed(0)
    torch.save({"params": p, "state_dict": wav2vec2_model(**p).state_dict()}, root / "teacher.pt")
    rng = np.random.default_rng(0)
    (root / "wav").mkdir()
    for i, sr in enumerate(RATES):
        t = np.arange(int(sr * (0.8 + 0.3 * i))) / sr
        x = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t * (1 + 0.5 * t)) + 0.05 * rng.standard_normal(t.size)
        sf.write(root / "wav" / f"f{i}.wav", x.astype(np.float32), sr)
    return root


def overrides(assets, out, steps=6, **extra):
    sets = {"model.teacher": assets / "teacher.pt", "model.student": "tiny", "data.dirs": f"[{assets / 'wav'}]",
            "data.crop_s": 0.5, "trainer.out_dir": out, "trainer.max_steps": steps, "trainer.batch_size": 2,
            "trainer.log_every": 1, "trainer.lr": 3e-3, "trainer.warmup_steps": 1, "trainer.ckpt_every": 3,
            "model.sfi_fit_steps": 20, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def validated_before_and_after_fit(task, trainer, key):
    """`key` of task.validate() on the training clips themselves, before and after training."""
    task.valid_clips = task.clips
    before = task.validate()[key]
    fit(task, trainer, {})
    after = task.validate()[key]
    print(f"{key} {before:.4f} -> {after:.4f}")
    return before, after


def test_student_starts_as_the_teacher_and_the_loss_falls(assets, tmp_path):
    from msr_utmos_cli.training.config import load_config

    built, _ = load_config(None, overrides(assets, tmp_path, 1, **{"model.sfi_fit_steps": 300}), distill.SECTIONS)
    task = distill.DistillTask(built["model"], built["data"], built["trainer"])
    assert task.init_info["copied_tensors"] > 40 and task.init_info["sfi_fit_rel_error"] < 1e-3
    # From scratch (no teacher weights), the distillation loss on fixed held-out presentations must fall.
    sets = overrides(assets, tmp_path / "s", 20, **{"model.init_from_teacher": "false", "data.manifest": "null"})
    built, _ = load_config(None, sets, distill.SECTIONS)
    task = distill.DistillTask(built["model"], built["data"], built["trainer"])
    before, after = validated_before_and_after_fit(task, built["trainer"], "valid_loss")
    assert after < 0.7 * before


def test_batches_are_deterministic_one_rate_each_and_masked(assets):
    from msr_utmos_cli.training.config import load_config

    built, _ = load_config(None, overrides(assets, "unused"), distill.SECTIONS)
    clips = distill_data.collect(built["data"], None)
    a = [next(distill_data.batch_stream(clips, RATES, 0.5, 2, 0, 1, 0, g)) for g in range(4)]
    b = list(zip(range(4), distill_data.batch_stream(clips, RATES, 0.5, 2, 0, 1, 0, 0)))
    for x, (_, y) in zip(a, b):
        assert x["sr"] == y["sr"] and torch.equal(x["wave"], y["wave"]) and torch.equal(x["wave16"], y["wave16"])
        assert (x["bandwidth_hz"] <= x["sr"] / 2).all()
        for w, n in zip(x["wave"], x["lengths"]):
            assert (w[n:] == 0).all()
    # Two ranks with B each see exactly the items one rank with 2B sees.
    one = next(distill_data.batch_stream(clips, RATES, 0.5, 4, 0, 1, 0, 1))
    r0, r1 = (next(distill_data.batch_stream(clips, RATES, 0.5, 2, r, 2, 0, 1)) for r in (0, 1))
    assert one["lengths"].tolist() == r0["lengths"].tolist() + r1["lengths"].tolist()


def test_worker_threads_build_the_same_batches_in_the_same_order(assets):
    from msr_utmos_cli.training.config import load_config

    built, _ = load_config(None, overrides(assets, "unused"), distill.SECTIONS)
    clips = distill_data.collect(built["data"], None)
    inline = distill_data.batch_stream(clips, RATES, 0.5, 2, 0, 1, 0, 3)
    threaded = distill_data.batch_stream(clips, RATES, 0.5, 2, 0, 1, 0, 3, workers=3)
    for _ in range(9):  # more than the 2 * workers batches built ahead
        x, y = next(inline), next(threaded)
        assert x["sr"] == y["sr"] and torch.equal(x["wave"], y["wave"]) and torch.equal(x["lengths"], y["lengths"])
    threaded.close()


def test_items_whose_band_fits_take_the_full_clip_targets(tmp_path):
    """full_when_fits: below the clip's bandwidth nothing is lost, so no rate-specific target is taught."""
    from msr_utmos_cli import audio

    x = np.random.default_rng(0).standard_normal(48000).astype(np.float32) * 0.1
    sf.write(tmp_path / "c.wav", x, 48000, subtype="FLOAT")
    info = audio.probe(tmp_path / "c.wav")
    full_feats, feats8 = torch.ones(60, 4), torch.zeros(60, 4)

    def clip(bw, label=2.0):
        if label is None:
            return distill_data.Clip(info, bw)
        return distill_data.Clip(info, bw, Target(label, full_feats), {8000: Target(4.0, feats8)})

    for bw, fits in ((3000.0, True), (6000.0, False)):
        on = distill_data.present(clip(bw), 0, 24000, 8000, Presenting(full_when_fits=True))
        off = distill_data.present(clip(bw), 0, 24000, 8000)
        assert off.teacher_mos == 4.0 and torch.equal(off.teacher_feats, feats8[: off.teacher_feats.shape[0]])
        assert on.teacher_mos == (2.0 if fits else 4.0)
        assert torch.equal(on.teacher_feats, (full_feats if fits else feats8)[: on.teacher_feats.shape[0]])
        live_on = distill_data.present(clip(bw, None), 0, 24000, 8000, Presenting(full_when_fits=True)).wave16
        native16 = audio.resample(torch.from_numpy(x[:24000]), 48000, 16000)
        via8k = audio.resample(audio.resample(torch.from_numpy(x[:24000]), 48000, 8000), 8000, 16000)
        assert torch.equal(live_on, native16 if fits else via8k)
    # At a rate above the band the at-rate targets are not used either way.
    assert distill_data.present(clip(3000.0), 0, 24000, 16000).teacher_mos == 2.0


def test_training_crops_hear_the_input_rule_scoring_applies(tmp_path):
    """A quiet clip padded with silence trains at the level scoring gives it, on the part scoring hears."""
    from msr_utmos_cli import audio
    from msr_utmos_cli.testing import speechlike

    sr = 16000
    voice = speechlike(sr, 2.0).astype(np.float32) * 0.01
    x = np.concatenate([np.zeros(3 * sr, np.float32), voice, np.zeros(3 * sr, np.float32)])
    sf.write(tmp_path / "q.wav", x, sr, subtype="FLOAT")
    clip = distill_data.Clip(audio.probe(tmp_path / "q.wav"), sr / 2)
    assert distill_data.with_input_rule(clip, None, None) is clip
    sf.write(tmp_path / "z.wav", np.zeros(sr, np.float32), sr, subtype="FLOAT")
    silent = distill_data.Clip(audio.probe(tmp_path / "z.wav"), sr / 2)
    assert distill_data.with_input_rule(silent, -26.0, -40.0) is None  # scoring refuses it: nothing to learn
    assert distill_data.with_input_rule(silent, None, None) is silent
    ruled = distill_data.with_input_rule(clip, -26.0, -40.0)
    sp = audio.input_span(lambda a, b: x[a:b], len(x), sr, -26.0, -40.0)
    assert ruled.span == (sp.start, sp.stop) and ruled.gain == pytest.approx(sp.gain) and ruled.gain > 10
    a, b = ruled.span
    assert 2.8 * sr < a < 3 * sr and 5 * sr < b < 5.2 * sr
    got = distill_data.present(ruled, a, a + sr, sr).wave
    assert torch.allclose(got, torch.from_numpy(x[a:a + sr]) * ruled.gain)
    rms_db = 20 * math.log10(float(torch.sqrt((distill_data.present(ruled, a, b, sr).wave ** 2).mean())))
    assert rms_db == pytest.approx(-26.0, abs=0.1)
    for batch in distill_data.batch_stream([ruled], [sr], 1.0, 4, 0, 1, seed=0, start=0):
        break
    # Every crop comes from inside the span: none of them is the silence scoring never hears.
    assert (batch["wave"].abs().amax(1) > 0.01).all()
    starts = [int(np.random.default_rng([0, 3, i]).integers(b - a - sr + 1)) for i in range(4)]
    for k, s0 in enumerate(starts):
        assert torch.allclose(batch["wave"][k], torch.from_numpy(x[a + s0:a + s0 + sr]) * ruled.gain)
    # Validation hears the first second of the span too, not the silence before it.
    from types import SimpleNamespace
    task = SimpleNamespace(data=SimpleNamespace(crop_s=1.0), presenting=Presenting())
    v = distill.DistillTask._valid_item(task, ruled, sr).wave
    assert torch.allclose(v, torch.from_numpy(x[a:a + sr]) * ruled.gain)


def test_bf16_autocast_trains(assets, tmp_path):
    """CUDA runs default to bf16 autocast; on a CPU the same autocast reaches the same code paths."""
    from msr_utmos_cli import load_model

    s = distill.run(None, overrides(assets, tmp_path / "bf16", 3, **{"trainer.precision": "bf16"}))
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert s["step"] == 3 and len(losses) == 3 and all(math.isfinite(v) for v in losses)
    mos = load_model(tmp_path / "bf16" / "last", "cpu").score(torch.randn(8000) * 0.1, 8000)
    assert 1.0 <= mos <= 5.0


def test_resume_after_interruption_is_bitwise_identical(assets, tmp_path, monkeypatch):
    distill.run(None, overrides(assets, tmp_path / "full", 6))
    loss = distill.DistillTask.loss

    def interrupting(self, batch, step):  # one Ctrl-C during step 3: the loop checkpoints after it
        if step == 2 and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, batch, step)

    monkeypatch.setattr(distill.DistillTask, "loss", interrupting)
    s = distill.run(None, overrides(assets, tmp_path / "part", 6))
    assert s["interrupted"] and s["step"] == 3
    monkeypatch.setattr(distill.DistillTask, "loss", loss)
    assert distill.run(None, overrides(assets, tmp_path / "part", 6), resume=True)["step"] == 6
    a = load_file(tmp_path / "full" / "last" / "model.safetensors")
    b = load_file(tmp_path / "part" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "full" / "last" / "trainer_state.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "part" / "last" / "trainer_state.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # projections too


DDP_SCRIPT = """
import os, sys, torch
from msr_utmos_cli.training import distill
from msr_utmos_cli.training.config import load_config
from msr_utmos_cli.training.train import fit
built, resolved = load_config(None, sys.argv[1:], distill.SECTIONS)
task = distill.DistillTask(built["model"], built["data"], built["trainer"])
fit(task, built["trainer"], resolved)
torch.save(task.model.state_dict(), os.path.join(built["trainer"].out_dir, f"rank{os.environ['RANK']}.pt"))
"""


def test_ddp_two_ranks_identical_weights_and_global_batch(assets, tmp_path):
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(tmp_path / "run.py"), *overrides(assets, out, 3, **{"trainer.device": "cpu"})]  # gloo, any machine
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["global_batch"] == 4
    # The 2 x 2 run sees the same 4 items as one process with batch 4: same loss, same weights (to rounding).
    single = tmp_path / "single"
    distill.run(None, overrides(assets, single, 3, **{"trainer.batch_size": 4, "trainer.device": "cpu"}))
    one = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert abs(one[0]["loss"] - recs[0]["loss"]) < 1e-5
    ws = torch.load(single / "last" / "trainer_state.pt", weights_only=True)["model"]
    print("max |w_ddp - w_single|:", max((w0[k] - ws[k]).abs().max().item() for k in w0))
    assert max((w0[k] - ws[k]).abs().max().item() for k in w0) < 1e-3


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    from msr_utmos_cli.training import TrainingError
    from msr_utmos_cli.training.distributed import device_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_for("auto", 0) == torch.device("cuda:0")
    with pytest.raises(TrainingError, match="rank 1 needs cuda:1 but this machine has 1 GPU"):
        device_for("auto", 1)


def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_config_error_names_the_key_exit_2(assets, tmp_path):
    runner = CliRunner()
    bad = write_yaml(tmp_path / "bad.yaml", f"model:\n  teacher: {assets / 'teacher.pt'}\ntrainer:\n  out_dir: x\n  lrr: 1\n")
    r = runner.invoke(app, ["distill", "--config", bad])
    assert r.exit_code == 2 and "trainer.lrr" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["distill", "--config", bad, "--set", "trainer.lrr=", "--set", "data.rats=[8000]"])
    assert r.exit_code == 2 and "data.rats" in r.output
    r = runner.invoke(app, ["distill", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "missing.yaml" in r.output


def test_cli_end_to_end_output_scores(assets, tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "d.yaml", f"""
model:
  teacher: {assets / 'teacher.pt'}
  student: tiny
  sfi_fit_steps: 20
data:
  dirs: [{assets / 'wav'}]
  crop_s: 0.5
trainer:
  out_dir: {out}
  max_steps: 2
  batch_size: 2
""")
    r = CliRunner().invoke(app, ["distill", "--config", cfg])
    assert r.exit_code == 0, r.output
    assert (out / "last" / "model.safetensors").is_file() and (out / "last" / "run_config.yaml").is_file()
    doc = json.loads((out / "last" / "config.json").read_text())
    meta = doc["metadata"]
    assert meta["task"] == "distill" and meta["step"] == 2 and meta["run_config"]["trainer"]["max_steps"] == 2
    assert doc["weights_sha256"] == hashlib.sha256((out / "last" / "model.safetensors").read_bytes()).hexdigest()
    r = CliRunner().invoke(app, ["score", str(assets / "wav"), "--model", str(out / "last"), "--quiet",
                                 "--device", "cpu", "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(RATES)
    # the same command again would replace the run: refused, before the teacher loads
    metrics = (out / "metrics.jsonl").read_bytes()
    r = CliRunner().invoke(app, ["distill", "--config", cfg])
    assert r.exit_code == 2 and "already holds a run" in r.output and (out / "metrics.jsonl").read_bytes() == metrics


def test_cached_teacher_labels_distil_the_mos_without_running_the_teacher(assets, tmp_path):
    """model.teacher_labels: the student learns the cached clip-level teacher MOS; no teacher is loaded."""
    from msr_utmos_cli.training.config import load_config
    from msr_utmos_cli import load_model

    labels = tmp_path / "labels.csv"
    wavs = sorted((assets / "wav").glob("*.wav"))
    labels.write_text("path,teacher_mos\n" + "".join(f"{p},4.6\n" for p in wavs[:-1]))  # an untrained head says ~3
    sets = overrides(assets, tmp_path / "run", 15, **{"model.teacher": "no-such-teacher", "model.teacher_labels": labels,
                                                     "model.init_from_teacher": "false", "model.mos_loss": "mse"})
    built, _ = load_config(None, sets, distill.SECTIONS)
    task = distill.DistillTask(built["model"], built["data"], built["trainer"])
    assert task.teacher is None and len(task.clips) == len(wavs) - 1  # the unlabelled file is left out
    before, after = validated_before_and_after_fit(task, built["trainer"], "valid_mos")
    assert after < 0.5 * before
    model = load_model(tmp_path / "run" / "last", "cpu")
    assert model.metadata["teacher_kind"] == "cached labels"


def _frame_features(wavs, dim=6):
    """Synthetic cached teacher frames: frame j of a clip holds its j (to check alignment) and
    the log energy of its 20 ms (something a student can learn)."""
    out = {}
    for p in wavs:
        x, sr = sf.read(p, dtype="float32")
        hop = int(0.02 * sr)
        n = len(x) * 16000 // sr // 320 + 1
        e = [np.log(np.mean(x[j * hop:(j + 1) * hop] ** 2) + 1e-4) if j * hop < len(x) else -9.2 for j in range(n)]
        f = np.stack([np.arange(n), *[np.asarray(e) * (k + 1) / dim for k in range(dim - 1)]], 1)
        out[p.name] = torch.tensor(f, dtype=torch.float16)
    return out


def test_cached_teacher_features_are_cropped_on_frames_and_distilled(assets, tmp_path):
    """model.teacher_features: crops start on a teacher frame, the student gets the frames from
    there, and the per-frame loss falls without any teacher loaded."""
    from safetensors.torch import save_file
    from msr_utmos_cli.training.config import ConfigError, load_config

    wavs = sorted((assets / "wav").glob("*.wav"))
    (tmp_path / "labels.csv").write_text("path,teacher_mos\n" + "".join(f"{p.name},3.5\n" for p in wavs))
    (tmp_path / "feats").mkdir()
    feats = _frame_features(wavs)
    save_file(feats, str(tmp_path / "feats" / "a.safetensors"), metadata={"teacher_layer": "1"})
    for p in wavs:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    sets = overrides(assets, tmp_path / "run", 20, **{
        "model.teacher": "no-such-teacher", "model.teacher_labels": tmp_path / "labels.csv",
        "model.teacher_features": tmp_path / "feats", "model.init_from_teacher": "false",
        "model.mos_weight": 0, "model.cosine_weight": 0, "data.dirs": f"[{tmp_path}]"})
    built, _ = load_config(None, sets, distill.SECTIONS)
    task = distill.DistillTask(built["model"], built["data"], built["trainer"])
    assert task.teacher is None and len(task.clips) == len(wavs)
    assert task.model.pairs == [[task.model.student.cfg.num_layers, 1]]
    for clip in task.clips:
        hop = 0.02 * clip.info.sample_rate
        for off in (0, 1, int(hop * 2.6), clip.info.frames // 2):
            start = distill_data.frame_start(clip, off)
            k = round(start / hop)
            assert abs(start - k * hop) < 1 and abs(start - off) <= hop / 2 + 1
            f = distill_data.present(clip, start, min(start + 8000, clip.info.frames), 16000).teacher_feats
            assert f[0, 0] == k  # the slice starts at the crop's own frame
    before, after = validated_before_and_after_fit(task, built["trainer"], "valid_feat_l1")
    assert after < 0.7 * before

    bad = overrides(assets, tmp_path / "bad", 1, **{"model.teacher_labels": tmp_path / "labels.csv",
                    "model.teacher_features": tmp_path / "feats", "model.layers": "[[1,0]]",
                    "data.dirs": f"[{tmp_path}]"})
    built, _ = load_config(None, bad, distill.SECTIONS)
    with pytest.raises(ConfigError, match="holds teacher layer 1 only"):
        distill.DistillTask(built["model"], built["data"], built["trainer"])


@pytest.mark.skipif(importlib.util.find_spec("distillmos") is None, reason="distillmos extra not installed")
def test_label_script_caches_the_teachers_own_frames(assets, tmp_path):
    """scripts/label_with_teacher.py --features stores DistillMOS's transformer frames exactly as the
    live teacher gives them, and a rerun adds nothing twice."""
    from safetensors.torch import load_file
    from msr_utmos_cli.audio import resample
    from msr_utmos_cli.training.teachers import load_teacher

    wavs = sorted((assets / "wav").glob("*.wav"))[:3]
    (tmp_path / "m.csv").write_text("path,duration_s\n" + "".join(f"{p},1\n" for p in wavs))
    cmd = [sys.executable, "scripts/label_with_teacher.py", "--manifest", str(tmp_path / "m.csv"),
           "--out", str(tmp_path / "l.csv"), "--features", str(tmp_path / "f"), "--batch-size", "2"]
    for _ in range(2):
        subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).parents[1])
    assert len((tmp_path / "l.csv").read_text().splitlines()) == 1 + len(wavs)
    cached = {}
    for shard in sorted((tmp_path / "f").glob("*.safetensors")):
        cached.update(load_file(shard))
    teacher = load_teacher("distillmos")
    for p in wavs:
        x, sr = sf.read(p, dtype="float32")
        out = teacher(resample(torch.from_numpy(x), sr, 16000)[None])
        want = out["layers"][1][0, : int(out["lengths"][0])]
        assert cached[str(p)].shape == want.shape
        assert torch.allclose(cached[str(p)].float(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(importlib.util.find_spec("distillmos") is None, reason="distillmos extra not installed")
def test_label_script_stopped_midway_finishes_every_clip_with_one_row(assets, tmp_path):
    """A labelling job stopped between a batch's CSV rows and its feature shard (either way round)
    is finished by a rerun: every clip ends with its features and exactly one row."""
    from safetensors.torch import load_file

    wavs = sorted((assets / "wav").glob("*.wav"))[:3]
    (tmp_path / "m.csv").write_text("path,duration_s\n" + "".join(f"{p},1\n" for p in wavs))
    out, feats = tmp_path / "l.csv", tmp_path / "f"
    cmd = [sys.executable, "scripts/label_with_teacher.py", "--manifest", str(tmp_path / "m.csv"),
           "--out", str(out), "--features", str(feats), "--batch-size", "2"]
    run = lambda: subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).parents[1])

    def cached():
        return {k for shard in feats.glob("*.safetensors") for k in load_file(shard)}

    run()
    sorted(feats.glob("*.safetensors"))[0].unlink()          # rows whose shard was never published
    run()                                                    # its new shard must not overwrite the last one
    assert cached() == {str(p) for p in wavs}
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")            # a shard whose rows never reached the CSV
    run()
    rows = [r.split(",")[0] for r in out.read_text().splitlines()[1:]]
    assert sorted(rows) == sorted(str(p) for p in wavs)
    assert cached() == {str(p) for p in wavs}


def test_targets_at_a_rate_replace_the_full_band_ones_for_that_rate(assets, tmp_path):
    """model.teacher_at_rate: batches presented at 8 kHz carry the teacher's outputs for the clip as
    heard at 8 kHz; other rates keep the full-band ones; a clip missing there is left out."""
    from safetensors.torch import save_file
    from msr_utmos_cli.training.config import ConfigError, load_config

    wavs = sorted((assets / "wav").glob("*.wav"))
    for p in wavs:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "full.csv").write_text("path,teacher_mos\n" + "".join(f"{p.name},4.5\n" for p in wavs))
    (tmp_path / "at8.csv").write_text("path,teacher_mos\n" + "".join(f"{p.name},1.5\n" for p in wavs[1:]))
    feats = _frame_features(wavs)
    for name, scale, keep in (("ffull", 1.0, wavs), ("f8", -1.0, wavs[1:])):
        (tmp_path / name).mkdir()
        save_file({p.name: feats[p.name] * scale for p in keep}, str(tmp_path / name / "a.safetensors"),
                  metadata={"teacher_layer": "1"})
    base = {"model.teacher": "no-such-teacher", "model.teacher_labels": tmp_path / "full.csv",
            "model.teacher_features": tmp_path / "ffull", "model.init_from_teacher": "false",
            "data.dirs": f"[{tmp_path}]", "data.rates": "[8000,16000]"}
    sets = overrides(assets, tmp_path / "run", 1, **base, **{
        "model.teacher_at_rate": f"{{8000: {{labels: {tmp_path / 'at8.csv'}, features: {tmp_path / 'f8'}}}}}"})
    built, _ = load_config(None, sets, distill.SECTIONS)
    task = distill.DistillTask(built["model"], built["data"], built["trainer"])
    assert len(task.clips) == len(wavs) - 1  # wavs[0] has no 8 kHz targets
    seen = set()
    for batch in distill_data.batch_stream(task.clips, [8000, 16000], 0.5, 2, 0, 1, 0, 0):
        want = 1.5 if batch["sr"] == 8000 else 4.5
        assert torch.all(batch["teacher_mos"] == want)
        assert torch.all(batch["teacher_feats"][:, 1:, 0] * (1 if want == 4.5 else -1) >= 1)  # frame index sign
        seen.add(batch["sr"])
        if len(seen) == 2:
            break
    bad = overrides(assets, tmp_path / "bad", 1, **base, **{
        "model.teacher_at_rate": f"{{8000: {{labels: {tmp_path / 'at8.csv'}}}}}"})
    built, _ = load_config(None, bad, distill.SECTIONS)
    with pytest.raises(ConfigError, match="teacher_at_rate.8000"):
        distill.DistillTask(built["model"], built["data"], built["trainer"])


@pytest.mark.parametrize("name", ["default_model", "default_model_consistency", "default_model_stage3", "default_model_gpu",
                                  "distill_distillmos",
                                  "distill_wav2vec2_base"])
def test_shipped_distill_configs_parse(name):
    from msr_utmos_cli.training.config import load_config

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    built, _ = load_config(path, [], distill.SECTIONS)
    built["trainer"].validate()
    assert built["data"].rates and built["model"].mos_loss in ("l1", "mse")


def test_stage3_config_builds_the_bundled_models_architecture():
    """The card's stage-3 command must give the shipped architecture, SFI muting flag included."""
    import json

    from msr_utmos_cli.training.config import load_config

    root = Path(__file__).resolve().parent.parent
    built, _ = load_config(root / "configs" / "default_model_stage3.yaml", [], distill.SECTIONS)
    cfg = distill_student.student_config(built["model"], teacher=None)
    shipped = json.loads((root / "models" / "msr-utmos-small-distillmos" / "config.json").read_text())["config"]
    assert cfg.sfi_mute_above_nyquist is False
    assert cfg.to_dict() == shipped


def _cached_label_sets(assets, tmp_path, full=4.5):
    wavs = sorted((assets / "wav").glob("*.wav"))
    for p in wavs:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "full.csv").write_text("path,teacher_mos\n" + "".join(f"{p.name},{full}\n" for p in wavs))
    return {"model.teacher": "no-such-teacher", "model.teacher_labels": tmp_path / "full.csv",
            "model.init_from_teacher": "false", "model.layers": "[]", "model.mos_loss": "mse",
            "data.dirs": f"[{tmp_path}]", "data.rates": "[8000,16000]"}


def _train_mode_task(sets):
    """A DistillTask from `--set` overrides, in training mode (ConfigError from a bad one)."""
    from msr_utmos_cli.training.config import load_config

    built, _ = load_config(None, sets, distill.SECTIONS)
    task = distill.DistillTask(built["model"], built["data"], built["trainer"])
    task.model.train()
    return task


def _mos_and_own_16k(task, batch):
    """The student's MOS for the batch as trained (train mode, seed 0, as item_losses ran it) and its own
    eval-mode, no-grad MOS for the same audio at 16 kHz (batch["wave_ref"])."""
    task.model.eval()
    with torch.no_grad():
        _, _, ref = task.model(batch["wave_ref"], batch["lengths_ref"], 16000, True)
    task.model.train()
    torch.manual_seed(0)
    _, _, mos = task.model(batch["wave"], batch["lengths"], batch["sr"], True)
    return mos, ref


def test_consistency_rates_are_taught_by_the_students_own_16k_output(assets, tmp_path):
    """model.consistency_rates: an 8 kHz batch's MOS target is the student's own (eval-mode, no-grad) score
    of the same audio upsampled to 16 kHz, not the teacher's label; 16 kHz batches keep the label."""
    from msr_utmos_cli.audio import resample
    from msr_utmos_cli.training.config import ConfigError

    base = _cached_label_sets(assets, tmp_path)
    sets = overrides(assets, tmp_path / "run", 1, **base, **{"model.consistency_rates": "[8000]",
                                                            "model.student_overrides": "{head_dropout: 0.5}"})
    task = _train_mode_task(sets)
    seen = set()
    for batch in task.batches(0, 1, 0, 0):
        torch.manual_seed(0)
        got = task.item_losses(batch)["mos"]
        assert task.model.training  # the target pass put it back in training mode
        if batch["sr"] == 8000:
            for i, n in enumerate(batch["lengths"].tolist()):  # the reference input is the same audio at 16 kHz
                want = resample(batch["wave"][i, :n], 8000, 16000)
                assert torch.allclose(batch["wave_ref"][i, :want.shape[0]], want) and batch["lengths_ref"][i] == want.shape[0]
            mos, ref = _mos_and_own_16k(task, batch)
            assert torch.allclose(got, (mos - ref) ** 2, atol=1e-6)
            assert not torch.allclose(got, (mos - 4.5) ** 2, atol=1e-3)
        else:
            assert batch["wave_ref"].numel() == 0 and torch.all(batch["teacher_mos"] == 4.5)
        seen.add(batch["sr"])
        if len(seen) == 2:
            break
    for bad in ("[16000]", "[12000]"):  # the reference rate itself, or a rate never presented
        with pytest.raises(ConfigError, match="consistency_rates"):
            _train_mode_task(overrides(assets, tmp_path / "bad", 1, **base, **{"model.consistency_rates": bad}))


def test_consistency_weight_adds_the_gap_to_the_students_own_16k_output(assets, tmp_path):
    """model.consistency_weight: a 24 kHz batch keeps the teacher's label and adds weight x the same loss
    against the student's own 16 kHz output for the same audio; 16 kHz batches add nothing."""
    from msr_utmos_cli.audio import resample
    from msr_utmos_cli.training.config import ConfigError

    base = {**_cached_label_sets(assets, tmp_path), "data.rates": "[16000,24000]"}
    sets = overrides(assets, tmp_path / "run", 1, **base, **{"model.consistency_weight": 0.5,
                                                            "model.student_overrides": "{head_dropout: 0.5}"})
    task = _train_mode_task(sets)
    seen = set()
    for batch in task.batches(0, 1, 0, 0):
        torch.manual_seed(0)
        got = task.item_losses(batch)
        assert task.model.training
        if batch["sr"] == 24000:
            for i, n in enumerate(batch["lengths"].tolist()):
                want = resample(batch["wave"][i, :n], 24000, 16000)
                assert torch.allclose(batch["wave_ref"][i, :want.shape[0]], want)
            mos, ref = _mos_and_own_16k(task, batch)
            assert torch.allclose(got["mos"], (mos - 4.5) ** 2, atol=1e-6)  # the teacher's label stays
            assert torch.allclose(got["consistency"], (mos - ref) ** 2, atol=1e-6)
            assert torch.all(got["consistency"] > 0)
            assert torch.allclose(got["loss"], got["mos"] + 0.5 * got["consistency"], atol=1e-6)
        else:
            assert batch["wave_ref"].numel() == 0 and torch.all(got["consistency"] == 0)
            assert torch.allclose(got["loss"], got["mos"])
        seen.add(batch["sr"])
        if len(seen) == 2:
            break
    with pytest.raises(ConfigError, match="consistency_weight"):
        _train_mode_task(overrides(assets, tmp_path / "bad", 1, **base, **{"model.consistency_weight": -1}))


def test_init_from_a_checkpoint_or_a_model_starts_from_its_weights(assets, tmp_path):
    """model.init_from: a distillation checkpoint folder gives student and projections, a model folder the
    student; a different architecture or a missing folder is a one-line config error naming it."""
    import shutil
    from safetensors.torch import save_file
    from msr_utmos_cli.training.config import ConfigError, load_config

    wavs = sorted((assets / "wav").glob("*.wav"))
    base = {**_cached_label_sets(assets, tmp_path), "model.layers": "[[2,1]]",
            "model.teacher_features": tmp_path / "feats"}
    (tmp_path / "feats").mkdir()
    save_file(_frame_features(wavs), str(tmp_path / "feats" / "a.safetensors"), metadata={"teacher_layer": "1"})
    distill.run(None, overrides(assets, tmp_path / "a", 3, **base))
    ckpt = tmp_path / "a" / "last"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)["model"]
    assert any(k.startswith("proj.") for k in state)

    def task_from(source, **extra):
        built, _ = load_config(None, overrides(assets, tmp_path / "b", 1, **base, **{"model.init_from": source,
                                                                                   **extra}), distill.SECTIONS)
        return distill.DistillTask(built["model"], built["data"], built["trainer"])

    fresh = task_from("null")
    assert any(not torch.equal(v, state[k]) for k, v in fresh.model.state_dict().items())
    task = task_from(ckpt)
    assert all(torch.equal(v, state[k]) for k, v in task.model.state_dict().items())
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / f, model_only / f)
    task = task_from(model_only)
    assert all(torch.equal(v, state["student." + k]) for k, v in task.model.student.state_dict().items())
    assert not torch.equal(task.model.proj[0].weight, state["proj.0.weight"])  # projections start fresh
    with pytest.raises(ConfigError, match="different architecture"):
        task_from(model_only, **{"model.student_overrides": "{num_layers: 3}"})
    with pytest.raises(ConfigError, match="do not fit"):
        task_from(ckpt, **{"model.student_overrides": "{num_layers: 3}"})
    with pytest.raises(ConfigError, match="init_from.*no-such"):
        task_from(tmp_path / "no-such")


def test_manifests_and_teacher_labels_are_read_as_spreadsheets_write_them(assets, tmp_path):
    """A byte-order mark, a capitalised header, spaces after commas: one CSV reader for every list;
    a bad value is one line naming the file and line."""
    from msr_utmos_cli.training.config import ConfigError, load_config

    wavs = sorted((assets / "wav").glob("*.wav"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("Path, split, bandwidth_hz\n" + "".join(f"{p}, train, 4000\n" for p in wavs[:3]),
                        encoding="utf-8-sig")
    labels = tmp_path / "labels.csv"
    labels.write_text("path, Teacher_MOS\n" + "".join(f"{p}, 3.5\n" for p in wavs[:2]), encoding="utf-8-sig")
    sets = overrides(assets, tmp_path / "run", 1, **{"data.dirs": "[]", "data.manifest": manifest})
    built, _ = load_config(None, sets, distill.SECTIONS)
    cache = TeacherCache(CachedTargets(read_teacher_labels(labels)))
    clips = distill_data.collect(built["data"], "train", cache)
    assert [c.info.path for c in clips] == [str(p) for p in wavs[:2]] and {c.cached.label for c in clips} == {3.5}
    assert {c.bandwidth_hz for c in clips} == {4000}
    manifest.write_text("path,split,bandwidth_hz\n" + f"{wavs[0]},train,wide\n")
    with pytest.raises(ConfigError, match=rf"^data.manifest: {manifest}: line 2: bandwidth_hz 'wide' is not a number$"):
        distill_data.collect(built["data"], "train")
