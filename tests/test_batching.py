"""Batched scoring: a file's score never depends on the rest of the run, and batch sizes agree.

The bundled model is used where rounding matters: its widths make the kernels block by shape,
which is how batching once moved scores by an ulp. Files are mixed in rate and length, and
`window_s=1` cuts the longer ones into several windows, so windows of one file fall in
different batches.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from msr_utmos_cli import load_model
from msr_utmos_cli.batching import bucket, parse_batch_size, plan
from msr_utmos_cli.cli import app
from msr_utmos_cli.scoring import clip_mos, score_files, score_waveforms, span_for
from msr_utmos_cli.testing import speechlike

# (rate, seconds): lengths either side of bucket edges, several windows at window_s=1, 7 rates.
CLIPS = [(8000, 0.45), (16000, 1.3), (16000, 1.31), (22050, 0.7), (24000, 2.6), (32000, 0.9),
         (44100, 1.7), (48000, 0.5), (16000, 0.62), (8000, 3.4), (48000, 1.05), (24000, 0.8)]


@pytest.fixture(scope="module")
def bundled():
    return load_model(None, "cpu")


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    for i, (sr, s) in enumerate(CLIPS):
        sf.write(d / f"c{i:02d}_{sr}.wav", speechlike(sr, s, seed=i), sr)
    sf.write(d / "silent.wav", np.zeros(8000, np.float32), 16000)
    (d / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    return d


def paths_in(d):
    return sorted(str(p) for p in d.iterdir())


def moss(model, paths, **kw):
    return {r.path: (r.mos, r.error) for r in score_files(model, paths, window_s=1.0, **kw)}


@pytest.mark.parametrize("batch_size", [4, 16])
def test_a_files_score_is_bitwise_the_same_alone_in_a_crowd_and_in_any_order(bundled, mixed_dir, batch_size):
    paths = paths_in(mixed_dir)
    crowd = moss(bundled, paths, batch_size=batch_size)
    assert moss(bundled, paths[::-1], batch_size=batch_size) == crowd
    assert moss(bundled, paths[1::3], batch_size=batch_size) == {p: crowd[p] for p in paths[1::3]}
    for p in paths if batch_size == 4 else paths[::3]:  # a batch of 16 costs 16 windows even alone
        assert moss(bundled, [p], batch_size=batch_size)[p] == crowd[p], p
    scores = [m for m, e in crowd.values() if not e]
    assert len(scores) == len(CLIPS) and np.std(scores) > 1e-3  # real, differing scores were compared


def test_every_batch_has_the_run_s_row_count_and_each_window_s_own_bucket(bundled, mixed_dir, monkeypatch):
    """What makes the bitwise promise hold on any machine, even where (unlike this CPU) kernels round by
    shape: the model only ever sees (batch size, bucket of the window's own length) at the window's rate,
    through the head that does not pack by the neighbours' lengths."""
    seen = []
    forward = bundled.frame_scores

    def spy(wave, lengths, sr, *args, **kw):
        real = [int(n) for row, n in zip(wave, lengths) if row.any()]  # dummy rows are silent
        seen.append((tuple(wave.shape), sr, kw.get("fixed_shapes", False), real))
        return forward(wave, lengths, sr, *args, **kw)

    monkeypatch.setattr(bundled, "frame_scores", spy)
    paths = paths_in(mixed_dir)
    moss(bundled, paths, batch_size=4)
    crops = getattr(bundled, "crops_fixed_shapes", False)  # fixed-size crops inside: any lengths may share a batch
    windows = 0
    for shape, sr, fixed, real in seen:
        assert fixed and shape[0] == 4 and real and (crops or all(bucket(n, 4) == shape[1] for n in real)), \
            (shape, real)
        windows += len(real)
    assert windows >= len(CLIPS) and len({(s, r) for s, r, _, _ in seen}) > 5


def test_batch_sizes_agree_within_1e5_and_batch_size_1_is_the_unpadded_path(bundled, mixed_dir):
    paths = paths_in(mixed_dir)
    one = moss(bundled, paths, batch_size=1)
    for n in (4, 16):
        other = moss(bundled, paths, batch_size=n, workers=2)
        assert {p: e for p, (_, e) in other.items()} == {p: e for p, (_, e) in one.items()}
        worst = max(abs(other[p][0] - one[p][0]) for p in paths if not one[p][1])
        assert worst <= 1e-5, (n, worst)
    # batch size 1 is each window alone at its own length, as before batching existed
    x, sr = speechlike(22050, 0.7, seed=3), 22050
    sp = span_for(bundled, lambda a, b: x[a:b], x.shape[0], sr)
    y = torch.from_numpy(x[sp.start:sp.stop] * np.float32(sp.gain))[None]
    with torch.inference_mode():
        frames, n = bundled.frame_scores(y, torch.tensor([y.shape[1]]), sr)
    alone = float(clip_mos(torch.tensor(float(frames.double().sum()) / int(n[0]))))
    assert score_waveforms(bundled, [x], sr, batch_size=1) == [alone]


def test_arrays_in_one_call_match_each_alone_at_every_batch_size(bundled):
    waves = [speechlike(24000, s, seed=i) for i, s in enumerate([0.4, 1.7, 0.9, 1.2, 0.6, 3.3, 2.2])]
    for n in (1, 4):
        alone = [score_waveforms(bundled, [w], 24000, window_s=1.0, batch_size=n)[0] for w in waves]
        assert score_waveforms(bundled, waves, 24000, window_s=1.0, batch_size=n) == alone
        assert score_waveforms(bundled, waves[::-1], 24000, window_s=1.0, batch_size=n) == alone[::-1]
    assert bundled.score(np.stack([waves[1], waves[1]]), 24000, batch_size=4).tolist() == [
        score_waveforms(bundled, [waves[1]], 24000, batch_size=4)[0]] * 2


def test_the_fixed_shape_head_ignores_padding_and_matches_the_packed_one():
    """Loud noise in the padding must not reach an item's frame scores, in either LSTM direction."""
    from msr_utmos_cli.model import MOSHead, tiny

    torch.manual_seed(0)
    head = MOSHead(tiny()).eval()
    x = torch.randn(3, 40, 32)
    lengths = torch.tensor([40, 23, 7])
    noisy = x.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = 100 * torch.randn(40 - n, 32)
    with torch.no_grad():
        fixed = head(noisy, lengths, fixed_shapes=True)
        for b, n in enumerate(lengths.tolist()):
            alone = head(x[b:b + 1, :n], torch.tensor([n]))
            torch.testing.assert_close(fixed[b:b + 1, :n], alone, rtol=0, atol=1e-6)
            assert torch.all(fixed[b, n:] == 0)


def test_buckets_depend_on_a_windows_own_length_only():
    assert [bucket(n, 1) for n in (5, 16000, 123457)] == [5, 16000, 123457]  # batch size 1: no padding
    for n in [100, 16000, 16001, 22050, 320000, 960000]:
        b = bucket(n, 8)
        assert n <= b <= n * 1.125 and bucket(b, 8) == b and b == bucket(n, 64)
    batches = plan([(16000, 16000), (8000, 16000), (16000, 16001), (16000, 15000), (16000, 16000)], 2)
    assert batches == [(16000, 16384, [0, 2]), (16000, 16384, [4]), (8000, 16384, [1]), (16000, 15360, [3])]
    by_rate = plan([(16000, 16000), (8000, 16000), (16000, 16001), (16000, 15000), (16000, 16000)], 2, by_length=False)
    assert by_rate == [(16000, 16001, [0, 2]), (16000, 16000, [3, 4]), (8000, 16000, [1])]  # fixed-crop models


@pytest.mark.parametrize("bad", ["0", "-3", "x", "1.5", ""])
def test_bad_batch_size_is_a_one_line_error(bad, tiny_model_dir, mixed_dir):
    r = CliRunner().invoke(app, ["score", str(mixed_dir), "--model", str(tiny_model_dir), "--batch-size", bad])
    assert r.exit_code == 2 and "--batch-size must be a positive whole number or auto" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert parse_batch_size("auto") == "auto" and parse_batch_size("12") == 12


def test_bad_precision_is_a_one_line_error(tiny_model_dir, mixed_dir):
    r = CliRunner().invoke(app, ["score", str(mixed_dir), "--model", str(tiny_model_dir), "--precision", "fp8"])
    assert r.exit_code == 2 and "unknown --precision 'fp8' (fp32, bf16 or fp16)" in r.output


def read_csv(path):
    return {r["path"]: r for r in csv.DictReader(open(path, newline=""))}


def same_to_5_decimals(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # same rows, same order
    for p in a:
        assert a[p]["error"] == b[p]["error"] and a[p]["sample_rate"] == b[p]["sample_rate"], p
        if a[p]["mos"]:
            assert abs(float(a[p]["mos"]) - float(b[p]["mos"])) <= 1.0001e-5, (p, a[p]["mos"], b[p]["mos"])


@pytest.mark.parametrize("where", ["examples", "mixed"])
def test_cli_batch_size_1_and_16_give_the_same_csv(where, mixed_dir, tmp_path):
    from pathlib import Path

    d, window = (Path(__file__).resolve().parents[1] / "examples", "20") if where == "examples" else (mixed_dir, "1")
    outs = []
    for args in (["--batch-size", "1"], ["--batch-size", "16", "--workers", "3"]):
        out = tmp_path / f"{args[1]}.csv"
        r = CliRunner().invoke(app, ["score", str(d), "-o", str(out), "-q", "--window", window, *args])
        assert r.exit_code == 0, r.output
        outs.append(read_csv(out))
    same_to_5_decimals(*outs)
    assert sum(1 for r in outs[0].values() if r["mos"]) >= 7


def test_resume_with_batches_and_readers_gives_the_uninterrupted_file(tiny_model_dir, mixed_dir, tmp_path):
    args = ["score", str(mixed_dir), "--model", str(tiny_model_dir), "-q", "--batch-size", "4", "--workers", "2"]
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    assert CliRunner().invoke(app, [*args, "-o", str(full)]).exit_code == 0
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:5]) + lines[5][:7])  # killed mid-row
    r = CliRunner().invoke(app, [*args, "-o", str(part), "--resume"])
    assert r.exit_code == 0, r.output
    assert part.read_text() == full.read_text()  # rows in input order, none lost or repeated


def test_bf16_runs_end_to_end_and_stays_near_fp32(bundled, mixed_dir):
    paths = paths_in(mixed_dir)[2:5]
    fp32 = moss(bundled, paths, batch_size=4)
    bf16 = moss(bundled, paths, batch_size=4, precision="bf16")
    diffs = [abs(bf16[p][0] - fp32[p][0]) for p in paths if not fp32[p][1]]
    assert 0 < max(diffs) < 0.2, diffs  # it really ran in bf16, and stayed on the scale


def test_out_of_memory_is_a_one_line_error_that_keeps_finished_rows(tiny_model_dir, mixed_dir, tmp_path, monkeypatch):
    from msr_utmos_cli import batching

    calls, launch = [], batching.launch

    def scarce(*args, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return launch(*args, **kw)

    monkeypatch.setattr(batching, "launch", scarce)
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(app, ["score", str(mixed_dir), "--model", str(tiny_model_dir), "-o", str(out),
                                 "--batch-size", "2", "--chunk-files", "2"])
    assert r.exit_code == 2 and "out of memory on cpu at --batch-size 2" in r.output and "--resume" in r.output
    assert "Traceback" not in r.output
    assert len(read_csv(out)) >= 2  # the chunks scored before it are on disk
