"""Tests of scripts/build_multilingual.py: what is held out stays held out (needs the Debian tools of
install_corpus_tools.sh, as tests/test_corpus.py)."""

import csv
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
_spec = importlib.util.spec_from_file_location("build_multilingual", ROOT / "scripts" / "build_multilingual.py")
ml = importlib.util.module_from_spec(_spec)
sys.modules["build_multilingual"] = ml
_spec.loader.exec_module(ml)

_MISSING = [t for t in ("ffmpeg", "espeak-ng", "festival", "flite") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"Debian corpus tools absent ({', '.join(_MISSING)}): run scripts/install_corpus_tools.sh")


def lang_of(lang: str) -> str:
    return lang.split("-")[0].split("_")[0]


@pytest.fixture(scope="module")
def plan():
    return ml.plan_utterances(0, None)


def test_no_reserved_language_and_every_held_language_or_speaker_is_held(plan):
    assert plan and not any(lang_of(u["language"]) in ml.RESERVED for u in plan)
    for u in plan:
        held = lang_of(u["language"]) in ml.HELD_LANGS or u["voice"] in ml.HELD_SPEAKERS
        assert bool(u["held"]) == held, u["utt_id"]
    train_voices = {u["voice"] for u in plan if not u["held"]}
    assert not train_voices & {u["voice"] for u in plan if u["held"]}  # a held-out voice is never heard in training
    assert {lang_of(u["language"]) for u in plan if u["held"]} >= {"de", "nl", "hu"}  # real KLettres speakers too


def test_no_utterance_draws_one_training_recipe_twice(plan):
    """Two draws of one recipe named one file: the second overwrote the first and the manifest listed
    the path twice (63 paths in the seed-0 corpus before this was fixed)."""
    codecs = list(ml.bc.CODECS)
    train = [u for u in plan if not u["held"]]
    for u in train[::7]:
        clips = ml.plan_clips(u, 16000, 0, codecs)
        recipes = [(c["kind"], c["sev"]) for c in clips]
        assert len(recipes) == len(set(recipes)) == ml.TRAIN_VARIANTS, u["utt_id"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml")
    ml.build(out, seed=0, max_utts=12, workers=1, verbose=False)
    with open(out / "manifest.csv", newline="") as f:
        return out, list(csv.DictReader(f))


def test_tiny_build_keeps_splits_and_recipes_apart(tiny):
    out, rows = tiny
    assert {r["split"] for r in rows} == {"train", "heldout"}
    train = [r for r in rows if r["split"] != "heldout"]
    held = [r for r in rows if r["split"] == "heldout"]
    assert not {r["degradation"] for r in train} & set(ml.HELD_RECIPES)  # held-out recipes never trained on
    assert not {r["voice"] for r in train} & {r["voice"] for r in held}
    assert all(r["why_held_out"] for r in held) and not any(r["why_held_out"] for r in train)
    for r in held:  # every held-out utterance: clean plus severities
        assert any(o["utt_id"] == r["utt_id"] and o["degradation"] == "clean" for o in held)
    assert all((out / r["path"]).is_file() and 0 < int(r["bandwidth_hz"]) <= int(r["sample_rate"]) // 2 for r in rows)


def test_tiny_build_is_deterministic(tiny, tmp_path):
    out, rows = tiny
    ml.build(tmp_path, seed=0, max_utts=12, workers=1, verbose=False)
    assert (tmp_path / "manifest.csv").read_text() == (out / "manifest.csv").read_text()
    assert ml.bc.fingerprint(tmp_path) == ml.bc.fingerprint(out)


def test_a_build_without_the_real_voices_says_so(tiny, monkeypatch, tmp_path):
    """KLettres and the non-English festival voices are Debian packages of their own: a build without
    them is another corpus, and build_info.json must say which were missing."""
    import json

    out, _ = tiny
    info = json.loads((out / "build_info.json").read_text())
    assert info["missing"] == ml.missing_packages()
    monkeypatch.setattr(ml, "KLETTRES", tmp_path / "no-klettres")
    assert "klettres-data" in ml.missing_packages()
    assert not [u for u in ml.plan_utterances(0, None) if u["kind"] == "klettres"]
