"""Per-system summaries of `utmos score` output, agreement with listening tests, a CI gate.

`build_report` does all the numbers and returns a plain dict (JSON-ready, except the
per-file `utterances` columns that only the plots need); `report_render.print_report` and
`report_render.render_html` only lay that dict out. Who is who (systems, utterance ids, pairing
with the truth and a baseline) is `report_join`'s.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .metrics import bootstrap_mean_ci, mos_metrics, paired_bootstrap_diff_ci
from .provenance import FIELDS, describe, read_meta, same_model
from .report_join import NO_MATCH, ReportError, assign_systems, join_truth, pair_baseline, truth_column

N_ERROR_EXAMPLES = 5
BAND_MARGIN = 0.10  # a file whose content stops this far below its rate's Nyquist frequency is band-limited


# --- loading -------------------------------------------------------------------
def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise ReportError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            rows = []
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ReportError(f"{path}: line {i} is not JSON ({e.msg})") from None
            df = pd.DataFrame(rows)
        else:
            df = pd.read_csv(path, dtype={"path": str, "error": str, "system": str, "utt_id": str},
                             skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ReportError(f"{path}: no {', '.join(repr(c) for c in missing)} column "
                          f"(found: {', '.join(map(str, df.columns)) or 'nothing'})")
    mos = pd.to_numeric(df["mos"], errors="coerce")
    bad = df["mos"].notna() & (df["mos"].astype(str).str.strip() != "") & mos.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ReportError(f"{path}: row {i + 1}: mos {df['mos'].iloc[i]!r} is not a number")
    if df.empty:
        raise ReportError(f"{path}: no rows")
    df["mos"] = mos
    df["path"] = df["path"].astype(str)
    return df


def load_scores(path: Path) -> pd.DataFrame:
    """One `utmos score` file (CSV or JSON lines) with every score column present."""
    df = _read_table(Path(path), ("path", "mos"))
    for col in ("sample_rate", "duration_s", "bandwidth_hz"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    err = df["error"] if "error" in df else pd.Series(np.nan, index=df.index)
    err = err.where(err.notna() & (err.astype(str).str.strip() != ""), None)
    # A row with neither a score nor an error is still unusable: count it as an error.
    df["error"] = err.where(err.notna() | df["mos"].notna(), "no mos value")
    df["source"] = Path(path).stem
    return df


def load_truth(path: Path) -> pd.DataFrame:
    """Listening-test labels, one row per path: individual ratings are averaged."""
    df = _read_table(Path(path), ("path", "mos")).dropna(subset=["mos"])
    agg = {"mos": ("mos", "mean"), "n_ratings": ("mos", "size")}
    if "system" in df:
        agg["system"] = ("system", "first")
    return df.groupby("path", sort=False).agg(**agg).reset_index()


def models_of(path: Path, df: pd.DataFrame) -> list[dict]:
    """The models that made one score file: JSON lines carry them in each row, a CSV in its sidecar."""
    if all(c in df for c in FIELDS):
        return df[FIELDS].astype(object).where(df[FIELDS].notna(), None).drop_duplicates().to_dict("records")
    meta = read_meta(path)
    return [meta] if meta else []


def check_writable(path) -> None:
    """Refuse an output path that cannot be written before any work starts; the file is left as it was."""
    p = Path(path)
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as e:
        raise ReportError(f"{p}: cannot write ({e.strerror or e})") from None
    if not existed:
        p.unlink(missing_ok=True)


def _mixed(files: list[dict], base: dict | None) -> list[str]:
    """Warnings for scores from different models pooled, or compared, as if on one scale."""
    seen: list[dict] = []
    for f in files:
        for m in f["models"]:
            if not any(same_model(m, o) for o in seen):
                seen.append(m)
    out = []
    if len(seen) > 1:
        who = "; ".join(f"{f['file']}: {', '.join(describe(m) for m in f['models'])}" for f in files if f["models"])
        out.append(f"score files from different models are mixed ({who}); their scores are not on one scale")
    if base and base["models"] and seen and not all(same_model(b, m) for b in base["models"] for m in seen):
        out.append(f"the baseline was scored by {', '.join(describe(m) for m in base['models'])}, these scores "
                   f"by {', '.join(describe(m) for m in seen)}: differences include the change of model")
    return out


def _concat_scores(paths, per_file: bool) -> tuple[pd.DataFrame, list[dict]]:
    frames = [load_scores(p) for p in paths]
    if per_file and len({f["source"].iloc[0] if len(f) else p for f, p in zip(frames, paths)}) < len(paths):
        raise ReportError("--system-per-file: two score files share a file name stem")
    return pd.concat(frames, ignore_index=True), [{"file": str(p), "models": models_of(p, f)}
                                                  for p, f in zip(paths, frames)]


# --- numbers -----------------------------------------------------------------------
def _summary(values: np.ndarray, n_boot: int, seed: int) -> dict:
    ci = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return {"files": int(len(values)), "mean": ci.mean, "ci_low": ci.low, "ci_high": ci.high, "std": std}


def _sr_key(sr) -> int | str:
    return int(sr) if pd.notna(sr) else "unknown"


def _baseline(new: pd.DataFrame, base: pd.DataFrame, regex: str | None, n_boot: int, seed: int) -> dict:
    """Each system against the baseline run: paired over the files both scored, however their paths differ."""
    old = base[base["mos"].notna()].drop_duplicates("path").copy()
    new = new[new["mos"].notna()]
    pairs, pairing = pair_baseline(new, old, regex)
    # A paired baseline file counts in its partner's system, however its own system came out.
    old.loc[pairs["old"].to_numpy(), "system"] = new.loc[pairs["new"], "system"].to_numpy()
    paired = pd.DataFrame({"system": new.loc[pairs["new"], "system"].to_numpy(),
                           "mos": new.loc[pairs["new"], "mos"].to_numpy(),
                           "mos_old": old.loc[pairs["old"], "mos"].to_numpy()})
    rows = []
    for system in sorted(set(new["system"]) | set(old["system"])):
        a, b = new[new["system"] == system], old[old["system"] == system]
        shared = paired[paired["system"] == system]
        row = {"system": system, "files_new": int(len(a)), "files_old": int(len(b)),
               "shared_files": int(len(shared)),
               "mean_new": float(a["mos"].mean()) if len(a) else float("nan"),
               "mean_old": float(b["mos"].mean()) if len(b) else float("nan")}
        if len(shared):
            ci = paired_bootstrap_diff_ci(shared["mos"], shared["mos_old"], n_boot=n_boot, seed=seed)
            row.update(diff=ci.mean, ci_low=ci.low, ci_high=ci.high, paired=True)
        else:  # No file in common: all we can say is the difference of the two means.
            row.update(diff=row["mean_new"] - row["mean_old"], ci_low=float("nan"),
                       ci_high=float("nan"), paired=False)
        rows.append(row)
    return {"systems": rows, "pairing": pairing}


def _gate(systems: list[dict], baseline: list[dict] | None, fail_under, fail_drop) -> list[str]:
    reasons = []
    if fail_under is not None:
        for s in systems:
            if not s["files"]:
                reasons.append(f"system {s['system']!r} has no scored files")
            elif s["mean"] < fail_under:
                reasons.append(f"system {s['system']!r} mean MOS {s['mean']:.3f} < {fail_under:g}")
    if fail_drop is not None and baseline is not None:
        for b in baseline:
            if b["files_new"] == 0 and b["files_old"]:
                reasons.append(f"system {b['system']!r} is in the baseline but has no scores now")
            elif b["diff"] < -fail_drop:
                reasons.append(f"system {b['system']!r} dropped {-b['diff']:.3f} (> {fail_drop:g}) "
                               f"vs baseline over {b['shared_files'] or 'all'} files")
    return reasons


def _bandwidth(g: pd.DataFrame) -> dict:
    """Median effective bandwidth of a system's scored files, and the share of them whose content stops
    more than BAND_MARGIN below their rate's Nyquist frequency (a 48 kHz file holding 8 kHz of speech)."""
    g = g[g["bandwidth_hz"].notna() & g["sample_rate"].notna()]
    if not len(g):
        return {"bandwidth_median_hz": float("nan"), "band_limited_share": float("nan")}
    limited = g["bandwidth_hz"] < (1 - BAND_MARGIN) * g["sample_rate"] / 2
    return {"bandwidth_median_hz": float(g["bandwidth_hz"].median()), "band_limited_share": float(limited.mean())}


def _systems(df: pd.DataFrame, has_truth: bool, has_bw: bool, n_boot: int, seed: int) -> list[dict]:
    systems = []
    for system, g in df.groupby("system", sort=True):
        vals = g["mos"].dropna().to_numpy()
        row = {"system": system, **_summary(vals, n_boot, seed), "errors": int(g["mos"].isna().sum())}
        if has_truth:
            t = g["true_mos"][g["mos"].notna()].dropna()
            row.update(true_files=int(len(t)), true_mean=float(t.mean()) if len(t) else float("nan"))
        if has_bw:
            row.update(_bandwidth(g[g["mos"].notna()]))
        systems.append(row)
    ranks = pd.Series([s["mean"] for s in systems]).rank(ascending=False, method="min")
    for s, r in zip(systems, ranks):
        s["rank"] = int(r) if pd.notna(r) else None
    systems.sort(key=lambda s: (s["rank"] is None, s["rank"] or 0, s["system"]))
    return systems


def _listen(ok: pd.DataFrame, has_truth: bool, n: int) -> dict:
    """The files to listen to first: the lowest scored, and those the model and the listeners disagree on most."""
    cols = [c for c in ("path", "system", "sample_rate", "mos", "true_mos", "bandwidth_hz") if c in ok]
    worst = ok.sort_values(["mos", "path"], kind="stable").head(n)[cols]
    out = {"lowest_mos": worst.to_dict("records"), "largest_disagreement": None}
    if has_truth:
        j = ok[ok["true_mos"].notna()].assign(diff=lambda d: d["mos"] - d["true_mos"])
        j = j.assign(gap=j["diff"].abs()).sort_values(["gap", "path"], ascending=[False, True], kind="stable")
        out["largest_disagreement"] = j.head(n)[cols + ["diff"]].to_dict("records")
    return out


def _duplicates(df: pd.DataFrame, per_file: bool) -> list[str]:
    """A warning when a path (or a wav.scp line) is in the score files more than once: it then counts twice.
    With one score file per system, the same path in two of them is two systems' files."""
    key = df["path"] + "\0" + (df["utt_id"].fillna("").astype(str) if "utt_id" in df else "")
    key = key + "\0" + df["source"].astype(str) if per_file else key
    dup = key.duplicated()
    if not dup.any():
        return []
    return [f"{int(dup.sum())} row(s) repeat a path already in the score files (first: {df.loc[dup, 'path'].iloc[0]}); "
            "every row counts, so those files weigh more in the means"]


def build_report(scores, truth=None, *, system_regex: str | None = None, system_per_file: bool = False,
                 system_depth: int | None = None, baseline=None, fail_under: float | None = None,
                 fail_drop: float | None = None, n_boot: int = 2000, seed: int = 0, worst: int = 10) -> dict:
    """Everything `utmos report` shows, as a dict; raises ReportError on bad input.

    Truth comes from `truth` (a labels file) or else from a `true_mos` column in the scores."""
    scores = [Path(p) for p in ([scores] if isinstance(scores, (str, Path)) else scores)]
    if not scores:
        raise ReportError("no score files given")
    if fail_drop is not None and baseline is None:
        raise ReportError("--fail-drop needs --baseline")
    df, made_by = _concat_scores(scores, system_per_file)
    joined = join_truth(df, load_truth(Path(truth))) if truth is not None else truth_column(df)
    has_truth = joined is not None
    truth_info = None
    if has_truth:
        df, truth_info = joined
    df["system"], system_source = assign_systems(df, system_regex, system_per_file,
                                                 df["true_system"] if has_truth else None, system_depth)
    has_bw = bool(df["bandwidth_hz"].notna().any())
    ok = df[df["mos"].notna()]
    systems = _systems(df, has_truth, has_bw, n_boot, seed)
    sr_key = ok["sample_rate"].map(_sr_key)
    sample_rates = [{"sample_rate": k, **_summary(g["mos"].to_numpy(), n_boot, seed)}
                    for k, g in ok.groupby(sr_key, sort=False)]
    sample_rates.sort(key=lambda r: (isinstance(r["sample_rate"], str), r["sample_rate"]))
    errs = df[df["mos"].isna()]

    report = {
        "inputs": {"scores": [str(p) for p in scores], "truth": str(truth) if truth else None,
                   "baseline": str(baseline) if baseline else None, "system_source": system_source,
                   "n_boot": n_boot, "seed": seed},
        "counts": {"rows": int(len(df)), "scored": int(len(ok)), "errors": int(len(errs)),
                   "systems": len(systems), "unassigned_system": int((df["system"] == NO_MATCH).sum())},
        "systems": systems,
        "bandwidth": {"measured": has_bw, "margin": BAND_MARGIN},
        "sample_rates": sample_rates,
        "errors": {"count": int(len(errs)),
                   "first": errs[["path", "error"]].head(N_ERROR_EXAMPLES).to_dict("records")},
        "files": _listen(ok, has_truth, worst),
        "truth": None,
        "baseline": None,
        "provenance": {"report_msr_utmos_version": __version__, "scores": made_by, "baseline": None},
        "warnings": [],
    }
    if has_truth:
        j = ok[ok["true_mos"].notna()]
        per_sr = [{"sample_rate": k, "files": int(len(g)),
                   **mos_metrics(g["mos"], g["true_mos"], g["system"].to_numpy())}
                  for k, g in j.groupby(j["sample_rate"].map(_sr_key), sort=False)]
        per_sr.sort(key=lambda r: (isinstance(r["sample_rate"], str), r["sample_rate"]))
        report["truth"] = {"join": truth_info, "files": int(len(j)),
                           "systems": int(j["system"].nunique()),
                           "metrics": mos_metrics(j["mos"], j["true_mos"], j["system"].to_numpy()),
                           "per_sample_rate": per_sr}
    if baseline is not None:
        base = load_scores(Path(baseline))
        base["system"], _ = assign_systems(base, system_regex, system_per_file, None, system_depth)
        report["baseline"] = {"path": str(baseline), **_baseline(df, base, system_regex, n_boot, seed)}
        report["provenance"]["baseline"] = {"file": str(baseline), "models": models_of(Path(baseline), base)}
    report["warnings"] = _mixed(made_by, report["provenance"]["baseline"]) + _duplicates(df, system_per_file)
    failures = _gate(systems, report["baseline"] and report["baseline"]["systems"], fail_under, fail_drop)
    report["gate"] = {"fail_under": fail_under, "fail_drop": fail_drop,
                      "failures": failures, "passed": not failures}
    report["utterances"] = {
        "path": ok["path"].tolist(), "system": ok["system"].tolist(),
        "sample_rate": ok["sample_rate"].map(_sr_key).tolist(), "mos": ok["mos"].tolist(),
        "true_mos": ok["true_mos"].tolist() if has_truth else None}
    return report


def _clean(x):
    """NaN -> None so the JSON is valid for every parser."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def report_json(report: dict) -> str:
    """The report as JSON, without the per-file columns (those are the score files)."""
    return json.dumps(_clean({k: v for k, v in report.items() if k != "utterances"}), indent=2)
