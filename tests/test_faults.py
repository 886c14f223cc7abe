"""Faults: malformed or malicious checkpoints, SIGKILL then --resume, a full disk, an unwritable output, two writers."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from msr_utmos_cli import ModelLoadError, MOSModel, PRESETS, load_model, save_model
from msr_utmos_cli.checkpoint import CONFIG, WEIGHTS
from msr_utmos_cli.cli import app
from msr_utmos_cli import output
from msr_utmos_cli.output import CSV_HEADER, OutputError, write_scores

from hostile import make_odd_paths, speech

UTMOS = [sys.executable, "-m", "msr_utmos_cli", "score"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test machine is small and shared


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows_of(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="")))


def same_rows(a: bytes, b: bytes) -> None:
    """Same paths in the same order, same errors, scores equal to the 4th decimal."""
    ra, rb = rows_of(a), rows_of(b)
    assert [r["path"] for r in ra] == [r["path"] for r in rb]
    for x, y in zip(ra, rb):
        assert (x["error"], x["sample_rate"]) == (y["error"], y["sample_rate"])
        assert (x["mos"] == "") == (y["mos"] == "") and (x["mos"] == "" or abs(float(x["mos"]) - float(y["mos"])) < 1e-4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """40 short files at mixed rates, two of them broken."""
    d = tmp_path_factory.mktemp("forty")
    rates = [8000, 16000, 22050, 44100, 48000]
    for i in range(38):
        sr = rates[i % len(rates)]
        sf.write(d / f"f{i:02d}_{sr}.wav", speech(sr, 0.3 + 0.01 * i, seed=i), sr)
    (d / "f90_broken.wav").write_bytes(b"RIFF....WAVEjunk")
    sf.write(d / "f91_silent.wav", speech(16000, 0.5) * 0, 16000)
    return d


@pytest.fixture(scope="module")
def reference(files, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.csv"
    assert run("score", files, "--model", tiny_model_dir, "--out", out, "-q").exit_code == 0
    return out.read_bytes()


# --- malformed and malicious checkpoints ------------------------------------------
def _json_edit(key, value):
    def edit(folder):
        doc = json.loads((folder / CONFIG).read_text())
        (doc if key == "format_version" else doc["config"])[key] = value
        (folder / CONFIG).write_text(json.dumps(doc))
    return edit


BROKEN_MODELS = {
    "missing_config": (lambda f: (f / CONFIG).unlink(), CONFIG, "missing"),
    "bad_json": (lambda f: (f / CONFIG).write_text("{not json"), CONFIG, "unreadable config"),
    "wrong_format": (lambda f: (f / CONFIG).write_text('{"format": "other", "config": {}}'), CONFIG, "not an msr-utmos"),
    "newer_format": (_json_edit("format_version", 99), CONFIG, "upgrade"),
    "format_version_text": (_json_edit("format_version", "1"), CONFIG, "integer"),
    "negative_size": (_json_edit("embed_dim", -5), CONFIG, "invalid model config"),
    "wrong_type": (_json_edit("embed_dim", "big"), CONFIG, "invalid model config"),
    "missing_weights": (lambda f: (f / WEIGHTS).unlink(), WEIGHTS, "missing"),
    "empty_weights": (lambda f: (f / WEIGHTS).write_bytes(b""), WEIGHTS, "corrupt or truncated"),
    "truncated_weights": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]), WEIGHTS,
                          "corrupt or truncated"),
    "random_weights": (lambda f: (f / WEIGHTS).write_bytes(random.Random(0).randbytes(4096)), WEIGHTS,
                       "corrupt or truncated"),
    "other_preset": (None, WEIGHTS, "do not match the architecture"),
}


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_broken_model_is_one_line_error_naming_the_file(case, tiny_model_dir, tmp_path, files):
    edit, culprit, cause = BROKEN_MODELS[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if edit is None:  # weights of the small preset under a tiny config that records no SHA-256 (before 0.2.0)
        torch.manual_seed(0)
        save_model(MOSModel(PRESETS["small"]()), tmp_path / "small")
        shutil.copy(tmp_path / "small" / WEIGHTS, folder / WEIGHTS)
        doc = json.loads((folder / CONFIG).read_text())
        del doc["weights_sha256"]
        (folder / CONFIG).write_text(json.dumps(doc))
    else:
        edit(folder)
    with pytest.raises(ModelLoadError) as e:
        load_model(folder, "cpu")
    msg = str(e.value)
    assert str(folder / culprit) in msg and cause in msg and "\n" not in msg
    r = run("score", files / "f00_8000.wav", "--model", folder)
    assert r.exit_code == 2 and "Traceback" not in r.output and str(folder / culprit) in r.output


class _Plant:
    """Unpickling this creates `marker`: stands in for any code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoints_never_unpickle(tiny_model_dir, tmp_path, monkeypatch):
    marker = str(tmp_path / "PWNED")
    blob = tmp_path / "evil.pt"
    torch.save({"model": _Plant(marker)}, blob)
    torch.load(blob, weights_only=False)  # control: the plant is live
    assert os.path.exists(marker)
    os.unlink(marker)

    renamed = tmp_path / "renamed"  # a pickle renamed to model.safetensors
    shutil.copytree(tiny_model_dir, renamed)
    shutil.copy(blob, renamed / WEIGHTS)
    only_bin = tmp_path / "only_bin"  # the transformers convention, without safetensors
    shutil.copytree(tiny_model_dir, only_bin)
    os.replace(only_bin / WEIGHTS, only_bin / "pytorch_model.bin")
    shutil.copy(blob, only_bin / "pytorch_model.bin")
    beside = tmp_path / "beside"  # a valid model with a trainer state next to it
    shutil.copytree(tiny_model_dir, beside)
    shutil.copy(blob, beside / "trainer_state.pt")

    def no_unpickling(*a, **k):
        raise AssertionError("a checkpoint was unpickled")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, no_unpickling)

    for folder in (renamed, only_bin):
        with pytest.raises(ModelLoadError):
            load_model(folder, "cpu")
    with pytest.raises(ModelLoadError):
        load_model(only_bin / "pytorch_model.bin", "cpu")
    assert load_model(beside, "cpu") is not None
    r = run("score", tmp_path, "--model", renamed)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not os.path.exists(marker)


# --- SIGKILL, then --resume -------------------------------------------------------
def _grows(path, size, proc, timeout=60.0) -> bool:
    """Wait until `path` is bigger than `size` (the run is writing rows) or the run ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if os.path.exists(path) and os.path.getsize(path) > size:
            return True
        time.sleep(0.01)
    return False


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(files, reference, tiny_model_dir, tmp_path):
    out = tmp_path / "killed.csv"
    rng = random.Random(7)
    cmd = UTMOS + [str(files), "--model", str(tiny_model_dir), "--out", str(out), "-q",
                   "--chunk-files", "3"]
    kills = 0
    for attempt in range(4):
        size = out.stat().st_size if out.exists() else 0
        p = subprocess.Popen(cmd + (["--resume"] if attempt else []), stderr=subprocess.PIPE, env=ONE_THREAD)
        if _grows(out, size, p):
            time.sleep(rng.uniform(0.0, 0.3))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        p.wait(timeout=120)
        data = out.read_bytes()
        header = (output.CSV_HEADER + "\n").encode()
        assert data in (b"", header) or rows_of(data[: output.complete_prefix(data, "csv")])  # whole rows so far
    assert kills >= 2, "the runs finished before they could be killed; use more files"
    p = subprocess.run(cmd + ["--resume"], capture_output=True, timeout=120, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    final = out.read_bytes()
    assert final.endswith(b"\n")
    same_rows(final, reference)  # no row missing, none twice, same order


def test_resume_after_a_cut_at_any_byte(tiny_model_dir, tmp_path):
    """Whatever byte the file was cut at (a crash, a full disk), --resume ends with the same rows,
    including a path with a quoted newline and a path that is not UTF-8."""
    make_odd_paths(tmp_path / "odd")
    model = load_model(tiny_model_dir, "cpu")
    full = tmp_path / "full.csv"
    write_scores(model, [str(tmp_path / "odd")], str(full), chunk_files=4)
    data = full.read_bytes()
    nl = data.index(b"new\nline") + 4
    cuts = sorted({5, nl, nl + 1, len(data) - 1} | set(random.Random(1).sample(range(len(data)), 2)))
    for cut in cuts:
        out = tmp_path / f"cut{cut}.csv"
        out.write_bytes(data[:cut])
        write_scores(model, [str(tmp_path / "odd")], str(out), resume=True, chunk_files=4)
        same_rows(out.read_bytes(), data)


# --- disk full, unwritable output --------------------------------------------------
def test_disk_full_keeps_whole_rows_in_process(files, reference, tiny_model_dir, tmp_path, monkeypatch):
    """ENOSPC part-way through a chunk (a short write, then the error): a clear OutputError, and the
    file holds exactly the rows of the chunks written before, ending with a whole row."""
    real_write, budget = os.write, [900]

    def write(fd, data):
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n
    monkeypatch.setattr(output.os, "write", write)
    out = tmp_path / "full.csv"
    with pytest.raises(OutputError, match="No space left on device"):
        write_scores(load_model(tiny_model_dir, "cpu"), [str(files)], str(out), chunk_files=4)
    data = out.read_bytes()
    assert 0 < len(data) <= 900 and data.endswith(b"\n") and reference.startswith(data)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 24 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here; the in-process ENOSPC test covers disk full")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_a_real_small_filesystem(files, tiny_model_dir, small_tmpfs):
    """One free 4 KiB page for ~5 KiB of JSON lines: the run stops with a clear error, the rows
    written stay whole, and after space is freed --resume completes the job."""
    (small_tmpfs / "filler").write_bytes(b"\0" * (20 * 1024))
    out = small_tmpfs / "scores.jsonl"
    args = ["score", files, "--model", tiny_model_dir, "--out", out, "--format", "jsonl", "--chunk-files", "4"]
    r = run(*args)
    assert r.exit_code == 2 and "No space left on device" in r.output and "Traceback" not in r.output, r.output
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < len(data) <= 4096
    first = [json.loads(line)["path"] for line in data.splitlines()]
    (small_tmpfs / "filler").unlink()  # space again: resume finishes the job
    assert run(*args, "--resume").exit_code == 0
    rows = [json.loads(line) for line in out.read_bytes().splitlines()]
    paths = [row["path"] for row in rows]
    assert paths[: len(first)] == first and len(paths) == len(set(paths)) == 40
    assert paths == sorted(paths)  # the walk's order, unbroken by the failure


def test_unwritable_output_is_a_clear_error(files, tiny_model_dir, tmp_path):
    """chmod does not stop root, so: a path under a regular file, a directory as --out, a read-only mount."""
    plain = tmp_path / "plain.txt"
    plain.write_text("keep me\n")
    for out, cause in ((plain / "scores.csv", "Not a directory"), (tmp_path, "Is a directory"),
                       (tmp_path / "no" / "such" / "dir.csv", "No such file or directory")):
        r = run("score", files / "f00_8000.wav", "--model", tiny_model_dir, "--out", out)
        assert r.exit_code == 2 and cause in r.output and "Traceback" not in r.output, r.output
    assert plain.read_text() == "keep me\n"
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "old.csv").write_text(CSV_HEADER + "\n")  # a header only: the file a run leaves when killed at once
    if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True).returncode:
        return  # no mount permission; the cases above still ran
    try:
        for extra in ([], ["--resume"]):
            r = run("score", files / "f00_8000.wav", "--model", tiny_model_dir, "--out", ro / "old.csv", *extra)
            assert r.exit_code == 2 and "Read-only file system" in r.output, r.output
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert (ro / "old.csv").read_text() == CSV_HEADER + "\n"


# --- two writers -------------------------------------------------------------------
def test_second_writer_is_refused_never_interleaved(files, reference, tiny_model_dir, tmp_path):
    """The first run reads its paths from a pipe we hold open, so it is certainly mid-run (lock held,
    rows written) while two more runs, --overwrite and --resume, try the same output."""
    out = tmp_path / "shared.csv"
    paths = [str(p) for p in sorted(files.iterdir())]
    base = UTMOS + ["--model", str(tiny_model_dir), "--out", str(out), "--chunk-files", "2"]
    first = subprocess.Popen(base + ["-", "-q"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=ONE_THREAD,
                             text=True)
    first.stdin.write("".join(p + "\n" for p in paths[:10]))
    first.stdin.flush()
    assert _grows(out, 0, first), "first run ended before writing"
    second = subprocess.run(base + [str(files), "--overwrite"], capture_output=True, text=True, timeout=120,
                            env=ONE_THREAD)
    third = subprocess.run(base + [str(files), "--resume"], capture_output=True, text=True, timeout=120,
                           env=ONE_THREAD)
    first.stdin.write("".join(p + "\n" for p in paths[10:]))
    first.stdin.close()
    assert first.wait(timeout=120) == 0
    for p in (second, third):
        assert p.returncode == 2 and "another utmos run is writing this file" in p.stderr
        assert "Traceback" not in p.stderr
    same_rows(out.read_bytes(), reference)


# --- the training loop under SIGKILL -------------------------------------------------
_TRAIN = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_train import Toy, cfg
from msr_utmos_cli.training.train import fit
fit(Toy(), cfg({out!r}, max_steps={steps}, ckpt_every=1, log_every=1000), {{}}, resume={resume})
"""


def _newest_checkpoint_loads(out_dir):
    from safetensors.torch import load_file

    from msr_utmos_cli.training.checkpoints import find_checkpoint, load_trainer_state

    folder = find_checkpoint(out_dir)
    if folder is None:
        return 0
    state = load_trainer_state(folder)
    load_file(folder / WEIGHTS)
    return state["step"]


def test_training_killed_mid_step_or_mid_checkpoint_resumes_to_the_same_weights(tmp_path):
    """SIGKILL at random moments of a run that checkpoints every step (so kills land inside
    checkpoint writes too): the newest checkpoint on disk always loads, and resuming ends on
    bitwise the weights of an uninterrupted run (CPU)."""
    test_train = pytest.importorskip("test_train")
    from msr_utmos_cli.training.train import fit

    steps, tests = 150, str(Path(__file__).parent)
    out = tmp_path / "run"
    rng, kills, last = random.Random(3), 0, 0
    for attempt in range(3):
        code = _TRAIN.format(tests=tests, out=str(out), steps=steps, resume=attempt > 0 and last > 0)
        p = subprocess.Popen([sys.executable, "-c", code], env=ONE_THREAD, stderr=subprocess.PIPE)
        end = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < end and not (out / "last").exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(timeout=60)
        step = _newest_checkpoint_loads(out)
        assert step >= last  # never goes back
        last = step
    assert kills >= 1 and last < steps
    resumed = test_train.Toy()
    assert fit(resumed, test_train.cfg(out, max_steps=steps, ckpt_every=1, log_every=1000), {},
               resume=True)["step"] == steps
    full = test_train.Toy()
    fit(full, test_train.cfg(tmp_path / "full", max_steps=steps, ckpt_every=1, log_every=1000), {})
    a, b = test_train.weights(full), test_train.weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_state_pickle_is_refused(tmp_path):
    """`--resume` reads trainer_state.pt with weights_only=True: a planted pickle is refused, not run."""
    from msr_utmos_cli.training import TrainingError
    from msr_utmos_cli.training.checkpoints import STATE_FILE, load_trainer_state

    marker = tmp_path / "PWNED"
    torch.save({"step": 1, "evil": _Plant(str(marker))}, tmp_path / STATE_FILE)
    with pytest.raises(TrainingError, match="cannot resume"):
        load_trainer_state(tmp_path)
    assert not marker.exists()
