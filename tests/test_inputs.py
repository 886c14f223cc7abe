"""What `utmos score` reads and writes beyond plain audio files: the bandwidth column, Kaldi wav.scp
lists, and formats only ffmpeg decodes (m4a). All through the real CLI on synthesised files."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from scipy.signal import resample_poly
from typer.testing import CliRunner

from msr_utmos_cli import load_model, score_files
from msr_utmos_cli.audio import probe
from msr_utmos_cli.cli import app
from msr_utmos_cli.output import COLUMNS
from msr_utmos_cli.testing import speechlike

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="ffmpeg not installed (scripts/install_corpus_tools.sh installs it)")


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def rows_of(path):
    return list(csv.DictReader(open(path, newline="")))


def band_limited(sr: int, bw: int, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    x = speechlike(sr, seconds, seed=seed).astype(np.float64)
    return resample_poly(resample_poly(x, 2 * bw, sr), sr, 2 * bw).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    sf.write(d / "full_48k.wav", speechlike(48000, 2.0, seed=1), 48000, subtype="PCM_16")
    sf.write(d / "up16k_48k.wav", band_limited(48000, 8000, seed=2), 48000, subtype="PCM_16")
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    return d


# --- bandwidth ------------------------------------------------------------------------------
def test_every_output_has_the_bandwidth_column(clips, tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    assert run("score", clips, "--model", tiny_model_dir, "-o", out, "-q").exit_code == 0
    df = pd.read_csv(out)  # plain pandas, no options
    assert list(df.columns) == COLUMNS
    bw = dict(zip(df["path"].str.rsplit("/", n=1).str[-1], df["bandwidth_hz"]))
    assert bw["full_48k.wav"] == pytest.approx(24000, rel=0.15)
    assert bw["up16k_48k.wav"] == pytest.approx(8000, rel=0.15)  # a 48 kHz file holding 8 kHz
    assert np.isnan(bw["silent.wav"])  # error rows: empty
    r = run("score", clips, "--model", tiny_model_dir, "--format", "jsonl", "-q")
    js = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line) for line in r.stdout.splitlines()}
    assert js["up16k_48k.wav"]["bandwidth_hz"] == bw["up16k_48k.wav"] and js["silent.wav"]["bandwidth_hz"] is None
    api = {r.path.rsplit("/", 1)[-1]: r for r in score_files(load_model(tiny_model_dir, "cpu"), sorted(clips.iterdir()))}
    assert api["full_48k.wav"].bandwidth_hz == bw["full_48k.wav"] and api["silent.wav"].bandwidth_hz is None


def test_bandwidth_reads_only_the_first_minute(tmp_path, monkeypatch):
    from msr_utmos_cli import scoring

    sf.write(tmp_path / "long.wav", speechlike(8000, 75.0), 8000, subtype="PCM_16")
    reads = []
    real = scoring.read_segment
    monkeypatch.setattr(scoring, "read_segment", lambda info, a, b, ch=None: reads.append((a, b)) or real(info, a, b, ch))
    assert scoring.file_bandwidth(probe(str(tmp_path / "long.wav"))) == pytest.approx(4000, rel=0.15)
    assert reads == [(0, 60 * 8000)]


def test_resume_refuses_a_file_without_the_new_columns(clips, tiny_model_dir, tmp_path):
    old = tmp_path / "old.csv"
    old.write_text(f"path,sample_rate,duration_s,mos,error\n{clips / 'full_48k.wav'},48000,2.0,3.1,\n")
    r = run("score", clips, "--model", tiny_model_dir, "-o", old, "--resume")
    assert r.exit_code == 2 and "cannot resume: its columns" in r.output and len(r.output.splitlines()) == 1
    assert old.read_text().count("\n") == 2  # left as it was


# --- wav.scp ---------------------------------------------------------------------------------
@pytest.fixture
def scp(clips, tmp_path):
    spaced = tmp_path / "with space.wav"
    shutil.copy(clips / "full_48k.wav", spaced)
    f = tmp_path / "wav.scp"
    f.write_text(f"0001 {clips / 'up16k_48k.wav'}\n\n"
                 f"0002\t{spaced}\n"
                 f"0003 sox {clips / 'full_48k.wav'} -t wav - |\n"
                 f"0004 {tmp_path / 'gone.wav'}\n"
                 f"0005 {clips / 'up16k_48k.wav'}\n")  # a second id for the same file
    return f


def test_wav_scp_ids_go_to_the_output(scp, tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    r = run("score", scp, "--model", tiny_model_dir, "-o", out)
    assert r.exit_code == 0, r.output
    rows = rows_of(out)
    assert [x["utt_id"] for x in rows] == ["0001", "0002", "0003", "0004", "0005"]  # ids kept as text
    assert rows[0]["mos"] and rows[1]["mos"] and rows[0]["mos"] == rows[4]["mos"]
    assert rows[1]["path"].endswith("with space.wav")
    assert rows[2]["error"] == "piped commands in wav.scp are not supported (write the audio to a file and list that)"
    assert rows[3]["error"] == "no such file" and not rows[3]["mos"]
    assert pd.read_csv(out, dtype={"utt_id": str})["utt_id"].tolist()[:2] == ["0001", "0002"]
    # scp: prefix, JSON lines; a plain input beside it has an empty id
    r = run("score", f"scp:{scp}", scp.parent / "with space.wav", "--model", tiny_model_dir, "--format", "jsonl", "-q")
    ids = [json.loads(line)["utt_id"] for line in r.stdout.splitlines()]
    assert ids == ["0001", "0002", "0003", "0004", "0005", ""]
    assert run("score", f"scp:{tmp_path / 'none.scp'}", "--model", tiny_model_dir).exit_code == 2


def test_wav_scp_resume_skips_each_id_once(scp, tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    assert run("score", scp, "--model", tiny_model_dir, "-o", out, "-q").exit_code == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # only id 0001 was written before the kill
    r = run("score", scp, "--model", tiny_model_dir, "-o", out, "--resume")
    assert r.exit_code == 0 and "(1 earlier, 4 new)" in r.output, r.output
    assert out.read_text() == full  # 0005 (the same file as 0001) is scored again, under its own id


# --- ffmpeg ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def m4a(tmp_path_factory):
    """An AAC .m4a at 44.1 kHz, and the same decoded audio as a float wav (by ffmpeg, outside msr-utmos)."""
    d = tmp_path_factory.mktemp("m4a")
    src = d / "src.wav"
    sf.write(src, np.stack([speechlike(44100, 1.5, seed=4), speechlike(44100, 1.5, seed=5)], 1), 44100)
    if shutil.which("ffmpeg"):
        subprocess.run(["ffmpeg", "-v", "error", "-i", src, "-c:a", "aac", "-b:a", "96k", d / "clip.m4a"], check=True)
        subprocess.run(["ffmpeg", "-v", "error", "-i", d / "clip.m4a", "-c:a", "pcm_f32le", d / "decoded.wav"],
                       check=True)
    src.unlink()
    return d


@needs_ffmpeg
def test_m4a_scores_as_its_decoded_wav(m4a, tiny_model_dir, tmp_path):
    out = tmp_path / "s.csv"
    r = run("score", m4a, "--model", tiny_model_dir, "-o", out)  # the walk picks up .m4a
    assert r.exit_code == 0, r.output
    by = {x["path"].rsplit("/", 1)[-1]: x for x in rows_of(out)}
    assert set(by) == {"clip.m4a", "decoded.wav"} and not by["clip.m4a"]["error"]
    assert by["clip.m4a"]["sample_rate"] == "44100"  # its own rate: not resampled
    assert abs(float(by["clip.m4a"]["mos"]) - float(by["decoded.wav"]["mos"])) <= 1e-4
    assert by["clip.m4a"]["duration_s"] == by["decoded.wav"]["duration_s"]
    assert by["clip.m4a"]["bandwidth_hz"] == by["decoded.wav"]["bandwidth_hz"] != ""
    for ch in ("0", "1"):  # one channel picked, as for any file
        one = [json.loads(line)["mos"] for line in run("score", m4a / "clip.m4a", m4a / "decoded.wav", "--model",
                                                      tiny_model_dir, "--channel", ch, "--format", "jsonl").stdout.splitlines()]
        assert abs(one[0] - one[1]) <= 1e-4


@needs_ffmpeg
def test_ffmpeg_error_is_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "junk.m4a").write_bytes(b"\0" * 300)
    r = run("score", tmp_path / "junk.m4a", "--model", tiny_model_dir, "--format", "jsonl", "-q")
    err = json.loads(r.stdout)["error"]
    assert err.startswith("cannot read audio (ffmpeg: ") and "\n" not in err and str(tmp_path) not in err


def test_without_ffmpeg_the_error_says_to_install_it(m4a, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    f = tmp_path / "x.m4a"
    if (m4a / "clip.m4a").exists():
        shutil.copy(m4a / "clip.m4a", f)  # a real m4a: only the missing decoder stops it
    else:
        f.write_bytes(b"\0" * 300)
    sf.write(tmp_path / "y.wav", speechlike(16000, 0.5), 16000)
    r = run("score", f, "--model", tiny_model_dir, "--format", "jsonl", "-q")
    row = json.loads(r.stdout)
    assert row["mos"] is None and row["error"].startswith("cannot read audio (")
    assert row["error"].endswith("); install ffmpeg to read .m4a") and "\n" not in row["error"]
    r = run("score", tmp_path, "--model", tiny_model_dir, "--format", "jsonl", "-q")  # walks pass .m4a by
    assert [json.loads(line)["path"].rsplit("/", 1)[-1] for line in r.stdout.splitlines()] == ["y.wav"]
