"""Tests of scripts/build_corpus.py on a tiny build (needs the Debian tools of install_corpus_tools.sh)."""

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts" / "build_corpus.py")
build_corpus = importlib.util.module_from_spec(_spec)
sys.modules["build_corpus"] = build_corpus  # dataclasses look their module up
_spec.loader.exec_module(build_corpus)

_MISSING = [t for t in ("ffmpeg", "espeak-ng", "festival", "flite") if shutil.which(t) is None]
if build_corpus.asterisk_dir() is None:
    _MISSING.append("asterisk-core-sounds-en-wav")
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"Debian corpus tools absent ({', '.join(_MISSING)}): run scripts/install_corpus_tools.sh")

N_CLIPS = 40


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    build_corpus.main(["--out", str(out), "--max-clips", str(N_CLIPS), "--seed", "0", "--rate-ladder"])
    return out


def _energy_above(x: np.ndarray, sr: int, f0: float) -> float:
    """Fraction of the clip's energy above f0 Hz."""
    p = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.size, 1 / sr)
    return float(p[f > f0].sum() / (p.sum() + 1e-30))


def test_manifest_columns_and_files(tiny):
    rows = _read(tiny / "manifest.csv")
    assert len(rows) == N_CLIPS
    assert tuple(rows[0]) == build_corpus.MANIFEST_COLUMNS
    for r in rows:
        info = sf.info(str(tiny / r["path"]))
        assert info.samplerate == int(r["sample_rate"]) and int(r["sample_rate"]) in build_corpus.RATES
        assert info.channels == 1
        assert abs(info.duration - float(r["duration_s"])) < 1e-3
        assert 0 < int(r["bandwidth_hz"]) <= int(r["sample_rate"]) // 2
        assert int(r["bandwidth_hz"]) <= int(r["source_rate"]) // 2
        assert (r["degradation"] == "clean") == (r["severity"] == "0")
        assert r["recipe"] and r["split"] in ("train", "valid", "test")


def test_upsampled_clips_stay_below_their_bandwidth(tiny):
    rows = [r for r in _read(tiny / "manifest.csv")
            if int(r["sample_rate"]) >= 2.5 * int(r["bandwidth_hz"])]
    assert rows, "the tiny build should contain upsampled clips"
    for r in rows:
        x, sr = sf.read(str(tiny / r["path"]))
        assert _energy_above(x, sr, 1.1 * int(r["bandwidth_hz"])) < 1e-4, r["path"]


def test_rate_ladder_is_the_same_band_limited_clip(tiny):
    rows = _read(tiny / "rate_ladder.csv")
    ladders: dict = {}
    for r in rows:
        ladders.setdefault(r["ladder_id"], []).append(r)
    assert ladders
    for lid, rs in ladders.items():
        assert sorted(int(r["sample_rate"]) for r in rs) == sorted(build_corpus.LADDER_RATES)
        assert all(r["split"] == "test" for r in rs)
        durs = {round(float(r["duration_s"]), 2) for r in rs}
        assert max(durs) - min(durs) <= 0.01, lid
        for r in rs:
            x, sr = sf.read(str(tiny / r["path"]))
            assert _energy_above(x, sr, build_corpus.LADDER_BANDWIDTH) < 1e-4, r["path"]


def test_splits_do_not_share_utterances_or_texts(tiny):
    rows = _read(tiny / "manifest.csv")
    for key in ("utt_id", "group_id"):
        seen: dict = {}
        for r in rows:
            assert seen.setdefault(r[key], r["split"]) == r["split"], r[key]


def test_held_out_recipes_only_in_test():
    report = build_corpus.tool_report()
    clips = build_corpus.plan(build_corpus.source_utterances(report), 0, report)
    held = {(c.degradation, c.severity) for c in clips if c.split == "test"} & build_corpus.HELD_OUT
    assert held, "the test split should contain a held-out recipe"
    assert not any((c.degradation, c.severity) in build_corpus.HELD_OUT for c in clips if c.split != "test")


def test_more_train_variants_add_training_clips_and_change_none():
    report = build_corpus.tool_report()
    utts = build_corpus.source_utterances(report)
    base = build_corpus.plan(utts, 0, report)
    more = build_corpus.plan(utts, 0, report, train_variants=4)
    by_id = {c.clip_id: c for c in more}
    assert all(by_id[c.clip_id] == c for c in base)  # every clip of the default build, unchanged
    added = [c for c in more if c.clip_id not in {b.clip_id for b in base}]
    n_train = len({c.utt.utt_id for c in base if c.split == "train"})
    assert len(added) == 2 * n_train and {c.split for c in added} == {"train"}
    assert {c.clip_id.rsplit("_", 1)[1] for c in added} == {"v2", "v3"}
    assert not any((c.degradation, c.severity) in build_corpus.HELD_OUT for c in added)
    assert len({(c.degradation, c.severity) for c in added}) > 10  # new draws, not copies of v0/v1


def test_deterministic(tiny, tmp_path):
    build_corpus.main(["--out", str(tmp_path), "--max-clips", str(N_CLIPS), "--seed", "0", "--rate-ladder"])
    assert (tmp_path / "manifest.csv").read_bytes() == (tiny / "manifest.csv").read_bytes()
    assert (tmp_path / "rate_ladder.csv").read_bytes() == (tiny / "rate_ladder.csv").read_bytes()
    for r in _read(tiny / "manifest.csv")[:10]:
        assert (tmp_path / r["path"]).read_bytes() == (tiny / r["path"]).read_bytes(), r["path"]
    info = json.loads((tmp_path / "build_info.json").read_text())
    assert info["fingerprint"] == json.loads((tiny / "build_info.json").read_text())["fingerprint"]
    assert info["fingerprint"] == build_corpus.fingerprint(tmp_path)


def test_fingerprint_names_the_split_that_changed(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    before = build_corpus.fingerprint(copy)
    assert set(before) == {"all", "train", "valid", "test", "rate_ladder"}
    victim = next(r for r in _read(copy / "manifest.csv") if r["split"] == "test")
    data = bytearray((copy / victim["path"]).read_bytes())
    data[-1] ^= 1  # one bit of the last sample
    (copy / victim["path"]).write_bytes(bytes(data))
    after = build_corpus.fingerprint(copy)
    assert {k for k in before if before[k] != after[k]} == {"all", "test"}


def test_fingerprint_cli_rejects_a_folder_that_is_no_build(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_corpus.main(["--fingerprint", str(tmp_path)])
    assert "no manifest.csv" in capsys.readouterr().err


def _report_without(monkeypatch, tool):
    real = build_corpus.tool_report()
    fake = {**real, "tools": {**real["tools"], tool: False}}
    monkeypatch.setattr(build_corpus, "tool_report", lambda: fake)
    return fake


def test_missing_tools_run_the_installer(monkeypatch, capsys):
    _report_without(monkeypatch, "flite")
    calls = []
    monkeypatch.setattr(build_corpus.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    build_corpus.install_missing_tools()
    assert calls == [["bash", str(ROOT / "scripts" / "install_corpus_tools.sh")]]
    err = capsys.readouterr().err
    assert "missing flite" in err and "still missing flite" in err  # the fake report never heals


def test_nothing_missing_or_no_install_runs_no_installer(monkeypatch, tmp_path):
    calls = []
    real_run = build_corpus.subprocess.run
    def spy(cmd, **kw):
        if cmd[0] == "bash":
            calls.append(cmd)
            return None
        return real_run(cmd, **kw)
    monkeypatch.setattr(build_corpus.subprocess, "run", spy)
    build_corpus.install_missing_tools()  # this machine has every tool (module skip otherwise)
    _report_without(monkeypatch, "ffmpeg")
    monkeypatch.setattr(build_corpus, "build", lambda *a, **kw: {k: None for k in (
        "clips", "hours", "build_seconds", "by_split", "fingerprint", "missing_codecs", "missing_voices")})
    build_corpus.main(["--out", str(tmp_path), "--no-install"])
    assert calls == []
    build_corpus.main(["--out", str(tmp_path)])
    assert len(calls) == 1


def test_no_alsa_does_not_ask_for_the_alsa_sounds():
    report = {**build_corpus.tool_report(), "alsa": False}
    assert "alsa sounds" in build_corpus.missing_tools(report)
    assert "alsa sounds" not in build_corpus.missing_tools(report, use_alsa=False)
