"""Measure a model folder as the default model's card does: agreement with DistillMOS, rate spread, severity order.

    python benchmarks/eval_default_model.py --model models/<name> --corpus corpus/ [--split test]
        [--out eval_results.json] [--plots docs/] [--batch-size 16] [--device cpu]
        [--check-against docs/eval_default_model.json]   # a retrained model: within the card's tolerances?

1. Agreement: DistillMOS's MOS on each clip of the split resampled to 16 kHz, vs the student's score on
   the same clip presented at 8, 16, 22.05, 24, 44.1 and 48 kHz (band-limited resampling from its file
   rate, so upsampling never widens the content) and at its own file rate ("native"). SRCC, LCC, mean
   absolute difference. Target: SRCC >= 0.9 at every presentation rate.
   At 8 kHz also against the teacher hearing the clip at 8 kHz too (resampled 8 kHz -> 16 kHz): what the
   student can hear at that rate, and what the default model is distilled towards at 8 kHz. And the
   student at 16 kHz hearing the clip after 8 kHz: against the teacher, and against the student at
   8 kHz, which tells an 8 kHz gap of the SFI path from one of judging narrowband audio at any rate.
   And the teacher and the student each at 8 kHz against themselves at 16 kHz: what narrowband audio costs
   each one's own ranking (a student that loses what the teacher loses is as good at 8 kHz as at 16 kHz).
   Where the gap lies: the same agreement on the clips whose recipe (degradation and severity) the train
   split also has and on those whose recipe it never has, and, at 8 and 16 kHz, on clips whose real band
   fits below 4 kHz and on wider ones, which lose content at 8 kHz.
2. Rate independence: every rate_ladder.csv clip scored at each rate it is stored at (no resampling);
   spread = max - min over rates. Target: mean spread < 0.05 MOS. DistillMOS's own spread on the same
   ladder (each rung resampled to 16 kHz, as it is used) is reported beside it.
3. Severity order: pairs of clips of the same source utterance (utt_id) with different severity, within
   one degradation type (a clean clip is severity 0 of every type); the share the student (native rate)
   and the teacher rank the right way round (more severe -> lower; a tie counts half). The same over
   group_id (same text, any voice) is reported beside it.

The teacher's outputs are cached beside --out (teacher_distillmos_cache.json, keyed by path and mtime),
so reruns and other models only pay for the student.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from msr_utmos_cli import load_model
from msr_utmos_cli.audio import heard_at, probe, read_segment, resample
from msr_utmos_cli.checkpoint import parse_device
from msr_utmos_cli.scoring import score_waveforms

RATES = (8000, 16000, 22050, 24000, 44100, 48000)
TEACHER_RATE = 16000
TARGET_SRCC, TARGET_SPREAD = 0.9, 0.05
TOLERANCE = {"srcc": 0.05, "mad": 0.05, "mean_spread": 0.02}  # the model card's, for a retrained model


def read_rows(csv_path: Path, split: str | None) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if split is None or r["split"] == split]


def load(path: Path) -> tuple[torch.Tensor, int]:
    info = probe(str(path))
    return torch.from_numpy(read_segment(info, 0, info.frames)), info.sample_rate


# --- teacher -------------------------------------------------------------------------------
def teacher_scores(paths: list[Path], cache_path: Path, device: str, batch_size: int,
                   hear_at: int | None = None) -> list[float]:
    """DistillMOS MOS of each file resampled to 16 kHz (first to `hear_at` when given: the teacher then
    hears what a student presented at that rate hears); cached by (path, mtime_ns, hear_at)."""
    tag = f"distillmos {version('distillmos')}"
    cache = {}
    if cache_path.exists():
        data = json.loads(cache_path.read_text())
        cache = data.get("scores", {}) if data.get("teacher") == tag else {}
    keys = [f"{p.resolve()}|{p.stat().st_mtime_ns}" + (f"|{hear_at}" if hear_at else "") for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        from msr_utmos_cli.training.teachers import DistillMOSTeacher

        teacher = DistillMOSTeacher().to(device)
        waves = {i: heard_at(*load(paths[i]), hear_at, TEACHER_RATE) for i in todo}
        order = sorted(todo, key=lambda i: waves[i].shape[0])  # similar lengths share a batch
        groups = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
        t0 = time.perf_counter()
        for g in groups:
            pad = torch.nn.utils.rnn.pad_sequence([waves[i] for i in g], batch_first=True).to(device)
            lengths = torch.tensor([waves[i].shape[0] for i in g], device=device)
            for i, m in zip(g, teacher(pad, lengths)["mos"].cpu().tolist()):
                cache[keys[i]] = m
        print(f"teacher: {len(todo)} clips scored in {time.perf_counter() - t0:.1f} s "
              f"({len(paths) - len(todo)} from cache)", file=sys.stderr)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"teacher": tag, "scores": cache}, indent=0))
        os.replace(tmp, cache_path)
    return [cache[k] for k in keys]


# --- student -------------------------------------------------------------------------------
def student_at_rates(model, paths: list[Path], rates) -> dict[str, list[float]]:
    """Student MOS per presentation: {"8000": [...], ..., "native": [...]} (native = the file's own rate)."""
    audio = [load(p) for p in paths]
    out: dict[str, list[float]] = {}
    for rate in rates:
        waves = [resample(w, sr, rate) for w, sr in audio]
        out[str(rate)] = score_waveforms(model, waves, rate)
    # At a presentation rate equal to the file's rate the input is the file itself: reuse that score.
    out["native"] = [out[str(sr)][i] if sr in rates else math.nan for i, (_, sr) in enumerate(audio)]
    by_rate = defaultdict(list)
    for i, (_, sr) in enumerate(audio):
        if sr not in rates:
            by_rate[sr].append(i)
    for sr, idx in by_rate.items():
        for i, s in zip(idx, score_waveforms(model, [audio[i][0] for i in idx], sr)):
            out["native"][i] = s
    return out


def student_heard_at(model, paths: list[Path], rate: int, at: int) -> list[float]:
    """Student MOS for each clip heard at `rate` (resampled there, band and all) and presented at `at`."""
    waves = [heard_at(w, sr, rate, at) for w, sr in (load(p) for p in paths)]
    return score_waveforms(model, waves, at)


# --- metrics -------------------------------------------------------------------------------
def agreement(student: list[float], teacher: list[float]) -> dict:
    s, t = np.asarray(student), np.asarray(teacher)
    return {"n": len(s), "srcc": float(spearmanr(s, t)[0]), "lcc": float(pearsonr(s, t)[0]),
            "mad": float(np.abs(s - t).mean()), "bias": float((s - t).mean())}


def breakdown(rows: list[dict], train_recipes: set, student: dict, teacher: list[float]) -> dict:
    """Agreement on subsets of the split (see the module docstring, 1.), {subset: {rate: agreement}}."""
    seen = np.asarray([(r["degradation"], r["severity"]) in train_recipes for r in rows])
    fits = np.asarray([float(r["bandwidth_hz"]) <= 4000 for r in rows])
    subsets = [("recipe seen in training", seen, RATES), ("recipe never trained on", ~seen, RATES),
               ("band fits below 4 kHz", fits, (8000, 16000)), ("band wider than 4 kHz", ~fits, (8000, 16000))]
    t = np.asarray(teacher)
    return {name: {str(r): agreement(np.asarray(student[str(r)])[m].tolist(), t[m].tolist()) for r in rates}
            for name, m, rates in subsets if m.sum() > 2}  # fewer than 3 clips: no rank correlation


def within_tolerance(res: dict, ref: dict) -> list[tuple[str, float, float, bool]]:
    """(number, this run, reference, within the card's tolerance) for every toleranced number.

    A retrained model reproduces the released one when every row is within tolerance.
    """
    rows = []
    for r in RATES:
        for m in ("srcc", "mad"):
            a, b = res["agreement"][str(r)][m], ref["agreement"][str(r)][m]
            rows.append((f"{m.upper()} at {r} Hz", a, b, abs(a - b) <= TOLERANCE[m] + 1e-9))
    a, b = res["rate_ladder"]["mean_spread"], ref["rate_ladder"]["mean_spread"]
    rows.append(("mean rate-ladder spread", a, b, abs(a - b) <= TOLERANCE["mean_spread"] + 1e-9))
    return rows


def rate_ladder(model, corpus: Path) -> dict:
    rows = read_rows(corpus / "rate_ladder.csv", None)
    by_rate = defaultdict(list)
    for r in rows:
        by_rate[int(r["sample_rate"])].append(r)
    scores: dict[str, dict[int, float]] = defaultdict(dict)
    for sr, rs in sorted(by_rate.items()):
        waves = [load(corpus / r["path"])[0] for r in rs]
        for r, s in zip(rs, score_waveforms(model, waves, sr)):
            scores[r["ladder_id"]][sr] = s
    return ladder_stats(scores)


def teacher_ladder(corpus: Path, cache_path: Path, device: str, batch_size: int) -> dict:
    """The same ladder through DistillMOS as its users run it (each rung resampled to 16 kHz): the
    teacher's own rate dependence, which a student copying it too closely inherits."""
    rows = read_rows(corpus / "rate_ladder.csv", None)
    mos = teacher_scores([corpus / r["path"] for r in rows], cache_path, device, batch_size)
    scores: dict[str, dict[int, float]] = defaultdict(dict)
    for r, m in zip(rows, mos):
        scores[r["ladder_id"]][int(r["sample_rate"])] = m
    return ladder_stats(scores)


def ladder_stats(scores: dict[str, dict[int, float]]) -> dict:
    """Spread (max - min over rates) per clip, and each rate's mean offset from the clip's own mean."""
    by_rate = sorted({sr for v in scores.values() for sr in v})
    spread = {k: max(v.values()) - min(v.values()) for k, v in scores.items()}
    worst = max(spread, key=spread.get)
    offset = {sr: statistics.fmean(v[sr] - statistics.fmean(v.values()) for v in scores.values() if sr in v)
              for sr in by_rate}
    # The same without the lowest rate: where the rest of the spread comes from (8 kHz hears half the band).
    wide = [[s for sr, s in v.items() if sr != by_rate[0]] for v in scores.values()]
    wide_spread = [max(w) - min(w) for w in wide if len(w) > 1]
    return {"clips": len(scores), "rates": by_rate, "mean_spread": statistics.fmean(spread.values()),
            "mean_spread_without_lowest_rate": statistics.fmean(wide_spread) if wide_spread else math.nan,
            "worst_spread_without_lowest_rate": max(wide_spread, default=math.nan),
            "median_spread": statistics.median(spread.values()), "worst_spread": spread[worst], "worst_clip": worst,
            "mean_offset_by_rate": {str(k): v for k, v in offset.items()}, "spread": spread,
            "scores": {k: {str(sr): s for sr, s in v.items()} for k, v in scores.items()}}


def severity_pairs(rows: list[dict], key: str) -> list[tuple[int, int, str]]:
    """(less severe index, more severe index, degradation type) for pairs sharing `key`."""
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r[key]].append(i)
    pairs = []
    for idx in groups.values():
        for a, b in itertools.combinations(idx, 2):
            ra, rb = rows[a], rows[b]
            sa, sb = int(ra["severity"]), int(rb["severity"])
            types = {ra["degradation"], rb["degradation"]}
            if sa == sb or (len(types) == 2 and "clean" not in types):
                continue
            kind = (types - {"clean"} or types).pop()
            pairs.append((a, b, kind) if sa < sb else (b, a, kind))
    return pairs


def severity_order(rows: list[dict], student: list[float], teacher: list[float]) -> dict:
    def share(pairs, s):
        return statistics.fmean(1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0 for a, b, _ in pairs)

    out = {}
    for key in ("utt_id", "group_id"):
        pairs = severity_pairs(rows, key)
        by_type = defaultdict(list)
        for p in pairs:
            by_type[p[2]].append(p)
        out[key] = {"pairs": len(pairs),
                    "student": share(pairs, student) if pairs else math.nan,
                    "teacher": share(pairs, teacher) if pairs else math.nan,
                    "by_type": {k: {"pairs": len(v), "student": share(v, student), "teacher": share(v, teacher)}
                                for k, v in sorted(by_type.items())}}
    return out


# --- report --------------------------------------------------------------------------------
def print_tables(res: dict) -> None:
    print(f"\n## Agreement with DistillMOS ({res['split']} split, {res['n_clips']} clips; teacher at 16 kHz)\n")
    print("| student input rate | n | SRCC | LCC | mean abs diff | mean diff (student - teacher) |")
    print("|---|---|---|---|---|---|")
    for k, a in res["agreement"].items():
        print(f"| {k} | {a['n']} | {a['srcc']:.3f} | {a['lcc']:.3f} | {a['mad']:.3f} | {a['bias']:+.3f} |")
    a = res["agreement_teacher_heard_at_8000"]["8000"]
    print(f"| 8000, teacher also hearing the clip at 8 kHz | {a['n']} | {a['srcc']:.3f} | {a['lcc']:.3f} | "
          f"{a['mad']:.3f} | {a['bias']:+.3f} |")
    nb = res["student_16000_heard_at_8000"]
    a = nb["vs_teacher"]
    print(f"| 16000, the clip heard at 8 kHz first | {a['n']} | {a['srcc']:.3f} | {a['lcc']:.3f} | "
          f"{a['mad']:.3f} | {a['bias']:+.3f} |")
    a = nb["student_8000_vs_it"]
    print(f"\nstudent at 8 kHz vs itself at 16 kHz hearing the same 8 kHz audio: SRCC {a['srcc']:.3f}, "
          f"mean abs diff {a['mad']:.3f}, mean diff {a['bias']:+.3f} (the 8 kHz path's own share of the 8 kHz gap)")
    for who, key in (("teacher", "teacher_8000_vs_itself"), ("student", "student_8000_vs_itself")):
        if key in res:  # results written before these were added lack them
            a = res[key]
            print(f"the {who} hearing each clip at 8 kHz vs itself hearing it at 16 kHz: SRCC {a['srcc']:.3f}, "
                  f"mean abs diff {a['mad']:.3f}, mean diff {a['bias']:+.3f} (what 8 kHz costs its own ranking)")
    ok = res["targets"]["srcc_min"] >= TARGET_SRCC
    print(f"\nlowest SRCC over presentation rates: {res['targets']['srcc_min']:.3f} "
          f"(target >= {TARGET_SRCC}: {'met' if ok else 'NOT met'})")
    print("\nwhere the gap lies (SRCC with the teacher, n clips):\n")
    print("| subset | n | " + " | ".join(f"{r}" for r in RATES) + " |")
    print("|---|---|" + "---|" * len(RATES))
    for name, by in res.get("breakdown", {}).items():
        n = next(iter(by.values()))["n"]
        print(f"| {name} | {n} | " + " | ".join(f"{by[str(r)]['srcc']:.3f}" if str(r) in by else "" for r in RATES) + " |")
    lad = res["rate_ladder"]
    print(f"\n## Rate independence ({lad['clips']} rate-ladder clips, band-limited < 3.5 kHz, "
          f"each stored at {', '.join(str(r) for r in lad['rates'])} Hz)\n")
    print("| mean spread | median spread | worst spread (clip) | target |")
    print("|---|---|---|---|")
    print(f"| {lad['mean_spread']:.3f} | {lad['median_spread']:.3f} | {lad['worst_spread']:.3f} "
          f"({lad['worst_clip']}) | < {TARGET_SPREAD}: {'met' if lad['mean_spread'] < TARGET_SPREAD else 'NOT met'} |")
    print(f"\nwithout {lad['rates'][0]} Hz: mean spread {lad['mean_spread_without_lowest_rate']:.3f}, "
          f"worst {lad['worst_spread_without_lowest_rate']:.3f}")
    print("\nmean offset from each clip's own mean, by rate: "
          + ", ".join(f"{r} Hz {v:+.3f}" for r, v in lad["mean_offset_by_rate"].items()))
    t = res["rate_ladder_teacher"]
    print(f"\nDistillMOS itself on the same ladder (each rung resampled to 16 kHz): mean spread {t['mean_spread']:.3f}, "
          f"median {t['median_spread']:.3f}, worst {t['worst_spread']:.3f}; offsets "
          + ", ".join(f"{r} Hz {v:+.3f}" for r, v in t["mean_offset_by_rate"].items()))
    sev = res["severity"]
    print("\n## Severity order (share of same-utterance pairs ranked more severe -> lower; ties count half)\n")
    print("| degradation | pairs | student (native rate) | DistillMOS (16 kHz) |")
    print("|---|---|---|---|")
    for k, v in sev["utt_id"]["by_type"].items():
        print(f"| {k} | {v['pairs']} | {v['student']:.2f} | {v['teacher']:.2f} |")
    for key, label in (("utt_id", "**all, same utterance**"), ("group_id", "all, same text (any voice)")):
        v = sev[key]
        print(f"| {label} | {v['pairs']} | {v['student']:.2f} | {v['teacher']:.2f} |")
    rt = res["runtime_s"]
    print(f"\nruntime {rt['total']:.0f} s wall, {rt['cpu_total']:.0f} s CPU on {res['threads']} threads "
          f"(load average {res['load_avg_1min'][0]:.1f} -> {res['load_avg_1min'][1]:.1f}; "
          f"teacher {rt['teacher']:.0f} s, student {rt['student']:.0f} s, rate ladder {rt['rate ladder']:.0f} s)")


def plot(res: dict, teacher: list[float], student: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    keys = [str(r) for r in RATES]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7), sharex=True, sharey=True)
    for ax, k in zip(axes.flat, keys):
        a = res["agreement"][k]
        ax.scatter(teacher, student[k], s=8, alpha=0.6)
        ax.plot([1, 5], [1, 5], "k--", lw=0.8)
        ax.set_title(f"{int(k) / 1000:g} kHz: SRCC {a['srcc']:.3f}, MAD {a['mad']:.2f}", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("DistillMOS (16 kHz)")
    for ax in axes[:, 0]:
        ax.set_ylabel("student")
    fig.suptitle(f"{res['model_name']}: student vs teacher, {res['split']} split ({res['n_clips']} clips)")
    fig.tight_layout()
    p1 = folder / "eval_agreement.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    lad = res["rate_ladder"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2.5]})
    a1.boxplot(list(lad["spread"].values()))
    a1.axhline(TARGET_SPREAD, color="r", ls="--", lw=0.8, label=f"target mean < {TARGET_SPREAD}")
    a1.set_xticks([1], ["spread"])
    a1.set_ylabel("max - min MOS over rates")
    a1.legend(fontsize=8)
    for cid, sc in lad["scores"].items():
        rs = sorted(sc, key=int)
        a2.plot([int(r) / 1000 for r in rs], [sc[r] for r in rs], marker="o", ms=3, lw=0.8, alpha=0.7)
    a2.set_xlabel("presented rate (kHz)")
    a2.set_ylabel("student MOS")
    a2.set_title(f"{lad['clips']} clips band-limited < 3.5 kHz: mean spread {lad['mean_spread']:.3f}")
    fig.tight_layout()
    p2 = folder / "eval_rate_ladder.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [str(p1), str(p2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder or bundled model name")
    ap.add_argument("--corpus", type=Path, default=Path("corpus"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, default=Path("eval_results.json"))
    ap.add_argument("--plots", type=Path, default=None, help="folder for eval_agreement.png, eval_rate_ladder.png")
    ap.add_argument("--batch-size", type=int, default=16, help="DistillMOS batch (the student scores each clip alone)")
    ap.add_argument("--max-clips", type=int, default=0, help="first N clips of the split only (smoke runs)")
    ap.add_argument("--device", default="auto", type=lambda s: str(parse_device(s)))
    ap.add_argument("--check-against", type=Path, default=None, metavar="JSON",
                    help="a reference result (docs/eval_default_model.json): exit 1 unless SRCC and mean abs. "
                         f"difference at every rate are within {TOLERANCE['srcc']} and {TOLERANCE['mad']} of it "
                         f"and the mean spread within {TOLERANCE['mean_spread']}")
    args = ap.parse_args()
    ref = None
    if args.check_against:
        try:
            ref = json.loads(args.check_against.read_text())
            ref_split, ref_n = ref["split"], ref["n_clips"]
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"{args.check_against}: not a result of this script ({type(e).__name__}: {e})")
        if ref_split != args.split:
            sys.exit(f"{args.check_against}: a result on split {ref_split!r}, not {args.split!r}")

    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    runtime = {}
    manifest = read_rows(args.corpus / "manifest.csv", None)
    rows = [r for r in manifest if r["split"] == args.split]
    train_recipes = {(r["degradation"], r["severity"]) for r in manifest if r["split"] == "train"}
    if args.max_clips:
        rows = rows[:args.max_clips]
    if not rows:
        sys.exit(f"no clips in split {args.split!r} of {args.corpus / 'manifest.csv'}")
    if ref is not None and len(rows) != ref_n:
        sys.exit(f"{args.check_against}: {ref_n} clips there, {len(rows)} here: not the same split to compare")
    paths = [args.corpus / r["path"] for r in rows]
    model = load_model(args.model, args.device)

    t0 = time.perf_counter()
    teacher = teacher_scores(paths, args.out.resolve().parent / "teacher_distillmos_cache.json", args.device,
                             args.batch_size)
    teacher8 = teacher_scores(paths, args.out.resolve().parent / "teacher_distillmos_cache.json", args.device,
                              args.batch_size, hear_at=8000)
    runtime["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    student = student_at_rates(model, paths, RATES)
    narrow16 = student_heard_at(model, paths, 8000, 16000)
    runtime["student"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ladder = rate_ladder(model, args.corpus)
    runtime["rate ladder"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ladder_t = teacher_ladder(args.corpus, args.out.resolve().parent / "teacher_distillmos_cache.json", args.device,
                              args.batch_size)
    runtime["teacher"] += time.perf_counter() - t0

    agree = {str(r): agreement(student[str(r)], teacher) for r in RATES}
    agree["native"] = agreement(student["native"], teacher)
    res = {"model": str(args.model), "model_name": Path(str(args.model)).name, "corpus": str(args.corpus),
           "split": args.split, "n_clips": len(rows), "device": args.device, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_avg_1min": [load_start, os.getloadavg()[0]],
           "machine": platform.platform(), "agreement": agree,
           "agreement_teacher_heard_at_8000": {"8000": agreement(student["8000"], teacher8)},
           "teacher_8000_vs_itself": agreement(teacher8, teacher),
           "student_8000_vs_itself": agreement(student["8000"], student["16000"]),
           "student_16000_heard_at_8000": {"vs_teacher": agreement(narrow16, teacher),
                                           "student_8000_vs_it": agreement(student["8000"], narrow16)},
           "targets": {"srcc_min": min(agree[str(r)]["srcc"] for r in RATES), "srcc_target": TARGET_SRCC,
                       "mean_spread": ladder["mean_spread"], "spread_target": TARGET_SPREAD},
           "breakdown": breakdown(rows, train_recipes, student, teacher),
           "rate_ladder": ladder, "rate_ladder_teacher": ladder_t, "severity": severity_order(rows, student["native"], teacher),
           "clips": [{"path": r["path"], "sample_rate": int(r["sample_rate"]), "degradation": r["degradation"],
                      "severity": int(r["severity"]), "teacher": teacher[i],
                      **{k: v[i] for k, v in student.items()}} for i, r in enumerate(rows)]}
    if args.plots:
        res["plots"] = plot(res, teacher, student, args.plots)
    runtime["total"] = time.perf_counter() - t_start
    runtime["cpu_total"] = time.process_time() - cpu_start  # all threads: wall time on an idle machine ~ cpu / cores
    res["runtime_s"] = runtime
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print_tables(res)
    print(f"wrote {args.out}" + (f" and {', '.join(res['plots'])}" if args.plots else ""))
    if ref is not None:
        checks = within_tolerance(res, ref)
        print(f"\n| against {args.check_against} | this run | reference | within tolerance |\n|---|---|---|---|")
        for name, a, b, ok in checks:
            print(f"| {name} | {a:.3f} | {b:.3f} | {'yes' if ok else '**no**'} |")
        bad = [name for name, *_, ok in checks if not ok]
        if bad:
            sys.exit(f"outside the model card's tolerances: {', '.join(bad)}")
        print("every number within the model card's tolerances")


if __name__ == "__main__":
    main()
