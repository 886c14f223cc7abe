"""Labelled-list readers: generic CSV, BVCC/VoiceMOS and AMC 2025 Track 3 layouts, and bad-row reports."""
from __future__ import annotations

import pytest
import soundfile as sf

from msr_utmos_cli.training.labels import LabelError, read_labels
from msr_utmos_cli.testing import speechlike


@pytest.fixture
def wavs(tmp_path):
    d = tmp_path / "wav"
    d.mkdir()
    for name, sr in (("sysA-u1.wav", 16000), ("sysA-u2.wav", 24000), ("sysB-u1.wav", 48000)):
        sf.write(d / name, speechlike(sr, 0.3), sr)
    (d / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    return d


def test_csv_rating_rows_are_averaged_and_kept_per_listener(wavs, tmp_path):
    lst = tmp_path / "ratings.csv"
    lst.write_text("path,mos,listener,system,domain\n"
                   "sysA-u1.wav,4,l1,A,1\nsysA-u1.wav,2,l2,A,1\nsysB-u1.wav,3,l1,B,1\n")
    utts, problems = read_labels(lst, wav_root=wavs)
    assert problems == []
    assert [(u.system, u.mos, u.domain, u.info.sample_rate) for u in utts] == [("A", 3.0, 1, 16000), ("B", 3.0, 1, 48000)]
    assert utts[0].ratings == [("l1", 4.0), ("l2", 2.0)]


def test_relative_paths_resolve_against_the_lists_folder_and_system_defaults_to_parent(wavs):
    lst = wavs / "means.csv"
    lst.write_text("mos,path\n4.5,sysA-u2.wav\n")
    (u,), problems = read_labels(lst, domain=3)
    assert not problems and u.path == str(wavs / "sysA-u2.wav") and u.system == "wav" and u.domain == 3


def test_bvcc_mean_list_and_per_rating_trainset(wavs, tmp_path):
    means = tmp_path / "train_mos_list.txt"
    means.write_text("sysA-u1.wav,3.25\nsysB-u1.wav,4.0\n")
    utts, problems = read_labels(means, wav_root=wavs)
    assert not problems and [(u.system, u.mos) for u in utts] == [("sysA", 3.25), ("sysB", 4.0)]
    ratings = tmp_path / "TRAINSET"
    ratings.write_text("sysA,sysA-u1.wav,4,x,L1_info\nsysA,sysA-u1.wav,2,x,L2_info\n")
    (u,), problems = read_labels(ratings, wav_root=wavs, layout="bvcc")
    assert not problems and u.mos == 3.0 and u.ratings == [("L1_info", 4.0), ("L2_info", 2.0)]


def test_amc25t3_list_with_mixed_rates(wavs, tmp_path):
    lst = tmp_path / "track3_train.csv"
    lst.write_text("sysA-u1.wav,2.5\nsysA-u2.wav,3.5\nsysB-u1.wav,4.5,custom\n")
    utts, problems = read_labels(lst, wav_root=wavs, layout="amc25t3")
    assert not problems
    assert [(u.system, u.info.sample_rate) for u in utts] == [("sysA", 16000), ("sysA", 24000), ("custom", 48000)]


def test_each_bad_row_is_reported_once_with_its_row_and_cause(wavs, tmp_path):
    lst = tmp_path / "bad.csv"
    lst.write_text("path,mos\n"
                   "sysA-u1.wav,4\n"      # row 1: fine
                   "sysA-u2.wav,abc\n"    # row 2: not a number
                   "sysB-u1.wav,7\n"      # row 3: outside 1-5
                   "gone.wav,3\n"         # row 4: missing file
                   "gone.wav,4\n"         # row 5: same file: not reported again
                   "broken.wav,3\n"       # row 6: unreadable
                   "sysA-u2.wav\n")       # row 7: no mos value
    utts, problems = read_labels(lst, wav_root=wavs)
    assert [u.path.rsplit("/", 1)[1] for u in utts] == ["sysA-u1.wav"]
    lines = [str(p) for p in problems]
    assert len(lines) == 5
    assert lines[0] == f"{lst}: row 2 (line 3): mos 'abc' is not a number"
    assert lines[1] == f"{lst}: row 3 (line 4): mos 7 is outside the declared scale 1-5"
    assert lines[2].startswith(f"{lst}: row 4 (line 5): no such file: ") and lines[2].endswith("gone.wav")
    assert lines[3].startswith(f"{lst}: row 6 (line 7): ") and "cannot read audio" in lines[3]
    assert lines[4] == f"{lst}: row 7 (line 8): missing mos value"


def test_a_missing_column_is_a_file_error_naming_the_header_line(tmp_path):
    lst = tmp_path / "nomos.csv"
    lst.write_text("path,score\na.wav,3\n")
    with pytest.raises(LabelError, match=r"nomos.csv: line 1: no 'mos' column"):
        read_labels(lst)
