"""The headline protocol: how a model judges voices, languages and degradations it never trained on.

    python benchmarks/eval_heldout.py --model models/<name> --corpus corpus_ml/ [--out heldout.json]
        [--peers distillmos,dnsmos] [--max-utts N] [--rates 8000,16000,24000,48000]

The corpus is scripts/build_multilingual.py's: its `heldout` split holds whole languages and speakers
that no training clip has, each utterance clean and along full severity ladders (some degradation types
never trained on), stored at one of 16 / 24 / 44.1 / 48 kHz. For the model and its peers on the same clips:

1. Severity order: pairs of the same utterance and degradation type (clean = severity 0) ranked the
   right way round (more severe -> lower; a tie counts half), overall (with a 95 % interval from drawing
   the utterances again), per type and per source: the recorded human speech (klettres-data words)
   apart from each synthesiser (espeak-ng, festival, flite), because a judge can be right about people
   and wrong about formant synthesis, or the reverse.
2. Agreement with DistillMOS (at 16 kHz, its own rate): SRCC and mean absolute difference with each
   clip at its own rate and presented at each of --rates (band-limited resampling from the file; ''
   for none, a quick run of the whole split), and per language. With the distillmos peer, DistillMOS
   itself hearing the clip at each rate below 16 kHz: what that rate costs the teacher's own ranking.
3. Rate spread: the same clean content below 3.5 kHz stored at 8-48 kHz (rate_ladder.csv): max - min.
4. Level: each clean utterance scaled to a peak of 0, -10, -20 and -30 dBFS: max - min.
5. Silence: each clean utterance with 1 s of digital zero, or of a -80 dBFS noise floor, at both ends:
   the largest change from the plain clip.

Targets (the model card's): severity order >= 0.95 overall and per codec ladder, SRCC >= 0.9 at 16-48 kHz
and >= 0.85 at 8 kHz, rate spread mean <= 0.05 and worst <= 0.15, level spread <= 0.05, silence <= 0.1.
Peer scores are cached beside --out (by path and mtime), so reruns pay only for the model.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_default_model import agreement, load, read_rows, severity_pairs, teacher_scores  # noqa: E402

from msr_utmos_cli import load_model  # noqa: E402
from msr_utmos_cli.audio import AudioError, resample  # noqa: E402
from msr_utmos_cli.scoring import score_waveforms  # noqa: E402

RATES = (8000, 16000, 24000, 48000)
LEVELS_DB = (0.0, -10.0, -20.0, -30.0)
CODEC_LADDERS = ("codec_opus", "codec_mp3", "codec_aac", "codec_amrwb")
TARGETS = {"order": 0.95, "srcc_wide": 0.9, "srcc_8k": 0.85, "spread_mean": 0.05, "spread_worst": 0.15,
           "level": 0.05, "silence": 0.1}


# --- peers ----------------------------------------------------------------------------------
def dnsmos_scores(paths: list[Path], cache_path: Path) -> list[float]:
    """DNSMOS P.808 MOS (speechmos) of each file resampled to 16 kHz; cached by path and mtime."""
    tag = f"speechmos {version('speechmos')} p808"
    cache = {}
    if cache_path.exists():
        data = json.loads(cache_path.read_text())
        cache = data.get("scores", {}) if data.get("peer") == tag else {}
    keys = [f"{p.resolve()}|{p.stat().st_mtime_ns}" for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        from msr_utmos_cli.training.teachers import DNSMOSTeacher

        dns = DNSMOSTeacher()
        for i in todo:
            cache[keys[i]] = peer_array(dns, *load(paths[i]))
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"peer": tag, "scores": cache}))
        tmp.replace(cache_path)
    return [cache[k] for k in keys]


def peer_array(teacher, wave: torch.Tensor, sr: int) -> float:
    """A 16 kHz peer's MOS of one clip, resampled to 16 kHz as its own users would."""
    x = resample(wave, sr, 16000)[None]
    return float(teacher(x, torch.tensor([x.shape[1]]))["mos"][0])


def model_score(model, wave: torch.Tensor, sr: int) -> float:
    """The model's MOS, or NaN where it refuses the input (e.g. all silent)."""
    try:
        return score_waveforms(model, [wave], sr)[0]
    except AudioError:
        return math.nan


# --- the five measurements ---------------------------------------------------------------------
def severity(rows: list[dict], scores: dict[str, list[float]]) -> dict:
    """{judge: {"all": share, type: share, "source:" + source: share}} over same-utterance pairs."""
    pairs = severity_pairs(rows, "utt_id")
    by_type = defaultdict(list)
    for p in pairs:  # "source:..." sorts after every type name, so the tables list the types first
        by_type[p[2]].append(p)
        by_type["source:" + rows[p[0]].get("source", "?")].append(p)

    def share(ps, s):
        return statistics.fmean(credit(s, a, b) for a, b, _ in ps)

    return {j: {"all": share(pairs, s), "all_ci95": order_ci(rows, pairs, s), "pairs": len(pairs),
                **{k: share(v, s) for k, v in sorted(by_type.items())}}
            for j, s in scores.items()}


def credit(s: list[float], a: int, b: int) -> float:
    """1 when the less severe clip a scores above b, half for a tie."""
    return 1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0


def order_ci(rows: list[dict], pairs: list, s: list[float], base: list[float] | None = None,
             draws: int = 2000) -> list[float]:
    """95 % interval of the overall order (or, with `base`, of s's order minus base's on the same
    pairs) when the utterances are drawn again (with replacement).

    The pairs of one utterance are not independent (one odd clean clip flips several), so the
    utterance, not the pair, is the unit. It covers which utterances were drawn, not how training
    went: two seeds of one recipe can differ by more than a paired interval allows."""
    utts = sorted({rows[a]["utt_id"] for a, _, _ in pairs})
    where = {u: i for i, u in enumerate(utts)}
    right, count = np.zeros(len(utts)), np.zeros(len(utts))
    for a, b, _ in pairs:
        i = where[rows[a]["utt_id"]]
        right[i] += credit(s, a, b) - (credit(base, a, b) if base is not None else 0.0)
        count[i] += 1
    draw = np.random.default_rng(0).integers(0, len(utts), size=(draws, len(utts)))  # (draws, U)
    shares = right[draw].sum(1) / count[draw].sum(1)
    return [float(q) for q in np.percentile(shares, [2.5, 97.5])]


def by_language(rows: list[dict], student: list[float], teacher: list[float]) -> dict:
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r["language"]].append(i)
    return {lang: agreement([student[i] for i in idx], [teacher[i] for i in idx])
            for lang, idx in sorted(groups.items()) if len(idx) >= 5}


def rate_spread(model, corpus: Path) -> dict:
    scores = defaultdict(dict)
    for r in read_rows(corpus / "rate_ladder.csv", None):
        w, sr = load(corpus / r["path"])
        scores[r["ladder_id"]][sr] = model_score(model, w, sr)
    spread = [max(v.values()) - min(v.values()) for v in scores.values() if all(s == s for s in v.values())]
    return {"clips": len(spread), "mean": statistics.fmean(spread), "worst": max(spread)}


def level_and_silence(judges: dict, clean: list[tuple[torch.Tensor, int]]) -> dict:
    """{judge: {"level": (mean, worst) spread, "silence": (mean, worst) |change|}} on clean clips."""
    rng = np.random.default_rng(0)
    out = {}
    for name, judge in judges.items():
        level, silence = [], []
        for w, sr in clean:
            w = w / w.abs().max()
            s = [judge(w * 10 ** (db / 20), sr) for db in LEVELS_DB]
            level.append(max(s) - min(s))
            base = judge(w * 0.5, sr)
            floor = torch.from_numpy(rng.standard_normal(sr).astype(np.float32)) * 10 ** (-80 / 20)
            for pad in (torch.zeros(sr), floor):
                silence.append(abs(judge(torch.cat([pad, w * 0.5, pad]), sr) - base))
        out[name] = {"level": [statistics.fmean(level), max(level)], "silence": [statistics.fmean(silence), max(silence)]}
    return out


# --- report -------------------------------------------------------------------------------------
def print_tables(res: dict) -> None:
    judges = list(res["severity"])
    print(f"\n## Held-out protocol: {res['n_clips']} clips, {res['n_utts']} utterances, languages "
          f"{', '.join(res['languages'])}\n")
    print("| measured on held-out voices and languages | " + " | ".join(judges) + " |")
    print("|---|" + "---|" * len(judges))
    sev = res["severity"]
    print(f"| severity order, all {sev[judges[0]]['pairs']} pairs | " + " | ".join(f"{sev[j]['all']:.3f}" for j in judges) + " |")
    print("| the same, 95 % interval over utterances | "
          + " | ".join(f"{sev[j]['all_ci95'][0]:.3f}–{sev[j]['all_ci95'][1]:.3f}" for j in judges) + " |")
    types = [k for k in sev[judges[0]] if k not in ("all", "all_ci95", "pairs")]
    for t in types:
        label = f"{t.removeprefix('source:')} voices only" if t.startswith("source:") else t
        print(f"| severity order, {label} | " + " | ".join(f"{sev[j][t]:.3f}" for j in judges) + " |")
    for r, a in res["agreement"].items():
        cells = [f"{a[j]['srcc']:.3f} / {a[j]['mad']:.2f}" if j in a else "1 / 0" if j == "distillmos" else "–"
                 for j in judges]
        at = "at each file's own rate" if r == "native" else f"presented at {r} Hz"
        print(f"| SRCC / MAD with DistillMOS, {at} | " + " | ".join(cells) + " |")
    rs = res["rate_spread"]
    print(f"| same content at 8-48 kHz: spread mean / worst ({rs['clips']} clips) | {rs['mean']:.3f} / {rs['worst']:.3f} |"
          + " – |" * (len(judges) - 1))
    for key, label in (("level", "peak 0 to -30 dBFS: spread"), ("silence", "1 s silence at both ends: change")):
        cells = [f"{res['robustness'][j][key][0]:.3f} / {res['robustness'][j][key][1]:.3f}" if j in res["robustness"]
                 else "–" for j in judges]
        print(f"| {label} mean / worst | " + " | ".join(cells) + " |")
    print("\n| language | n | SRCC with DistillMOS (file rate) | MAD | mean diff |\n|---|---|---|---|---|")
    for lang, a in res["by_language"].items():
        print(f"| {lang} | {a['n']} | {a['srcc']:.3f} | {a['mad']:.3f} | {a['bias']:+.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder or bundled model name")
    ap.add_argument("--corpus", type=Path, default=Path("corpus_ml"))
    ap.add_argument("--out", type=Path, default=Path("heldout.json"))
    ap.add_argument("--peers", default="distillmos,dnsmos", help="comma list of peers scored on the same clips")
    ap.add_argument("--max-utts", type=int, default=0, help="about N held-out utterances, spread over the sources (quick runs)")
    ap.add_argument("--robust-clips", type=int, default=24, help="clean clips used for the level and silence tests")
    ap.add_argument("--rates", default=",".join(map(str, RATES)),
                    help="rates every clip is also presented at for agreement ('' for none: each file's own rate only)")
    args = ap.parse_args()
    try:
        rates = [int(r) for r in args.rates.split(",") if r]
    except ValueError:
        sys.exit(f"--rates: expected comma-separated rates in Hz, not {args.rates!r}")
    t0 = time.perf_counter()
    rows = [r for r in read_rows(args.corpus / "manifest.csv", None) if r["split"] == "heldout"]
    if args.max_utts:
        utts = sorted({r["utt_id"] for r in rows})
        keep = set(utts[:: math.ceil(len(utts) / args.max_utts)])  # spread over every source and language
        rows = [r for r in rows if r["utt_id"] in keep]
    if not rows:
        sys.exit(f"{args.corpus / 'manifest.csv'}: no held-out clips (build it with scripts/build_multilingual.py)")
    paths = [args.corpus / r["path"] for r in rows]
    cache = args.out.resolve().parent
    peers = [p for p in args.peers.split(",") if p]
    teacher = teacher_scores(paths, cache / "teacher_distillmos_cache.json", "cpu", 16)
    model = load_model(args.model, "cpu")
    audio = [load(p) for p in paths]
    native = [model_score(model, w, sr) for w, sr in audio]
    keep = [i for i, s in enumerate(native) if s == s]  # a clip the model refuses (all silent) is left out for all
    if len(keep) < len(rows):
        print(f"left out {len(rows) - len(keep)} clip(s) the model cannot score", file=sys.stderr)
        rows, paths, audio, native, teacher = ([x[i] for i in keep] for x in (rows, paths, audio, native, teacher))
    judges = {"model": native, "distillmos": teacher}
    if "dnsmos" in peers:
        judges["dnsmos"] = dnsmos_scores(paths, cache / "dnsmos_cache.json")
    agree = {"native": {"model": agreement(native, teacher)}}
    if "dnsmos" in judges:
        agree["native"]["dnsmos"] = agreement(judges["dnsmos"], teacher)
    for rate in rates:
        at = [native[i] if sr == rate else model_score(model, resample(w, sr, rate), rate)
              for i, (w, sr) in enumerate(audio)]
        agree[str(rate)] = {"model": agreement(at, teacher)}  # DNSMOS hears every file at 16 kHz: its row is "native"
        if "distillmos" in peers and rate < 16000:  # what the rate costs DistillMOS's own ranking
            heard = teacher_scores(paths, cache / "teacher_distillmos_cache.json", "cpu", 16, hear_at=rate)
            agree[str(rate)]["distillmos"] = agreement(heard, teacher)
    clean = [audio[i] for i, r in enumerate(rows) if r["degradation"] == "clean"][: args.robust_clips]
    funcs = {"model": lambda w, sr: model_score(model, w, sr)}
    if "distillmos" in peers:
        from msr_utmos_cli.training.teachers import DistillMOSTeacher

        dm = DistillMOSTeacher().eval()
        funcs["distillmos"] = lambda w, sr: peer_array(dm, w, sr)
    with torch.inference_mode():
        robust = level_and_silence(funcs, clean)
    res = {"model": str(args.model), "corpus": str(args.corpus), "n_clips": len(rows),
           "n_utts": len({r["utt_id"] for r in rows}), "languages": sorted({r["language"] for r in rows}),
           "severity": severity(rows, judges), "agreement": agree,
           "by_language": by_language(rows, native, teacher), "rate_spread": rate_spread(model, args.corpus),
           "robustness": robust, "targets": TARGETS, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "seconds": round(time.perf_counter() - t0, 1),
           "clips": [{"path": r["path"], "degradation": r["degradation"], "severity": int(r["severity"]),
                      **{j: s[i] for j, s in judges.items()}} for i, r in enumerate(rows)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print_tables(res)
    print(f"\nwrote {args.out} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
