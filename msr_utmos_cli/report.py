"""Per-system summaries of `utmos score` output, agreement with listening tests, a CI gate.

`build_report` does all the numbers and returns a plain dict (JSON-ready, except the
per-file `utterances` columns that only the plots need); `print_report` and
`render_html` only lay that dict out.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from . import __version__
from .metrics import bootstrap_mean_ci, mos_metrics, paired_bootstrap_diff_ci
from .provenance import FIELDS, describe, read_meta, same_model

N_ERROR_EXAMPLES = 5
NO_MATCH = "(no match)"


class ReportError(Exception):
    """Bad input; the CLI prints it as one line and exits 2."""


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
            df = pd.read_csv(path, dtype={"path": str, "error": str, "system": str},
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
    for col in ("sample_rate", "duration_s"):
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


# --- systems and joining -----------------------------------------------------------
def assign_systems(df: pd.DataFrame, regex: str | None = None, per_file: bool = False,
                   truth_systems: pd.Series | None = None) -> tuple[pd.Series, str]:
    """System id per row, and where it came from.

    Order: `--system-per-file` (file stem), `--system-regex` (searched in the file
    name; group 1 if the pattern has a group, else the whole match), a `system`
    column in the scores, a `system` column in the truth, the parent folder name.
    """
    names = df["path"].map(lambda p: PurePath(p.replace("\\", "/")).name)
    parents = df["path"].map(lambda p: PurePath(p.replace("\\", "/")).parent.name or ".")
    if per_file:
        return df["source"].astype(str), "score file stem"
    if regex is not None:
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ReportError(f"--system-regex {regex!r}: {e}") from None

        def pick(name: str) -> str:
            m = pattern.search(name)
            return ((m.group(1) if pattern.groups else m.group(0)) if m else None) or NO_MATCH
        return names.map(pick), f"--system-regex {regex}"
    if "system" in df and df["system"].notna().any():
        return df["system"].fillna(parents).astype(str), "system column"
    if truth_systems is not None and truth_systems.notna().any():
        return truth_systems.fillna(parents).astype(str), "truth system column"
    return parents, "parent folder"


def _utt_id(p: str) -> str:
    return PurePath(p.replace("\\", "/")).stem


def join_truth(scores: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Attach `true_mos` by exact path, then by utterance id (file stem) where unique."""
    by_path = truth.set_index("path")
    out = scores.copy()
    out["true_mos"] = out["path"].map(by_path["mos"])
    out["true_system"] = out["path"].map(by_path["system"]) if "system" in truth else np.nan
    hit_path = out["true_mos"].notna()
    # Utterance ids only join where they are unambiguous on both sides.
    t_ids = truth["path"].map(_utt_id)
    t_unique = truth[~t_ids.duplicated(keep=False)].set_index(t_ids[~t_ids.duplicated(keep=False)])
    s_ids = out["path"].map(_utt_id)
    s_dup = s_ids.duplicated(keep=False)
    todo = ~hit_path & ~s_dup
    out["true_mos"] = out["true_mos"].fillna(s_ids.map(t_unique["mos"]).where(todo))
    if "system" in truth:
        out["true_system"] = out["true_system"].fillna(s_ids.map(t_unique["system"]).where(todo))
    hit_id = ~hit_path & out["true_mos"].notna()
    used = set(out.loc[hit_path, "path"]) | set(s_ids[hit_id])
    t_left = ~(truth["path"].isin(used) | t_ids.isin(used))
    scored_left = out["true_mos"].isna() & out["mos"].notna()
    info = {
        "matched": int((hit_path | hit_id).sum()),
        "matched_by_path": int(hit_path.sum()),
        "matched_by_utterance_id": int(hit_id.sum()),
        "unmatched_scores": int(scored_left.sum()),
        "unmatched_truth": int(t_left.sum()),
        "ambiguous_ids": int((~hit_path & s_dup).sum()),
        "unmatched_score_examples": out.loc[scored_left, "path"].head(N_ERROR_EXAMPLES).tolist(),
        "unmatched_truth_examples": truth.loc[t_left, "path"].head(N_ERROR_EXAMPLES).tolist(),
        "truth_paths": int(len(truth)),
        "ratings": int(truth["n_ratings"].sum()),
    }
    return out, info


# --- numbers -----------------------------------------------------------------------
def _summary(values: np.ndarray, n_boot: int, seed: int) -> dict:
    ci = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return {"files": int(len(values)), "mean": ci.mean, "ci_low": ci.low, "ci_high": ci.high, "std": std}


def _sr_key(sr) -> int | str:
    return int(sr) if pd.notna(sr) else "unknown"


def _baseline(df: pd.DataFrame, base: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    new = df[df["mos"].notna()]
    old = base[base["mos"].notna()].drop_duplicates("path")
    rows = []
    for system in sorted(set(new["system"]) | set(old["system"])):
        a, b = new[new["system"] == system], old[old["system"] == system]
        shared = a.merge(b[["path", "mos"]], on="path", suffixes=("", "_old"))
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
    return rows


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


def build_report(scores, truth=None, *, system_regex: str | None = None,
                 system_per_file: bool = False, baseline=None, fail_under: float | None = None,
                 fail_drop: float | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything `utmos report` shows, as a dict; raises ReportError on bad input."""
    scores = [Path(p) for p in ([scores] if isinstance(scores, (str, Path)) else scores)]
    if not scores:
        raise ReportError("no score files given")
    if system_per_file and system_regex is not None:
        raise ReportError("--system-per-file and --system-regex are exclusive")
    if fail_drop is not None and baseline is None:
        raise ReportError("--fail-drop needs --baseline")
    df, made_by = _concat_scores(scores, system_per_file)
    truth_info, truth_df = None, load_truth(Path(truth)) if truth is not None else None
    if truth_df is not None:
        df, truth_info = join_truth(df, truth_df)
    df["system"], system_source = assign_systems(
        df, system_regex, system_per_file, df["true_system"] if truth_df is not None else None)
    ok = df[df["mos"].notna()]

    systems = []
    for system, g in df.groupby("system", sort=True):
        vals = g["mos"].dropna().to_numpy()
        row = {"system": system, **_summary(vals, n_boot, seed), "errors": int(g["mos"].isna().sum())}
        if truth_df is not None:
            t = g["true_mos"][g["mos"].notna()].dropna()
            row.update(true_files=int(len(t)), true_mean=float(t.mean()) if len(t) else float("nan"))
        systems.append(row)
    ranks = pd.Series([s["mean"] for s in systems]).rank(ascending=False, method="min")
    for s, r in zip(systems, ranks):
        s["rank"] = int(r) if pd.notna(r) else None
    systems.sort(key=lambda s: (s["rank"] is None, s["rank"] or 0, s["system"]))

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
        "sample_rates": sample_rates,
        "errors": {"count": int(len(errs)),
                   "first": errs[["path", "error"]].head(N_ERROR_EXAMPLES).to_dict("records")},
        "truth": None,
        "baseline": None,
        "provenance": {"report_msr_utmos_version": __version__, "scores": made_by, "baseline": None},
        "warnings": [],
    }
    if truth_df is not None:
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
        own, _ = assign_systems(base, system_regex, system_per_file)
        # A file scored in both runs keeps this run's system, however that was found.
        base["system"] = base["path"].map(df.drop_duplicates("path").set_index("path")["system"])
        base["system"] = base["system"].fillna(own)
        report["baseline"] = {"path": str(baseline), "systems": _baseline(df, base, n_boot, seed)}
        report["provenance"]["baseline"] = {"file": str(baseline), "models": models_of(Path(baseline), base)}
    report["warnings"] = _mixed(made_by, report["provenance"]["baseline"])
    failures = _gate(systems, report["baseline"] and report["baseline"]["systems"], fail_under, fail_drop)
    report["gate"] = {"fail_under": fail_under, "fail_drop": fail_drop,
                      "failures": failures, "passed": not failures}
    report["utterances"] = {
        "path": ok["path"].tolist(), "system": ok["system"].tolist(),
        "sample_rate": ok["sample_rate"].map(_sr_key).tolist(), "mos": ok["mos"].tolist(),
        "true_mos": ok["true_mos"].tolist() if truth_df is not None else None}
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


# --- layout ------------------------------------------------------------------------


# Rendering lives in report_render; re-exported so callers need one import.
from .report_render import print_report, render_html  # noqa: E402,F401
