"""Rendering of a `build_report` dict: rich tables for the terminal and one HTML file (plots embedded,
audio linked)."""
from __future__ import annotations

import base64
import html
import io
import math
import os
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import METRICS
from .provenance import describe
from .report import N_ERROR_EXAMPLES
from .report_join import NO_MATCH

def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(r: dict) -> str:
    return "n/a" if math.isnan(r["ci_low"]) else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _int(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else str(int(x))


def _share(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


# (title, header, rows, audio path per row or None): every table, shared by the terminal and the HTML
TableSpec = tuple[str, list[str], list[list[str]], "list[str] | None"]


def _listen_tables(report: dict) -> list[TableSpec]:
    files, out = report["files"], []
    bw = report["bandwidth"]["measured"]
    truth = files["largest_disagreement"] is not None
    for key, title, extra in (("lowest_mos", "Lowest-scored files", []),
                              ("largest_disagreement", "Files where prediction and truth disagree most",
                               ["Predicted - true"])):
        rows = files[key]
        if not rows:
            continue
        head = ["Path", "System", "Rate (Hz)", "MOS"] + (["True MOS"] if truth else []) + \
            (["Bandwidth (Hz)"] if bw else []) + extra
        body = [[r["path"], str(r["system"]), _int(r["sample_rate"]), _f(r["mos"])]
                + ([_f(r.get("true_mos"))] if truth else []) + ([_int(r.get("bandwidth_hz"))] if bw else [])
                + ([f"{r['diff']:+.3f}"] if extra else []) for r in rows]
        out.append((f"{title} ({len(rows)})", head, body, [r["path"] for r in rows]))
    return out


def _tables(report: dict) -> list[TableSpec]:
    truth = report["truth"] is not None
    head = ["Rank", "System", "Files", "Errors", "Mean MOS", "95% CI"] + (["True MOS", "Labelled"] if truth else [])
    rows = [[str(s["rank"] or "-"), str(s["system"]), str(s["files"]), str(s["errors"]), _f(s["mean"]), _ci(s)]
            + ([_f(s["true_mean"]), str(s["true_files"])] if truth else []) for s in report["systems"]]
    out = [(f"Systems (by {report['inputs']['system_source']})", head, rows, None)]
    if report["bandwidth"]["measured"]:
        out.append(("Bandwidth per system (what the score does not see)",
                    ["System", "Median bandwidth (Hz)", "Band-limited"],
                    [[str(s["system"]), _int(s["bandwidth_median_hz"]), _share(s["band_limited_share"])]
                     for s in report["systems"]], None))
    out.append(("Sampling rates", ["Rate (Hz)", "Files", "Mean MOS", "95% CI"],
                [[str(r["sample_rate"]), str(r["files"]), _f(r["mean"]), _ci(r)] for r in report["sample_rates"]],
                None))
    if report["errors"]["count"]:
        n = report["errors"]["count"]
        out.append((f"Files with errors: {n}" + (f" (first {N_ERROR_EXAMPLES})" if n > N_ERROR_EXAMPLES else ""),
                    ["Path", "Error"], [[e["path"], str(e["error"])] for e in report["errors"]["first"]], None))
    if truth:
        m = report["truth"]["metrics"]
        out.append((f"Agreement with listening test ({report['truth']['files']} files, "
                    f"{report['truth']['systems']} systems)", ["Level", *METRICS],
                    [["utterance", *(_f(m[f"utt_{k}"]) for k in METRICS)],
                     ["system", *(_f(m[f"sys_{k}"]) for k in METRICS)]], None))
        out.append(("Agreement per sampling rate", ["Rate (Hz)", "Files", "Level", *METRICS],
                    [[str(r["sample_rate"]), str(r["files"]) if lvl == "utt" else "", name,
                      *(_f(r[f"{lvl}_{k}"]) for k in METRICS)]
                     for r in report["truth"]["per_sample_rate"]
                     for lvl, name in (("utt", "utterance"), ("sys", "system"))], None))
    if report["baseline"] is not None:
        out.append((f"Versus baseline {report['baseline']['path']} (new - old, paired over shared files)",
                    ["System", "Shared", "Old mean", "New mean", "Difference", "95% CI"],
                    [[str(b["system"]), str(b["shared_files"]), _f(b["mean_old"]), _f(b["mean_new"]),
                      _f(b["diff"]), _ci(b) if b["paired"] else "unpaired"] for b in report["baseline"]["systems"]],
                    None))
    return out + _listen_tables(report)


def _notes(report: dict) -> list[str]:
    c, notes = report["counts"], []
    notes.append(f"{c['rows']} rows from {len(report['inputs']['scores'])} score file(s): "
                 f"{c['scored']} scored, {c['errors']} with errors, {c['systems']} systems.")
    prov = report.get("provenance") or {}
    made = sorted({describe(m) for f in prov.get("scores", []) for m in f["models"]})
    notes.append(f"Scored by {'; '.join(made) if made else 'an unrecorded model (no provenance in the score files)'}; "
                 f"report by msr-utmos {prov.get('report_msr_utmos_version', '?')}.")
    if c["unassigned_system"]:
        notes.append(f"{c['unassigned_system']} files matched no --system-regex and are grouped as {NO_MATCH!r}.")
    if report["bandwidth"]["measured"]:
        notes.append(f"Band-limited: the share of files whose content stops more than "
                     f"{100 * report['bandwidth']['margin']:.0f} % below their rate's Nyquist frequency (e.g. 16 kHz "
                     "audio upsampled to 48 kHz); the score does not reward content above ~8 kHz.")
    if report["truth"] is not None:
        j = report["truth"]["join"]
        if j["source"] == "true_mos column":
            notes.append(f"Truth: the true_mos column of the score files ({j['matched']} labelled files).")
        else:
            notes.append(f"Truth: {j['truth_paths']} labelled files ({j['ratings']} ratings); matched {j['matched']} "
                         f"({j['matched_by_path']} by path, {j['matched_by_utterance_id']} by utterance id); "
                         f"unmatched: {j['unmatched_scores']} scored files, {j['unmatched_truth']} truth files"
                         + (f" ({j['ambiguous_ids']} of these have an utterance id that is not unique, so "
                            f"only a path match could join them)" if j["ambiguous_ids"] else "") + ".")
        for label, key in (("scored files without truth", "unmatched_score_examples"),
                           ("truth files without scores", "unmatched_truth_examples")):
            if j[key]:
                notes.append(f"First {label}: {', '.join(j[key])}")
    if report["baseline"] is not None:
        b = report["baseline"]["pairing"]
        notes.append(f"Baseline: paired {b['by_path'] + b['by_system_and_utterance_id'] + b['by_utterance_id']} "
                     f"scored files ({b['by_path']} by path, {b['by_system_and_utterance_id']} by system and "
                     f"utterance id, {b['by_utterance_id']} by utterance id alone); unpaired: {b['unpaired_new']} "
                     f"new, {b['unpaired_old']} old.")
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
    for title, head, rows, _ in _tables(report):
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


def _audio_src(path: str, html_dir: str) -> str:
    """A link to an audio file from the HTML's folder: relative, so the report and the audio move together."""
    target = os.path.abspath(path)
    try:
        return urllib.parse.quote(os.path.relpath(target, html_dir).replace(os.sep, "/"))
    except ValueError:  # another drive (Windows): no relative path exists
        return Path(target).as_uri()


def render_html(report: dict, path) -> None:
    """One HTML file: tables plus plots embedded as base64 PNG; the files to listen to come with an
    <audio> player that links to each file (relative to the HTML's folder)."""
    e = html.escape
    html_dir = os.path.dirname(os.path.abspath(path))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>utmos report</title>"
             f"<style>{_CSS}</style></head><body><h1>utmos report</h1>"]
    verdict = _verdict(report)
    cls = "fail" if verdict.startswith("FAIL") else "pass" if verdict == "PASS" else ""
    parts.append(f"<p class='{cls}'>{e(verdict)}</p>")
    parts += [f"<p class='fail'>Warning: {e(w)}</p>" for w in report.get("warnings", [])]
    parts += [f"<p>{e(n)}</p>" for n in _notes(report)]
    for title, head, rows, audio in _tables(report):
        text_cols = {i for i, h in enumerate(head) if h in ("System", "Path", "Error", "Level")}
        head = head + (["Listen"] if audio else [])
        parts.append(f"<h2>{e(title)}</h2><table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>")
        for k, r in enumerate(rows):
            player = (f"<td><audio controls preload='none' src='{e(_audio_src(audio[k], html_dir))}'></audio></td>"
                      if audio else "")
            parts.append("<tr>" + "".join(f"<td{' class=t' if i in text_cols else ''}>{e(c)}</td>"
                                          for i, c in enumerate(r)) + player + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Plots</h2>")
    parts += [f"<figure><figcaption>{e(t)}</figcaption>{img}</figure>" for t, img in _plots(report)]
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts), encoding="utf-8")
