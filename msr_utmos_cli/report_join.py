"""Who is who in score files: each row's system and utterance id, and how rows of two files pair up.

A score file knows only paths. Systems come from a rule (folder, regex, column); utterance ids from
a wav.scp id, the regex or the file name; and the truth and the baseline are joined on those, so
runs scored from different folders still line up.
"""
from __future__ import annotations

import os
import re
from pathlib import PurePath, PurePosixPath

import numpy as np
import pandas as pd

NO_MATCH = "(no match)"
N_EXAMPLES = 5


class ReportError(Exception):
    """Bad input; the CLI prints it as one line and exits 2."""


def _posix(p: str) -> PurePosixPath:
    return PurePosixPath(p.replace("\\", "/"))


def compile_regex(regex: str | None) -> re.Pattern | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise ReportError(f"--system-regex {regex!r}: {e}") from None


def _regex_system(pattern: re.Pattern, name: str) -> str:
    m = pattern.search(name)
    if not m:
        return NO_MATCH
    if "system" in pattern.groupindex:
        return m.group("system") or NO_MATCH
    return (m.group(1) if pattern.groups else m.group(0)) or NO_MATCH


def _depth_systems(paths: pd.Series, depth: int) -> pd.Series:
    """The first `depth` folders below the deepest folder every path shares; a file in that folder
    itself (or every file, when they share one folder) takes that folder's name."""
    parents = paths.map(lambda p: _posix(p).parent.parts)
    common = os.path.commonprefix(parents.tolist()) if len(parents) else ()
    top = common[-1] if common and common[-1] != "/" else "."
    return parents.map(lambda parts: "/".join(parts[len(common): len(common) + depth]) or top)


def assign_systems(df: pd.DataFrame, regex: str | None = None, per_file: bool = False,
                   truth_systems: pd.Series | None = None, depth: int | None = None) -> tuple[pd.Series, str]:
    """System id per row, and where it came from.

    Order: `--system-per-file` (file stem), `--system-regex` (searched in the file name; the named
    group `system`, else group 1, else the whole match), `--system-depth N` (the top N folders), a
    `system` column in the scores, a `system` column in the truth, the parent folder name.
    """
    if sum(x is not None and x is not False for x in (regex, per_file, depth)) > 1:
        raise ReportError("--system-per-file, --system-regex and --system-depth exclude each other")
    if per_file:
        return df["source"].astype(str), "score file stem"
    if regex is not None:
        pattern = compile_regex(regex)
        return df["path"].map(lambda p: _regex_system(pattern, _posix(p).name)), f"--system-regex {regex}"
    if depth is not None:
        if depth < 1:
            raise ReportError(f"--system-depth {depth}: must be 1 or more")
        return _depth_systems(df["path"], depth), f"--system-depth {depth}"
    parents = df["path"].map(lambda p: _posix(p).parent.name or ".")
    if "system" in df and df["system"].notna().any():
        return df["system"].fillna(parents).astype(str), "system column"
    if truth_systems is not None and truth_systems.notna().any():
        return truth_systems.fillna(parents).astype(str), "truth system column"
    return parents, "parent folder"


def utterance_ids(df: pd.DataFrame, regex: str | None = None) -> pd.Series:
    """Utterance id per row: its wav.scp id when it has one; else, with a --system-regex, the named
    group `utt`, or the file name without the matched text; else the file name without extension."""
    pattern = compile_regex(regex)

    def from_name(p: str) -> str:
        name = _posix(p).name
        if pattern is not None and (m := pattern.search(name)):
            if "utt" in pattern.groupindex and m.group("utt") is not None:
                return m.group("utt")
            name = name[: m.start()] + name[m.end():]
        return PurePosixPath(name).stem
    ids = df["path"].map(from_name)
    if "utt_id" in df:
        own = df["utt_id"].where(df["utt_id"].notna(), "").astype(str).str.strip()
        ids = own.where(own != "", ids)
    return ids


def join_truth(scores: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Attach `true_mos` by exact path, then by utterance id (wav.scp id or file stem) where unique."""
    by_path = truth.set_index("path")
    out = scores.copy()
    out["true_mos"] = out["path"].map(by_path["mos"])
    out["true_system"] = out["path"].map(by_path["system"]) if "system" in truth else np.nan
    hit_path = out["true_mos"].notna()
    # Utterance ids only join where they are unambiguous on both sides.
    t_ids = truth["path"].map(lambda p: PurePath(p.replace("\\", "/")).stem)
    t_unique = truth[~t_ids.duplicated(keep=False)].set_index(t_ids[~t_ids.duplicated(keep=False)])
    s_ids = utterance_ids(out)
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
        "source": "--truth",
        "matched": int((hit_path | hit_id).sum()),
        "matched_by_path": int(hit_path.sum()),
        "matched_by_utterance_id": int(hit_id.sum()),
        "unmatched_scores": int(scored_left.sum()),
        "unmatched_truth": int(t_left.sum()),
        "ambiguous_ids": int((~hit_path & s_dup).sum()),
        "unmatched_score_examples": out.loc[scored_left, "path"].head(N_EXAMPLES).tolist(),
        "unmatched_truth_examples": truth.loc[t_left, "path"].head(N_EXAMPLES).tolist(),
        "truth_paths": int(len(truth)),
        "ratings": int(truth["n_ratings"].sum()),
    }
    return out, info


def truth_column(scores: pd.DataFrame) -> tuple[pd.DataFrame, dict] | None:
    """A `true_mos` column already in the scores (as `utmos finetune` writes its validation predictions)."""
    if "true_mos" not in scores:
        return None
    out = scores.copy()
    out["true_mos"] = pd.to_numeric(out["true_mos"], errors="coerce")
    if out["true_mos"].isna().all():
        return None
    out["true_system"] = np.nan
    have = out["true_mos"].notna()
    left = ~have & out["mos"].notna()
    n = int(have.sum())
    return out, {"source": "true_mos column", "matched": n, "matched_by_path": n, "matched_by_utterance_id": 0,
                 "unmatched_scores": int(left.sum()), "unmatched_truth": 0, "ambiguous_ids": 0,
                 "unmatched_score_examples": out.loc[left, "path"].head(N_EXAMPLES).tolist(),
                 "unmatched_truth_examples": [], "truth_paths": n, "ratings": n}


PAIRINGS = (("by_path", "path"), ("by_system_and_utterance_id", "sys_utt"), ("by_utterance_id", "utt"))


def pair_baseline(new: pd.DataFrame, old: pd.DataFrame, regex: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Pair the scored rows of a baseline run with this run's: by exact path, then by (system, utterance
    id), then by utterance id alone; at each step only keys unique on both sides pair.

    Returns the pairs (new index `new`, old index `old`) and counts. A paired baseline row takes its
    partner's system, so a run scored from another folder is compared system by system.
    """
    new, old = new[new["mos"].notna()], old[old["mos"].notna()]
    keys = []
    for d in (new, old):
        utt = utterance_ids(d, regex)
        keys.append({"path": d["path"], "utt": utt, "sys_utt": d["system"].astype(str) + "\0" + utt})
    free_new = pd.Series(True, index=new.index)
    free_old = pd.Series(True, index=old.index)
    pairs, info = [], {}
    for name, key in PAIRINGS:
        a, b = keys[0][key][free_new], keys[1][key][free_old]
        a, b = a[~a.duplicated(keep=False)], b[~b.duplicated(keep=False)]
        m = pd.DataFrame({"new": a.index, "k": a.to_numpy()}).merge(
            pd.DataFrame({"old": b.index, "k": b.to_numpy()}), on="k")
        free_new[m["new"]] = False
        free_old[m["old"]] = False
        pairs.append(m[["new", "old"]])
        info[name] = int(len(m))
    info.update(unpaired_new=int(free_new.sum()), unpaired_old=int(free_old.sum()))
    return pd.concat(pairs, ignore_index=True), info
