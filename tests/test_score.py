"""`utmos score` end to end on real files: mixed rates and formats, broken files, output formats, gates."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from msr_utmos_cli.cli import app
from msr_utmos_cli.testing import speechlike

RATES = [8000, 16000, 22050, 24000, 44100, 48000]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wavs")
    (d / "sub").mkdir()
    for i, sr in enumerate(RATES):
        sf.write(d / f"a{i}_{sr}.wav", speechlike(sr, 0.8 + 0.1 * i, seed=i), sr)
        sf.write(d / "sub" / f"b{i}_{sr}.flac", speechlike(sr, 0.5, seed=10 + i), sr)
    sf.write(d / "c_24000.ogg", speechlike(24000, 1.0, seed=20), 24000)
    sf.write(d / "stereo_32000.wav", np.stack([speechlike(32000, 1.0, 1), speechlike(32000, 1.0, 2)], 1), 32000)
    (d / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    (d / "empty.flac").write_bytes(b"")
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(d / "tiny.wav", np.ones(50, np.float32) * 0.1, 16000)
    sf.write(d / "low_rate.wav", speechlike(4000, 1.0), 4000)
    (d / "notes.txt").write_text("not audio, not walked")
    return d


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def read_csv(path):
    return list(csv.DictReader(open(path, newline="")))


def test_mixed_directory_gives_one_row_per_file(audio_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "scores.csv"
    r = run("score", audio_dir, "--model", tiny_model_dir, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    assert len(rows) == 20 == len({r["path"] for r in rows})  # 14 good + 6 bad; notes.txt is not audio
    by = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    for name, cause in [("broken.wav", "cannot read"), ("empty.flac", "cannot read"), ("silent.wav", "silent"),
                        ("nan.wav", "NaN"), ("tiny.wav", "too short"), ("low_rate.wav", "outside the supported")]:
        assert cause in by[name]["error"] and by[name]["mos"] == "", (name, by[name])
    good = [r for r in rows if not r["error"]]
    assert len(good) == 14
    assert {int(r["sample_rate"]) for r in good} == set(RATES) | {32000}
    assert all(1.0 <= float(r["mos"]) <= 5.0 for r in good)
    assert "20 files: 14 scored, 6 errors" in r.output


def test_a_files_score_does_not_depend_on_the_other_files_in_the_run(audio_dir, tiny_model_dir, tmp_path):
    """Each file scored alone gives the same CSV value as in the whole directory, and in reverse order."""
    whole = tmp_path / "whole.csv"
    assert run("score", audio_dir, "--model", tiny_model_dir, "--out", whole).exit_code == 0
    scores = {r["path"]: r["mos"] for r in read_csv(whole) if r["mos"]}
    assert len(scores) == 14 and len(set(scores.values())) > 5
    lst = tmp_path / "reversed.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted(scores, reverse=True)))
    rev = tmp_path / "reversed.csv"
    assert run("score", f"@{lst}", "--model", tiny_model_dir, "--out", rev).exit_code == 0
    assert {r["path"]: r["mos"] for r in read_csv(rev)} == scores
    for path in list(scores)[::4]:
        one = tmp_path / "one.csv"
        assert run("score", path, "--model", tiny_model_dir, "--out", one, "--overwrite").exit_code == 0
        assert read_csv(one)[0]["mos"] == scores[path], path


def test_jsonl_to_stdout_and_list_input(audio_dir, tiny_model_dir, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{audio_dir / 'a1_16000.wav'}\n{audio_dir / 'missing.wav'}\n")
    r = run("score", f"@{lst}", "--model", tiny_model_dir, "--format", "jsonl", "--out", "-", "-q")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["path"].rsplit("/", 1)[-1] for row in rows] == ["a1_16000.wav", "missing.wav"]
    assert rows[0]["sample_rate"] == 16000 and rows[0]["error"] == "" and rows[1]["error"] == "no such file"


def test_resume_skips_done_files_and_repairs_torn_line(audio_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    assert run("score", audio_dir, "--model", tiny_model_dir, "--out", out).exit_code == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:6]) + lines[6][:10])  # as if killed mid-write
    r = run("score", audio_dir, "--model", tiny_model_dir, "--out", out, "--resume")
    assert r.exit_code == 0 and "20 files in" in r.output and "(5 earlier, 15 new)" in r.output, r.output
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())


def test_gates_strict_and_fail_under(audio_dir, tiny_model_dir, tmp_path):
    good = audio_dir / "a0_8000.wav"
    assert run("score", good, "--model", tiny_model_dir, "-q", "--strict").exit_code == 0
    assert run("score", audio_dir, "--model", tiny_model_dir, "-q", "--strict").exit_code == 1
    r = run("score", good, "--model", tiny_model_dir, "--fail-under", 5.5)
    assert r.exit_code == 1 and "below --fail-under" in r.output
    assert run("score", good, "--model", tiny_model_dir, "-q", "--fail-under", 0.5).exit_code == 0


def test_channel_option(audio_dir, tiny_model_dir):
    stereo = audio_dir / "stereo_32000.wav"
    moss = [json.loads(run("score", stereo, "--model", tiny_model_dir, "--format", "jsonl", "-q", *extra).stdout)["mos"]
            for extra in ([], ["--channel", "0"], ["--channel", "1"])]
    assert len(set(moss)) == 3
    r = run("score", stereo, "--model", tiny_model_dir, "--format", "jsonl", "-q", "--channel", "2")
    assert "has 2 channel(s)" in json.loads(r.stdout)["error"]


def test_bad_model_is_one_line_error(tmp_path, audio_dir):
    r = run("score", audio_dir, "--model", tmp_path / "nope")
    assert r.exit_code == 2 and "no such model folder" in r.output and "Traceback" not in r.output


def test_python_module_entry_point(tiny_model_dir, audio_dir):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "msr_utmos_cli", "score", str(audio_dir / "a2_22050.wav"),
                        "--model", str(tiny_model_dir), "-q"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    row = next(csv.DictReader(io.StringIO(p.stdout)))
    assert row["sample_rate"] == "22050" and 1 <= float(row["mos"]) <= 5


def test_pipe_closed_by_reader_stops_quietly(tiny_model_dir, audio_dir):
    """`utmos score DIR | head -1`: no traceback or error line, the SIGPIPE status (141)."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "msr_utmos_cli", "score", str(audio_dir), "--model", str(tiny_model_dir),
                          "-q", "--chunk-files", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    header = p.stdout.readline()
    p.stdout.close()  # the reader leaves after one line, like head -1
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert header.startswith(b"path,") and err == ""
