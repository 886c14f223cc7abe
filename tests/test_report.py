"""`utmos report` through the real CLI on small synthetic score files."""
import csv
import json
import re

import numpy as np
import pytest
import scipy.stats
from typer.testing import CliRunner

from msr_utmos_cli.cli import app
from msr_utmos_cli.report import build_report

HEADER = ["path", "sample_rate", "duration_s", "mos", "error"]


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def run(*args):
    result = CliRunner().invoke(app, ["report", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def report_json(*args):
    result = run(*args, "--json", "-")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def scores(tmp_path):
    rows = [["/d/sysA/a1.wav", 16000, 1.0, 3.0, ""], ["/d/sysA/a2.wav", 48000, 1.0, 4.0, ""],
            ["/d/sysA/a3.wav", 48000, 1.0, 5.0, ""], ["/d/sysB/b1.wav", 16000, 1.0, 2.0, ""],
            ["/d/sysB/b2.wav", 16000, 1.0, 2.5, ""], ["/d/sysB/b3.wav", "", "", "", "cannot decode"]]
    return write_csv(tmp_path / "scores.csv", rows)


def test_system_and_sample_rate_tables(scores):
    rep = report_json(scores)
    by = {s["system"]: s for s in rep["systems"]}
    assert [s["system"] for s in rep["systems"]] == ["sysA", "sysB"]  # sorted by rank
    assert (by["sysA"]["files"], by["sysA"]["mean"], by["sysA"]["rank"]) == (3, pytest.approx(4.0), 1)
    assert (by["sysB"]["files"], by["sysB"]["mean"], by["sysB"]["rank"]) == (2, pytest.approx(2.25), 2)
    assert by["sysB"]["errors"] == 1
    assert by["sysA"]["ci_low"] < 4.0 < by["sysA"]["ci_high"]
    assert 3.0 <= by["sysA"]["ci_low"] and by["sysA"]["ci_high"] <= 5.0
    srs = {r["sample_rate"]: r for r in rep["sample_rates"]}
    assert srs[16000]["files"] == 3 and srs[16000]["mean"] == pytest.approx(2.5)
    assert srs[48000]["files"] == 2 and srs[48000]["mean"] == pytest.approx(4.5)
    assert rep["errors"] == {"count": 1, "first": [{"path": "/d/sysB/b3.wav", "error": "cannot decode"}]}
    assert rep["counts"] == {"rows": 6, "scored": 5, "errors": 1, "systems": 2, "unassigned_system": 0}


def test_terminal_tables_show_the_numbers(scores):
    result = run(scores)
    assert result.exit_code == 0, result.output
    assert re.search(r"1\s+sysA\s+3\s+0\s+4\.000", result.stdout)
    assert re.search(r"2\s+sysB\s+2\s+1\s+2\.250", result.stdout)
    assert re.search(r"16000\s+3\s+2\.500", result.stdout)
    assert "cannot decode" in result.stdout


def test_system_regex_per_file_and_column(tmp_path):
    a = write_csv(tmp_path / "run_x.csv", [["/d/x/tts1-001.wav", 16000, 1, 3.0, ""],
                                            ["/d/x/tts2-001.wav", 16000, 1, 4.0, ""]])
    b = write_csv(tmp_path / "run_y.csv", [["/d/y/0.wav", 16000, 1, 1.0, ""]])
    assert {s["system"] for s in report_json(a, "--system-regex", "^([^-]+)-")["systems"]} == {"tts1", "tts2"}
    assert {s["system"] for s in report_json(a, "--system-regex", "tts2")["systems"]} == {"tts2", "(no match)"}
    per_file = report_json(a, b, "--system-per-file")
    assert {s["system"]: s["files"] for s in per_file["systems"]} == {"run_x": 2, "run_y": 1}
    col = write_csv(tmp_path / "col.csv", [["/d/q/1.wav", 16000, 1, 2.0, "", "S9"]], HEADER + ["system"])
    assert [s["system"] for s in report_json(col)["systems"]] == ["S9"]
    assert run(a, "--system-regex", "(").exit_code == 2


def test_jsonl_input(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"path": "/d/s1/a.wav", "sample_rate": 24000, "duration_s": 1.0, "mos": 3.5, "error": null}\n'
                 '{"path": "/d/s1/b.wav", "sample_rate": 24000, "duration_s": null, "mos": null, "error": "boom"}\n')
    rep = report_json(p)
    assert rep["systems"][0]["mean"] == pytest.approx(3.5) and rep["errors"]["count"] == 1
    assert rep["sample_rates"][0]["sample_rate"] == 24000


def test_truth_join_by_path_and_utterance_id_with_unmatched_counts(tmp_path):
    rng = np.random.default_rng(0)
    rows, truth, pairs = [], [], []
    for s, mu in (("good", 4.0), ("mid", 3.0), ("bad", 2.0)):
        for i in range(8):
            t = mu + rng.normal(0, 0.5)
            p = t + rng.normal(0, 0.3)
            path = f"/data/{s}/{s}_{i}.wav"
            rows.append([path, 16000 if i % 2 else 48000, 1.0, round(p, 4), ""])
            if i == 7:
                continue  # scored but never rated
            ratings = [t - 0.5, t + 0.5] if i % 2 else [t]  # several listeners: must be averaged
            key = path if i < 4 else f"{s}_{i}"  # half by path, half by utterance id only
            truth += [[key, round(r, 4), "L"] for r in ratings]
            pairs.append((round(p, 4), t, s, 16000 if i % 2 else 48000))
    truth.append(["/elsewhere/orphan.wav", 3.0, "L"])
    s_path = write_csv(tmp_path / "scores.csv", rows)
    t_path = write_csv(tmp_path / "truth.csv", truth, ["path", "mos", "listener"])
    rep = report_json(s_path, "--truth", t_path)
    join = rep["truth"]["join"]
    assert (join["matched"], join["matched_by_path"], join["matched_by_utterance_id"]) == (21, 12, 9)
    assert (join["unmatched_scores"], join["unmatched_truth"]) == (3, 1)
    assert join["unmatched_truth_examples"] == ["/elsewhere/orphan.wav"]
    pred, true, syst, srs = map(np.array, zip(*pairs))
    m = rep["truth"]["metrics"]
    assert m["utt_MSE"] == pytest.approx(np.mean((pred - true) ** 2), abs=1e-3)
    assert m["utt_LCC"] == pytest.approx(scipy.stats.pearsonr(pred, true)[0], abs=1e-3)
    assert m["utt_SRCC"] == pytest.approx(scipy.stats.spearmanr(pred, true)[0], abs=1e-3)
    names = sorted(set(syst))
    sp = [pred[syst == n].mean() for n in names]
    st = [true[syst == n].mean() for n in names]
    assert m["sys_LCC"] == pytest.approx(scipy.stats.pearsonr(sp, st)[0], abs=1e-3)
    per_sr = {r["sample_rate"]: r for r in rep["truth"]["per_sample_rate"]}
    assert per_sr[16000]["files"] == (srs == 16000).sum()
    sel = srs == 48000
    assert per_sr[48000]["utt_KTAU"] == pytest.approx(scipy.stats.kendalltau(pred[sel], true[sel])[0], abs=1e-3)
    out = run(s_path, "--truth", t_path).stdout
    assert "unmatched: 3 scored files, 1 truth files" in out


def test_html_is_one_self_contained_file(scores, tmp_path):
    truth = write_csv(tmp_path / "t.csv", [["/d/sysA/a1.wav", 3.2], ["/d/sysA/a2.wav", 3.9],
                                           ["/d/sysB/b1.wav", 2.1], ["/d/sysB/b2.wav", 2.2]], ["path", "mos"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run(scores, "--truth", truth, "--baseline", scores, "--html", out_dir / "r.html")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out_dir.iterdir()] == ["r.html"]
    text = (out_dir / "r.html").read_text()
    assert text.count("data:image/png;base64,") == 6  # means, 2 distributions, 2 scatters, baseline
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower()
    assert "sysA" in text and "4.000" in text and "Agreement with listening test" in text


def test_json_keys(scores, tmp_path):
    out = tmp_path / "r.json"
    one = write_csv(tmp_path / "one.csv", [["/d/sysC/c1.wav", 16000, 1, 3.3, ""]])  # CI undefined
    assert run(scores, one, "--json", out).exit_code == 0
    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")

    rep = json.loads(out.read_text(), parse_constant=no_nan)  # NaN must be written as null
    assert set(rep) == {"inputs", "counts", "systems", "sample_rates", "errors", "truth", "baseline", "gate",
                        "provenance", "warnings", "bandwidth", "files"}
    assert set(rep["systems"][0]) >= {"system", "files", "mean", "ci_low", "ci_high", "rank", "errors"}
    assert [s["ci_low"] for s in rep["systems"] if s["system"] == "sysC"] == [None]
    assert rep["gate"] == {"fail_under": None, "fail_drop": None, "failures": [], "passed": True}


def test_fail_under_exit_codes(scores):
    ok = run(scores, "--fail-under", "2.0")
    assert ok.exit_code == 0, ok.output
    bad = run(scores, "--fail-under", "3.0")
    assert bad.exit_code == 1
    assert bad.stderr.strip().count("\n") == 0
    assert "sysB" in bad.stderr and "sysA" not in bad.stderr


def test_fail_drop_against_baseline(scores, tmp_path):
    rows = [["/d/sysA/a1.wav", 16000, 1, 3.0, ""], ["/d/sysA/a2.wav", 48000, 1, 4.0, ""],
            ["/d/sysA/a3.wav", 48000, 1, 5.0, ""], ["/d/sysB/b1.wav", 16000, 1, 2.5, ""],
            ["/d/sysB/b2.wav", 16000, 1, 3.0, ""]]  # sysB was 0.5 better before
    base = write_csv(tmp_path / "old.csv", rows)
    rep = report_json(scores, "--baseline", base)
    by = {b["system"]: b for b in rep["baseline"]["systems"]}
    assert by["sysB"]["diff"] == pytest.approx(-0.5) and by["sysB"]["shared_files"] == 2
    assert by["sysA"]["diff"] == pytest.approx(0.0)
    assert run(scores, "--baseline", base, "--fail-drop", "0.6").exit_code == 0
    bad = run(scores, "--baseline", base, "--fail-drop", "0.4")
    assert bad.exit_code == 1 and "sysB" in bad.stderr and bad.stderr.strip().count("\n") == 0
    assert run(scores, "--fail-drop", "0.4").exit_code == 2  # needs --baseline


@pytest.mark.parametrize("case", ["missing", "no_mos", "unparseable", "bad_mos", "bad_jsonl", "empty", "header_only"])
def test_bad_input_is_one_line_exit_2(tmp_path, case):
    p = tmp_path / ("s.jsonl" if case == "bad_jsonl" else "s.csv")
    content = {"no_mos": "path,score\n/a.wav,3\n",
               "unparseable": 'path,mos\n"/a.wav,3\n/b.wav,4,5,6\n',
               "bad_mos": "path,mos\n/a.wav,three\n",
               "bad_jsonl": '{"path": "/a.wav", "mos": 3}\n{not json\n',
               "empty": "", "header_only": "path,sample_rate,duration_s,mos,error\n"}.get(case)
    if content is not None:
        p.write_text(content)
    result = run(p)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and str(p) in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_library_call_matches_cli(scores):
    rep = build_report([scores], n_boot=200)
    assert rep["systems"][0]["system"] == "sysA" and rep["utterances"]["mos"][:2] == [3.0, 4.0]


# --- bandwidth, pairing, systems by depth, files to listen to ------------------------------------
BW_HEADER = HEADER + ["bandwidth_hz", "utt_id"]


def test_bandwidth_per_system(tmp_path):
    rows = [["/d/sysA/a1.wav", 48000, 1, 3.0, "", 24000, ""], ["/d/sysA/a2.wav", 48000, 1, 3.1, "", 8000, ""],
            ["/d/sysA/a3.wav", 48000, 1, 3.2, "", 20000, ""], ["/d/sysB/b1.wav", 16000, 1, 3.3, "", 8000, ""],
            ["/d/sysB/b2.wav", 16000, 1, 3.4, "", 7900, ""], ["/d/sysB/b3.wav", "", "", "", "boom", "", ""]]
    p = write_csv(tmp_path / "s.csv", rows, BW_HEADER)
    by = {s["system"]: s for s in report_json(p)["systems"]}
    assert by["sysA"]["bandwidth_median_hz"] == 20000 and by["sysA"]["band_limited_share"] == pytest.approx(2 / 3)
    assert by["sysB"]["bandwidth_median_hz"] == 7950 and by["sysB"]["band_limited_share"] == 0.0
    out = run(p, "--html", tmp_path / "r.html").stdout
    assert re.search(r"sysA\s+20000\s+67%", out) and re.search(r"sysB\s+7950\s+0%", out)
    assert "Bandwidth per system" in (tmp_path / "r.html").read_text()
    plain = write_csv(tmp_path / "plain.csv", [r[:5] for r in rows])  # an older score file: no column, no table
    assert "bandwidth_median_hz" not in report_json(plain)["systems"][0] and "Bandwidth" not in run(plain).stdout


def test_baseline_pairs_by_utterance_id_when_folders_differ(tmp_path):
    new = write_csv(tmp_path / "new.csv", [[f"/runs/v2/sys{s}/{i:04d}.wav", 16000, 1, m + i / 10, ""]
                                           for s, m in (("A", 3.0), ("B", 2.0)) for i in range(4)])
    old = write_csv(tmp_path / "old.csv", [[f"/runs/v1/sys{s}/{i:04d}.wav", 16000, 1, m + i / 10, ""]
                                           for s, m in (("A", 3.0), ("B", 2.5)) for i in range(4)])
    rep = report_json(new, "--baseline", old)
    by = {b["system"]: b for b in rep["baseline"]["systems"]}
    assert by["sysB"]["shared_files"] == 4 and by["sysB"]["paired"] and by["sysB"]["diff"] == pytest.approx(-0.5)
    assert by["sysA"]["diff"] == pytest.approx(0.0) and by["sysA"]["ci_low"] == pytest.approx(0.0)
    assert rep["baseline"]["pairing"] == {"by_path": 0, "by_system_and_utterance_id": 8, "by_utterance_id": 0,
                                          "unpaired_new": 0, "unpaired_old": 0}
    bad = run(new, "--baseline", old, "--fail-drop", "0.4")
    assert bad.exit_code == 1 and "'sysB' dropped 0.500" in bad.stderr and "sysA" not in bad.stderr
    # The run folder is the parent: systems differ by name, utterance ids alone pair them.
    n2 = write_csv(tmp_path / "n2.csv", [[f"/out/run2/u{i}.wav", 16000, 1, 3.0, ""] for i in range(3)])
    o2 = write_csv(tmp_path / "o2.csv", [[f"/out/run1/u{i}.wav", 16000, 1, 3.2, ""] for i in range(3)])
    r = run(n2, "--baseline", o2, "--fail-drop", "0.1", "--json", "-")
    assert r.exit_code == 1 and "has no scores now" not in r.stderr and "'run2' dropped 0.200" in r.stderr
    assert json.loads(r.stdout)["baseline"]["pairing"]["by_utterance_id"] == 3


def test_baseline_pairs_by_the_regex_utterance_id(tmp_path):
    new = write_csv(tmp_path / "new.csv", [[f"/x/tts{s}_v2_{i:03d}.wav", 16000, 1, 3.0 + s, ""]
                                           for s in (1, 2) for i in range(3)])
    old = write_csv(tmp_path / "old.csv", [[f"/y/tts{s}_v1_{i:03d}.wav", 16000, 1, 3.5, ""]
                                           for s in (1, 2) for i in range(3)])
    rep = report_json(new, "--baseline", old, "--system-regex", r"^(?P<system>[^_]+)_v\d+_")
    by = {b["system"]: b for b in rep["baseline"]["systems"]}
    assert set(by) == {"tts1", "tts2"} and by["tts1"]["shared_files"] == 3 == by["tts2"]["shared_files"]
    assert by["tts1"]["diff"] == pytest.approx(0.5) and by["tts2"]["diff"] == pytest.approx(1.5)
    assert rep["baseline"]["pairing"]["by_system_and_utterance_id"] == 6
    # an explicit utt group: the utterance number alone
    rep = report_json(new, "--baseline", old, "--system-regex", r"^(?P<system>[^_]+)_v\d+_(?P<utt>\d+)")
    assert rep["baseline"]["pairing"]["by_system_and_utterance_id"] == 6


def test_true_mos_column_is_the_truth(tmp_path):
    """`utmos finetune` writes validation predictions with true_mos and system columns."""
    rng = np.random.default_rng(1)
    true = rng.uniform(1, 5, 12)
    pred = true + rng.normal(0, 0.4, 12)
    rows = [[f"/v/{i}.wav", 16000, 1, round(p, 4), "", round(t, 4), f"s{i % 3}"]
            for i, (p, t) in enumerate(zip(pred, true))]
    p = write_csv(tmp_path / "predictions.csv", rows, HEADER + ["true_mos", "system"])
    rep = report_json(p)
    assert rep["truth"]["files"] == 12 and rep["truth"]["join"]["source"] == "true_mos column"
    pr, tr = np.round(pred, 4), np.round(true, 4)
    assert rep["truth"]["metrics"]["utt_SRCC"] == pytest.approx(scipy.stats.spearmanr(pr, tr)[0], abs=1e-6)
    assert {s["system"] for s in rep["systems"]} == {"s0", "s1", "s2"}
    assert "Agreement with listening test (12 files" in run(p).stdout


def test_system_depth(tmp_path):
    p = write_csv(tmp_path / "s.csv", [["out/sysA/sub1/x.wav", 16000, 1, 3.0, ""], ["out/sysA/sub2/y.wav", 16000, 1, 4.0, ""],
                                       ["out/sysB/z.wav", 16000, 1, 2.0, ""]])
    assert {s["system"]: s["files"] for s in report_json(p)["systems"]} == {"sub1": 1, "sub2": 1, "sysB": 1}
    one = report_json(p, "--system-depth", "1")
    assert {s["system"]: s["files"] for s in one["systems"]} == {"sysA": 2, "sysB": 1}
    assert one["inputs"]["system_source"] == "--system-depth 1"
    two = report_json(p, "--system-depth", "2")
    assert {s["system"] for s in two["systems"]} == {"sysA/sub1", "sysA/sub2", "sysB"}
    for bad in (["--system-depth", "0"], ["--system-depth", "1", "--system-regex", "x"]):
        r = run(p, *bad)
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_repeated_paths_warn(tmp_path):
    p = write_csv(tmp_path / "s.csv", [["/d/a/1.wav", 16000, 1, 3.0, ""], ["/d/a/2.wav", 16000, 1, 3.0, ""],
                                       ["/d/a/1.wav", 16000, 1, 3.0, ""]])
    r = run(p)
    assert r.exit_code == 0 and "warning: 1 row(s) repeat a path already in the score files (first: /d/a/1.wav)" \
        in r.stderr
    assert report_json(write_csv(tmp_path / "u.csv", [["/d/a/1.wav", 16000, 1, 3.0, ""]]))["warnings"] == []


def test_files_to_listen_to_in_terminal_and_html(tmp_path, monkeypatch):
    audio = tmp_path / "audio" / "sysA"
    audio.mkdir(parents=True)
    rows, truth = [], []
    for i, (m, t) in enumerate([(3.9, 4.0), (1.5, 1.6), (2.0, 4.5), (4.2, 2.2), (3.0, 3.1)]):
        (audio / f"u{i}.wav").write_bytes(b"")
        rows.append([f"audio/sysA/u{i}.wav", 16000, 1, m, ""])  # relative, as `utmos score audio/` writes them
        truth.append([f"audio/sysA/u{i}.wav", t])
    s = write_csv(tmp_path / "s.csv", rows)
    t = write_csv(tmp_path / "t.csv", truth, ["path", "mos"])
    html = tmp_path / "reports" / "r.html"
    html.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    r = run(s, "--truth", t, "--worst", "2", "--html", html)
    assert r.exit_code == 0, r.output
    out = r.stdout
    low = out[out.index("Lowest-scored files (2)"):]
    assert low.index("u1.wav") < low.index("u2.wav") and "u4.wav" not in low.split("Files where")[0]
    far = out[out.index("Files where prediction and truth disagree most (2)"):]
    assert far.index("u2.wav") < far.index("u3.wav") and re.search(r"-2\.500", far) and re.search(r"\+2\.000", far)
    text = html.read_text()
    srcs = re.findall(r"<audio controls preload='none' src='([^']+)'>", text)
    assert len(srcs) == 4
    for src in srcs:  # relative to the HTML's folder, pointing at the real file
        assert not src.startswith("/") and (html.parent / src).resolve().is_file(), src
    assert srcs[0] == "../audio/sysA/u1.wav"

