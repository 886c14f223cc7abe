"""Bad input never crashes or hangs `utmos score`: every file gets exactly one row, a score or a one-line error."""
from __future__ import annotations

import csv
import io
import json
import os
import resource
import stat
import tempfile
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from msr_utmos_cli import load_model
from msr_utmos_cli.audio import AudioError, probe, read_segment
from msr_utmos_cli.cli import app
from msr_utmos_cli.scoring import score_files

from hostile import make_suite, speech, wav_header


@pytest.fixture(autouse=True)
def one_thread():  # the test machine is small and shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, make_suite(root)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, "cpu")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def read_rows(path, fmt="csv"):
    text = open(path, encoding="utf-8", errors="surrogateescape", newline="").read()
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.DictReader(io.StringIO(text, newline="")))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_hostile_suite_one_row_per_file_with_the_right_outcome(suite, tiny_model_dir, tmp_path, fmt):
    root, cases = suite
    out = tmp_path / f"scores.{fmt}"
    r = run("score", root, "--model", tiny_model_dir, "--out", out, "--format", fmt)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    rows = read_rows(out, fmt)
    by = {row["path"]: row for row in rows}
    assert len(rows) == len(by) == len(cases)  # one row per file, none twice (the directory loop is walked once)
    assert set(by) == {c.path for c in cases}
    for c in cases:
        row = by[c.path]
        has_mos = row["mos"] not in ("", None)
        assert has_mos != bool(row["error"]), row  # a score or an error, never both or neither
        assert not has_mos or 1.0 <= float(row["mos"]) <= 5.0, row  # never NaN (samples of 1e30 overflow)
        assert "\n" not in row["error"]
        if c.expect == "mos":
            assert has_mos and 1.0 <= float(row["mos"]) <= 5.0, (c.name, row)
        elif c.expect == "error":
            assert c.cause in row["error"], (c.name, row)
    errors = sum(1 for row in rows if row["error"])
    assert f"{len(cases)} files: {len(cases) - errors} scored, {errors} errors" in r.output
    # everything is done: a resume scores nothing and changes nothing
    before = out.read_bytes()
    r = run("score", root, "--model", tiny_model_dir, "--out", out, "--format", fmt, "--resume")
    assert r.exit_code == 0, r.output
    assert f"{len(cases)} files in {out} ({len(cases)} earlier, 0 new): {len(cases) - errors} scored" in r.output
    assert out.read_bytes() == before


def test_odd_arguments_on_the_command_line(suite, tiny_model_dir, tmp_path):
    """Leading dashes after `--`, a FIFO, a symlink loop and a directory named x.wav each get a row;
    a missing path on the command line stops the run before it starts (exit 2, nothing written)."""
    root, _ = suite
    odd = root / "odd"
    args = [odd / "-leading-dash.wav", odd / "fifo.wav", odd / "loop_a.wav", odd / "dir_named.wav"]
    r = run("score", "--model", tiny_model_dir, "--format", "jsonl", "-q", "--", *args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [os.path.basename(row["path"]) for row in rows] == [
        "-leading-dash.wav", "fifo.wav", "loop_a.wav", "inner.wav"]
    assert rows[0]["mos"] is not None
    assert [row["error"] for row in rows[1:3]] == [
        "not a regular file (a pipe, socket or device)", "cannot read audio (Too many levels of symbolic links)"]
    r = run("score", "--model", tiny_model_dir, "--format", "jsonl", "-q", "--", *args, odd / "missing.wav")
    assert r.exit_code == 2 and r.stdout == "" and "missing.wav: no such file or directory" in r.output


def test_unreadable_file_is_an_error_row(model):
    """Permission denied is an error row. Root ignores file modes, so as root the check runs with the
    effective uid switched to `nobody` for the duration."""
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o755)
    ok, locked = os.path.join(d, "ok.wav"), os.path.join(d, "locked.wav")
    for p in (ok, locked):
        sf.write(p, speech(16000, 0.5), 16000)
    os.chmod(ok, 0o644)
    os.chmod(locked, 0)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(65534)
        with pytest.raises(AudioError, match="Permission denied"):
            probe(locked)
        rows = list(score_files(model, [ok, locked]))
    finally:
        if as_root:
            os.seteuid(0)
    assert rows[0].mos is not None and "Permission denied" in rows[1].error


def test_many_channels_read_in_bounded_memory(tmp_path):
    """A 64-channel file: reading a window holds about one mono window, not all channels at once."""
    sr, secs, ch = 48000, 10.0, 64
    path = tmp_path / "many.wav"
    block = (speech(sr, 1.0)[:, None] * np.ones(ch, np.float32) * 32767).astype("<i2").tobytes()
    with open(path, "wb") as f:  # 61 MB of 16-bit data, written a second at a time
        f.write(wav_header(sr, ch, 16, len(block) * int(secs)))
        for _ in range(int(secs)):
            f.write(block)
    info = probe(str(path))
    assert (info.channels, info.frames) == (ch, int(sr * secs))
    tracemalloc.start()
    x = read_segment(info, 0, info.frames)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mono_bytes = x.nbytes
    assert x.shape == (info.frames,) and np.abs(x).max() > 0.1
    assert peak < 3 * mono_bytes + 16 * 2**20, (peak, mono_bytes)  # all channels as float32 would be 64x


def test_header_claiming_hours_of_missing_data_is_quick(model, tmp_path):
    """A header that promises 2 h at 192 kHz over 1 s of data: libsndfile or the truncation check
    stops it; it is not scored as hours of audio and not allocated up front."""
    sr = 192000
    data = (speech(sr, 1.0) * 32767).astype("<i2").tobytes()
    path = tmp_path / "liar.wav"
    path.write_bytes(wav_header(sr, 1, 16, 2 * sr * 7200) + data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = list(score_files(model, [path]))
    assert len(rows) == 1 and (rows[0].mos is not None or "truncated" in rows[0].error)
    assert rows[0].duration_s is None or rows[0].duration_s < 2.0 or rows[0].error
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # KiB


# --- property-based: random WAV headers ------------------------------------------
U16, U32 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1)
header = st.fixed_dictionaries({
    "rate": st.one_of(st.sampled_from([0, 1, 7999, 8000, 16000, 44100, 192000, 192001, 2**31]), U32),
    "channels": st.one_of(st.sampled_from([0, 1, 2, 8, 1024, 65535]), U16),
    "bits": st.one_of(st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64]), U16),
    "data_bytes": st.one_of(st.sampled_from([0, 1, 100, 2**32 - 1]), U32),
    "fmt_tag": st.one_of(st.sampled_from([1, 3, 6, 7, 0xFFFE]), U16),
    "block_align": st.one_of(st.none(), U16),
    "byte_rate": st.one_of(st.none(), U32),
    "fmt_size": st.sampled_from([0, 14, 16, 18, 40]),
})


def _hostile_wav(h, payload, cut):
    data = wav_header(**h) + payload
    return data[: len(data) - cut] if cut < len(data) else data


def _probe_and_read(path) -> None:
    try:
        info = probe(path)
    except AudioError:
        return
    assert info.frames > 0 and info.channels > 0
    n = min(info.frames, 20000)
    for start in (0, info.frames - n, (info.frames - n) // 2):
        try:
            x = read_segment(info, start, start + n)
        except AudioError:
            continue
        assert x.shape == (n,) and x.dtype == np.float32


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=header, payload=st.binary(max_size=3000), cut=st.integers(0, 3100))
def test_random_headers_probe_and_read_raise_only_audio_error(tmp_path, h, payload, cut):
    path = tmp_path / "fuzz.wav"
    path.write_bytes(_hostile_wav(h, payload, cut))
    with np.errstate(all="ignore"):
        _probe_and_read(str(path))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=header, seconds=st.floats(0.0, 0.4), cut=st.integers(0, 200))
def test_random_headers_score_files_gives_one_row(model, tmp_path, h, seconds, cut):
    """Plausible payloads (real speech bytes) under random headers, scored with a valid file beside them."""
    rate = h["rate"] if 8000 <= h["rate"] <= 48000 else 16000
    payload = (speech(rate, seconds) * 32767).astype("<i2").tobytes()
    bad, good = tmp_path / "bad.wav", tmp_path / "good.wav"
    bad.write_bytes(_hostile_wav(h, payload, cut))
    sf.write(good, speech(16000, 0.5), 16000)
    with np.errstate(all="ignore"):
        rows = list(score_files(model, [bad, good]))
    assert [r.path for r in rows] == [str(bad), str(good)]
    assert (rows[0].mos is None) != (rows[0].error == "")
    assert rows[0].mos is None or 1.0 <= rows[0].mos <= 5.0
    assert rows[1].mos is not None and not rows[1].error  # a hostile neighbour does not spoil a good file
