"""`utmos score` in CI: exit codes a pipeline can trust, gates over the whole file, no silent loss, provenance."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from msr_utmos_cli import MOSModel, PRESETS, __version__, save_model
from msr_utmos_cli.cli import app
from msr_utmos_cli.output import COLUMNS, CSV_HEADER, JSONL_KEYS

from msr_utmos_cli.testing import speechlike

HEADER = (CSV_HEADER + "\n").encode()


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    """A TTS output folder: five good files and one broken one."""
    d = tmp_path_factory.mktemp("tts_out")
    for i, sr in enumerate([8000, 16000, 22050, 44100, 48000]):
        sf.write(d / f"u{i}_{sr}.wav", speechlike(sr, 0.6 + 0.1 * i, seed=i), sr)
    (d / "u9_broken.wav").write_bytes(b"RIFF....WAVEjunk")
    return d


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("other_model")
    save_model(MOSModel(PRESETS["tiny"]()), folder, {"name": "other", "model_version": "2.3.4"})
    return folder


def file_mean(path) -> float:
    return float(pd.read_csv(path)["mos"].mean())


# --- exit codes --------------------------------------------------------------------------
def test_missing_path_is_exit_2_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    r = run("score", tmp_path / "no" / "such" / "dir", "--model", tiny_model_dir, "--out", out)
    assert r.exit_code == 2 and "no such file or directory" in r.output and len(r.output.splitlines()) == 1
    r = run("score", f"@{tmp_path / 'no_list.txt'}", "--model", tiny_model_dir, "--out", out)
    assert r.exit_code == 2 and "no_list.txt: no such file or directory" in r.output
    assert not out.exists()


def test_empty_or_unreadable_folder_fails_and_still_writes_a_header(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # without ffmpeg, .m4a is not audio
    empty, m4a = tmp_path / "empty", tmp_path / "m4a"
    empty.mkdir()
    m4a.mkdir()
    (m4a / "a.m4a").write_bytes(b"\0" * 64)
    (m4a / "b.pcm").write_bytes(b"\0" * 64)
    for folder, extra, hint in ((empty, [], ""), (empty, ["--strict"], ""), (m4a, ["--strict"], "1 .m4a, 1 .pcm")):
        out = tmp_path / f"{folder.name}{len(extra)}.csv"
        r = run("score", folder, "--model", tiny_model_dir, "--out", out, *extra)
        assert r.exit_code == 2 and "no audio files found" in r.output and hint in r.output, r.output
        assert out.read_bytes() == HEADER
        assert list(pd.read_csv(out).columns) == COLUMNS  # pandas, no options, reads it


def test_nothing_scored_is_exit_1(tiny_model_dir, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    r = run("score", tmp_path, "--model", tiny_model_dir, "-q")
    assert r.exit_code == 1 and "no file could be scored (2 error(s))" in r.output


def test_strict_fails_on_error_rows_of_an_earlier_run(tts, tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    assert run("score", tts, "--model", tiny_model_dir, "--out", out).exit_code == 0  # no --strict: ok
    r = run("score", tts, "--model", tiny_model_dir, "--out", out, "--resume", "--strict")
    assert r.exit_code == 1 and "--strict: 1 file(s) could not be scored" in r.output, r.output


def test_resume_gates_judge_every_row_of_the_file(tts, tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    assert run("score", tts, "--model", tiny_model_dir, "--out", out, "-q").exit_code == 0
    mean = file_mean(out)
    # finished file: nothing new to score, the gate still sees the file's mean
    r = run("score", tts, "--model", tiny_model_dir, "--out", out, "--resume", "--fail-under", mean - 1e-3)
    assert r.exit_code == 0 and f"mean MOS {mean:.3f}" in r.output and "6 files in" in r.output, r.output
    r = run("score", tts, "--model", tiny_model_dir, "--out", out, "--resume", "--fail-under", mean + 1e-3)
    assert r.exit_code == 1 and f"mean MOS {mean:.3f} is below" in r.output
    # partial file: two rows kept, four scored now; the summary covers all six
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]))
    r = run("score", tts, "--model", tiny_model_dir, "--out", out, "--resume", "--fail-under", mean - 1e-3)
    assert r.exit_code == 0 and "(2 earlier, 4 new): 5 scored, 1 errors" in r.output and f"{mean:.3f}" in r.output


def test_sigterm_ends_as_interrupted_with_rows_kept(tts, tiny_model_dir, tmp_path):
    """A cancelled CI job: the run reads paths from a pipe we hold open, so it is mid-run when signalled."""
    out = tmp_path / "s.csv"
    p = subprocess.Popen([sys.executable, "-m", "msr_utmos_cli", "score", "-", "--model", str(tiny_model_dir),
                          "--out", str(out), "--chunk-files", "1", "-q"], stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    p.stdin.write(f"{tts / 'u0_8000.wav'}\n")
    p.stdin.flush()
    deadline = time.time() + 120
    while out.stat().st_size <= len(HEADER) if out.exists() else True:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 130
    assert "interrupted; finished rows are in" in p.stderr.read()
    assert len(pd.read_csv(out)) == 1


def test_unknown_device_is_one_short_line(tts, tiny_model_dir, tmp_path):
    r = run("score", tts, "--model", tiny_model_dir, "--device", "gpu", "--out", tmp_path / "s.csv")
    assert r.exit_code == 2 and r.output.strip() == "error: unknown device 'gpu' (use auto, cpu, cuda, cuda:N or mps)"
    assert not (tmp_path / "s.csv").exists()


# --- no silent loss --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_existing_output_is_refused_untouched_unless_resume_or_overwrite(fmt, tts, tiny_model_dir, tmp_path):
    out = tmp_path / f"s.{fmt}"
    one = tts / "u1_16000.wav"
    assert run("score", one, "--model", tiny_model_dir, "--out", out, "--format", fmt).exit_code == 0
    before = out.read_bytes()
    r = run("score", tts, "--model", tiny_model_dir, "--out", out, "--format", fmt)
    assert r.exit_code == 2 and "already holds results" in r.output and "--overwrite" in r.output
    assert out.read_bytes() == before
    r = run("score", tts, "--model", tiny_model_dir, "--out", out, "--format", fmt, "--overwrite", "-q")
    assert r.exit_code == 0 and out.read_bytes() != before and len(out.read_bytes().splitlines()) == 6 + (fmt == "csv")
    empty = tmp_path / f"empty.{fmt}"  # an empty file (mktemp) holds nothing to lose
    empty.write_bytes(b"")
    assert run("score", one, "--model", tiny_model_dir, "--out", empty, "--format", fmt).exit_code == 0


def test_resume_refuses_another_format_columns_or_model(tts, tiny_model_dir, other_model_dir, tmp_path):
    csv_out, jsonl_out = tmp_path / "s.csv", tmp_path / "s.jsonl"
    one = tts / "u1_16000.wav"
    assert run("score", one, "--model", tiny_model_dir, "--out", csv_out).exit_code == 0
    assert run("score", one, "--model", tiny_model_dir, "--out", jsonl_out, "--format", "jsonl").exit_code == 0
    odd = tmp_path / "odd.csv"
    odd.write_text("path,mos\nx.wav,3.0\n")
    cases = [(csv_out, ["--format", "jsonl"], "it is a CSV (resume it with --format csv)"),
             (jsonl_out, [], "it holds JSON lines (resume it with --format jsonl)"),
             (odd, [], "its columns (path,mos) differ"),
             (csv_out, ["--model", other_model_dir], "it was scored by tiny_model"),
             (jsonl_out, ["--format", "jsonl", "--model", other_model_dir], "this run uses other 2.3.4")]
    for out, extra, why in cases:
        before = out.read_bytes()
        r = run("score", tts, "--model", tiny_model_dir, "--out", out, "--resume", *extra)
        assert r.exit_code == 2 and "cannot resume" in r.output and why in r.output, (out, r.output)
        assert out.read_bytes() == before


# --- provenance ------------------------------------------------------------------------------
def test_version_names_the_default_model_and_its_weights_hash():
    from msr_utmos_cli.checkpoint import WEIGHTS, default_model_name, models_dir

    r = run("--version")
    name = default_model_name()
    weights = models_dir() / name / WEIGHTS
    version = json.loads((models_dir() / name / "config.json").read_text())["metadata"]["model_version"]
    assert r.exit_code == 0 and r.output.splitlines() == [
        f"msr-utmos {__version__}", f"default model: {name} {version}, weights sha256 {sha256(weights)}"]


def test_scores_record_model_version_hash_and_package_version(tts, tiny_model_dir, other_model_dir, tmp_path):
    rows_out, csv_out = tmp_path / "s.jsonl", tmp_path / "s.csv"
    assert run("score", tts, "--model", other_model_dir, "--out", rows_out, "--format", "jsonl").exit_code == 0
    want = {"model": "other", "model_version": "2.3.4", "model_sha256": sha256(other_model_dir / "model.safetensors"),
            "msr_utmos_version": __version__}
    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert len(rows) == 6 and all(list(r) == JSONL_KEYS and {k: r[k] for k in want} == want for r in rows)
    assert run("score", tts, "--model", tiny_model_dir, "--out", csv_out).exit_code == 0
    meta = json.loads((tmp_path / "s.csv.meta.json").read_text())
    assert meta["model"] == tiny_model_dir.name and meta["model_version"] is None
    assert meta["model_sha256"] == sha256(tiny_model_dir / "model.safetensors")
    assert meta["msr_utmos_version"] == __version__
    assert list(pd.read_csv(csv_out).columns) == COLUMNS  # the CSV itself stays plain


def test_report_records_provenance_and_warns_when_models_are_mixed(tts, tiny_model_dir, other_model_dir, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.jsonl"
    assert run("score", tts, "--model", tiny_model_dir, "--out", a).exit_code == 0
    assert run("score", tts, "--model", other_model_dir, "--out", b, "--format", "jsonl").exit_code == 0
    rep, html = tmp_path / "r.json", tmp_path / "r.html"
    r = run("report", a, "--json", rep, "--html", html)
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    doc = json.loads(rep.read_text())
    tiny_sha = sha256(tiny_model_dir / "model.safetensors")
    assert doc["provenance"]["scores"][0]["models"] == [{"model": tiny_model_dir.name, "model_version": None,
                                                         "model_sha256": tiny_sha, "msr_utmos_version": __version__}]
    assert doc["provenance"]["report_msr_utmos_version"] == __version__ and doc["warnings"] == []
    assert tiny_sha[:12] in html.read_text() and tiny_model_dir.name in html.read_text()
    r = run("report", a, b, "--json", rep, "--html", html)
    assert r.exit_code == 0 and "warning: score files from different models are mixed" in r.output
    warnings = json.loads(rep.read_text())["warnings"]  # and the same paths, pooled, count twice
    assert "other 2.3.4" in r.output and len(warnings) == 2 and "6 row(s) repeat a path" in warnings[1]
    assert "different models are mixed" in html.read_text()
    r = run("report", a, "--baseline", b)
    assert r.exit_code == 0 and "warning: the baseline was scored by other 2.3.4" in r.output


def test_report_refuses_an_unwritable_output_before_any_work(tts, tiny_model_dir, tmp_path):
    a = tmp_path / "a.csv"
    assert run("score", tts, "--model", tiny_model_dir, "--out", a, "-q").exit_code == 0
    for opt, path in (("--html", "/proc/x.html"), ("--json", tmp_path / "no" / "dir.json"), ("--html", tmp_path)):
        r = run("report", a, opt, path)
        assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.splitlines()) == 1, r.output
    assert not (tmp_path / "no").exists()


# --- the CLI as people expect it ---------------------------------------------------------------
@pytest.mark.parametrize("command", ["score", "distill", "finetune", "export", "report"])
def test_help_shows_readable_types_and_an_example(command):
    r = run(command, "--help")
    assert r.exit_code == 0 and "Example" in r.output and f"utmos {command}" in r.output
    for tag in ("<bool>", "<str>", "<list", "<int", "<float", "<path"):
        assert tag not in r.output, (command, tag)


def test_top_help_offers_completion_and_does_not_import_torch():
    code = ("import sys\nfrom msr_utmos_cli.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--install-completion" in p.stdout and "--show-completion" in p.stdout and "--version" in p.stdout
    assert p.stdout.strip().endswith("False")
    p = subprocess.run([sys.executable, "-m", "msr_utmos_cli", "--show-completion", "bash"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "complete" in p.stdout


def test_progress_counts_files_against_a_known_total_window_by_window(tiny_model_dir, tmp_path):
    """Library: a total before any work, then a call per window (a 3-window file moves the count 3 times)."""
    from msr_utmos_cli import load_model
    from msr_utmos_cli.output import write_scores

    sf.write(tmp_path / "long.wav", speechlike(16000, 3.0), 16000)
    sf.write(tmp_path / "short.wav", speechlike(16000, 0.5), 16000)
    (tmp_path / "bad.wav").write_bytes(b"junk")
    calls = []
    write_scores(load_model(tiny_model_dir, "cpu"), [str(tmp_path)], str(tmp_path / "s.csv"),
                 progress=lambda done, total: calls.append((round(done, 6), total)), window_s=1.0)
    assert calls[0] == (0.0, 3) and calls[-1] == (3.0, 3)
    assert [c for c, _ in calls] == sorted(c for c, _ in calls) and len(calls) >= 1 + 1 + 3 + 1
    assert any(0 < c < 1 or 1 < c < 2 for c, _ in calls)  # inside the long file, before its row is done


def test_progress_bar_on_a_terminal_shows_total_and_eta(tts, tiny_model_dir, tmp_path):
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "msr_utmos_cli", "score", str(tts), "--model", str(tiny_model_dir),
                          "--out", str(tmp_path / "s.csv")], stderr=slave, stdout=subprocess.DEVNULL,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert p.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace"))  # no colours or cursor moves
    assert "6/6 files" in text and "ETA" in text and "scoring" in text, text
