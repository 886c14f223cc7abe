"""Per-system summaries of `utmos score` output, agreement with listening tests, a CI gate.

`build_report` does all the numbers and returns a plain dict (JSON-ready, except the
per-file `utterances` columns that only the plots need); `print_report` and
`render_html` only lay that dict out.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from .metrics import METRICS, bootstrap_mean_ci, mos_metrics, paired_bootstrap_diff_ci

SCORE_COLUMNS = ("path", "sample_rate", "duration_s", "mos", "error")
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


def _concat_scores(paths, per_file: bool) -> pd.DataFrame:
    frames = [load_scores(p) for p in paths]
    if per_file and len({f["source"].iloc[0] if len(f) else p for f, p in zip(frames, paths)}) < len(paths):
        raise ReportError("--system-per-file: two score files share a file name stem")
    return pd.concat(frames, ignore_index=True)


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
    df = _concat_scores(scores, system_per_file)
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
def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(r: dict) -> str:
    return "n/a" if math.isnan(r["ci_low"]) else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table, shared by the terminal and the HTML."""
    truth = report["truth"] is not None
    head = ["Rank", "System", "Files", "Errors", "Mean MOS", "95% CI"] + (["True MOS", "Labelled"] if truth else [])
    rows = [[str(s["rank"] or "-"), str(s["system"]), str(s["files"]), str(s["errors"]), _f(s["mean"]), _ci(s)]
            + ([_f(s["true_mean"]), str(s["true_files"])] if truth else []) for s in report["systems"]]
    out = [(f"Systems (by {report['inputs']['system_source']})", head, rows)]
    out.append(("Sampling rates", ["Rate (Hz)", "Files", "Mean MOS", "95% CI"],
                [[str(r["sample_rate"]), str(r["files"]), _f(r["mean"]), _ci(r)] for r in report["sample_rates"]]))
    if report["errors"]["count"]:
        n = report["errors"]["count"]
        out.append((f"Files with errors: {n}" + (f" (first {N_ERROR_EXAMPLES})" if n > N_ERROR_EXAMPLES else ""),
                    ["Path", "Error"],
                    [[e["path"], str(e["error"])] for e in report["errors"]["first"]]))
    if truth:
        m = report["truth"]["metrics"]
        out.append((f"Agreement with listening test ({report['truth']['files']} files, "
                    f"{report['truth']['systems']} systems)", ["Level", *METRICS],
                    [["utterance", *(_f(m[f"utt_{k}"]) for k in METRICS)],
                     ["system", *(_f(m[f"sys_{k}"]) for k in METRICS)]]))
        out.append(("Agreement per sampling rate", ["Rate (Hz)", "Files", "Level", *METRICS],
                    [[str(r["sample_rate"]), str(r["files"]) if lvl == "utt" else "", name,
                      *(_f(r[f"{lvl}_{k}"]) for k in METRICS)]
                     for r in report["truth"]["per_sample_rate"]
                     for lvl, name in (("utt", "utterance"), ("sys", "system"))]))
    if report["baseline"] is not None:
        out.append((f"Versus baseline {report['baseline']['path']} (new - old, paired over shared files)",
                    ["System", "Shared", "Old mean", "New mean", "Difference", "95% CI"],
                    [[str(b["system"]), str(b["shared_files"]), _f(b["mean_old"]), _f(b["mean_new"]),
                      _f(b["diff"]), _ci(b) if b["paired"] else "unpaired"] for b in report["baseline"]["systems"]]))
    return out


def _notes(report: dict) -> list[str]:
    c, notes = report["counts"], []
    notes.append(f"{c['rows']} rows from {len(report['inputs']['scores'])} score file(s): "
                 f"{c['scored']} scored, {c['errors']} with errors, {c['systems']} systems.")
    if c["unassigned_system"]:
        notes.append(f"{c['unassigned_system']} files matched no --system-regex and are grouped as {NO_MATCH!r}.")
    if report["truth"] is not None:
        j = report["truth"]["join"]
        notes.append(f"Truth: {j['truth_paths']} labelled files ({j['ratings']} ratings); matched {j['matched']} "
                     f"({j['matched_by_path']} by path, {j['matched_by_utterance_id']} by utterance id); "
                     f"unmatched: {j['unmatched_scores']} scored files, {j['unmatched_truth']} truth files"
                     + (f" ({j['ambiguous_ids']} of these have an utterance id that is not unique, so "
                        f"only a path match could join them)" if j["ambiguous_ids"] else "") + ".")
        for label, key in (("scored files without truth", "unmatched_score_examples"),
                           ("truth files without scores", "unmatched_truth_examples")):
            if j[key]:
                notes.append(f"First {label}: {', '.join(j[key])}")
    return notes


def _verdict(report: dict) -> str:
    g = report["gate"]
    if g["fail_under"] is None and g["fail_drop"] is None:
        return "No gate set (--fail-under / --fail-drop)."
    return "PASS" if g["passed"] else "FAIL: " + "; ".join(g["failures"])


def print_report(report: dict, console) -> None:
    """Rich tables on `console`."""
    from rich import box
    from rich.table import Table

    for note in _notes(report):
        console.print(note, highlight=False, markup=False)
    for title, head, rows in _tables(report):
        console.print()
        console.print(title, style="bold", highlight=False, markup=False)  # a Table title would wrap
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for i, h in enumerate(head):
            text = h in ("System", "Path", "Error", "Level")
            width = max([len(h)] + [len(r[i]) for r in rows]) if not text else None
            # Numbers keep their full width; only text columns may fold.
            table.add_column(h, justify="left" if text else "right", overflow="fold", min_width=width)
        for r in rows:
            table.add_row(*r)
        console.print(table)
    console.print(_verdict(report), highlight=False, markup=False)


# --- html ----------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _horizontal() -> dict:
    import matplotlib

    new = tuple(int(v) for v in matplotlib.__version__.split(".")[:2]) >= (3, 10)
    return {"orientation": "horizontal"} if new else {"vert": False}  # `vert` is deprecated in 3.11


def _figure(n_rows: int):
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg via savefig

    return Figure(figsize=(8, min(2 + 0.3 * n_rows, 20)), layout="constrained")


def _plots(report: dict) -> list[tuple[str, str]]:
    utt = pd.DataFrame({k: v for k, v in report["utterances"].items() if v is not None})
    systems = [s for s in report["systems"] if s["files"]][:60]
    names = [str(s["system"]) for s in systems]
    plots = []
    fig = _figure(len(systems))
    ax = fig.add_subplot()
    y = np.arange(len(systems))[::-1]
    means = np.array([s["mean"] for s in systems])
    err = np.array([[s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]] for s in systems]).reshape(-1, 2).T
    ax.errorbar(means, y, xerr=np.nan_to_num(err), fmt="o", capsize=3)
    ax.set(yticks=y, yticklabels=names, xlabel="mean predicted MOS (95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    plots.append(("Mean MOS per system" + (" (first 60 by rank)" if len(report["systems"]) > 60 else ""), _png(fig)))
    for title, key, order in (("Score distribution per system", "system", names),
                              ("Score distribution per sampling rate", "sample_rate",
                               [r["sample_rate"] for r in report["sample_rates"]])):
        fig = _figure(len(order))
        ax = fig.add_subplot()
        ax.boxplot([utt.loc[utt[key] == k, "mos"].to_numpy() for k in order][::-1], showmeans=True,
                   **_horizontal())
        ax.set_yticks(range(1, len(order) + 1), [str(k) for k in order][::-1])
        ax.set(xlabel="predicted MOS", ylabel="sample rate (Hz)" if key == "sample_rate" else "")
        ax.grid(axis="x", alpha=0.3)
        plots.append((title, _png(fig)))
    if report["truth"] is not None:
        j = utt.dropna(subset=["true_mos"])
        sysm = j.groupby("system")[["mos", "true_mos"]].mean()
        m = report["truth"]["metrics"]
        for title, d, label in ((f"Predicted vs true, utterance level (LCC {_f(m['utt_LCC'])}, "
                                 f"SRCC {_f(m['utt_SRCC'])})", j, False),
                                (f"Predicted vs true, system level (LCC {_f(m['sys_LCC'])}, "
                                 f"SRCC {_f(m['sys_SRCC'])})", sysm, True)):
            fig = _figure(12)
            fig.set_size_inches(6, 6)
            ax = fig.add_subplot()
            # Fade points as they multiply so dense regions stay readable.
            alpha = 0.8 if label else float(np.clip(1000 / max(len(d), 1), 0.15, 0.5))
            ax.scatter(d["true_mos"], d["mos"], s=36 if label else 8, alpha=alpha, linewidths=0)
            lo, hi = 1, 5
            if len(d):
                lo = min(lo, d[["mos", "true_mos"]].min().min())
                hi = max(hi, d[["mos", "true_mos"]].max().max())
            ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
            if label and len(d) <= 12:  # more names overlap; the systems table has them
                for name, r in d.iterrows():
                    ax.annotate(str(name), (r["true_mos"], r["mos"]), fontsize=8,
                                xytext=(3, 3), textcoords="offset points")
            ax.set(xlabel="true MOS", ylabel="predicted MOS", aspect="equal")
            ax.grid(alpha=0.3)
            plots.append((title, _png(fig)))
    if report["baseline"] is not None:
        rows = [b for b in report["baseline"]["systems"] if not math.isnan(b["diff"])][:60]
        fig = _figure(len(rows))
        ax = fig.add_subplot()
        y = np.arange(len(rows))[::-1]
        d = np.array([b["diff"] for b in rows])
        err = np.array([[b["diff"] - b["ci_low"], b["ci_high"] - b["diff"]] for b in rows]).reshape(-1, 2).T
        ax.errorbar(d, y, xerr=np.nan_to_num(err), fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1)
        if report["gate"]["fail_drop"] is not None:
            ax.axvline(-report["gate"]["fail_drop"], color="red", ls="--", lw=1, label="--fail-drop")
            ax.legend()
        ax.set(yticks=y, yticklabels=[str(b["system"]) for b in rows], xlabel="new - old mean MOS (95% CI)")
        ax.grid(axis="x", alpha=0.3)
        plots.append(("Change versus baseline", _png(fig)))
    return plots


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f0f0f0}td{text-align:right;font-variant-numeric:tabular-nums}td.t{text-align:left}
.pass{color:#060;font-weight:bold}.fail{color:#b00;font-weight:bold}img{max-width:100%}
figure{margin:0 0 1.5em}figcaption{font-weight:bold;margin-bottom:.3em}"""


def render_html(report: dict, path) -> None:
    """One self-contained HTML file: tables plus plots embedded as base64 PNG."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>utmos report</title>"
             f"<style>{_CSS}</style></head><body><h1>utmos report</h1>"]
    verdict = _verdict(report)
    cls = "fail" if verdict.startswith("FAIL") else "pass" if verdict == "PASS" else ""
    parts.append(f"<p class='{cls}'>{e(verdict)}</p>")
    parts += [f"<p>{e(n)}</p>" for n in _notes(report)]
    for title, head, rows in _tables(report):
        text_cols = {i for i, h in enumerate(head) if h in ("System", "Path", "Error", "Level")}
        parts.append(f"<h2>{e(title)}</h2><table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td{' class=t' if i in text_cols else ''}>{e(c)}</td>"
                                          for i, c in enumerate(r)) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Plots</h2>")
    parts += [f"<figure><figcaption>{e(t)}</figcaption>{img}</figure>" for t, img in _plots(report)]
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts), encoding="utf-8")
