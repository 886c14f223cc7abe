"""Labelled lists for fine-tuning: a generic CSV, BVCC/VoiceMOS lists and AudioMOS 2025 Track 3 lists.

Layouts (`layout:` of a corpus; "auto" picks one from the first line):

- `csv`: a header naming `path` and `mos`, plus optional `system`, `listener`, `domain` and
  `bandwidth_hz` columns. One row per rating or one row per utterance mean: rows that share a
  path are averaged into one utterance, and their individual ratings are kept (with the
  listener, when there is a `listener` column) for listener embeddings. Without a `system`
  column the system is the parent folder name (as in `utmos report`).
- `bvcc`: VoiceMOS 2022 / BVCC lists without a header. Two fields per line,
  `sysXXXX-uttYYYY.wav,mos` (the per-utterance means of `DATA/sets/train_mos_list.txt`), or five,
  `system,wav,score,_,listener_info` (the per-rating `DATA/sets/TRAINSET`; the whole
  listener_info field is the listener id). The system is the file name before the first `-`
  unless the line names it.
- `amc25t3`: AudioMOS 2025 Track 3 lists without a header: `wav,mos` or `wav,mos,system`, the
  wav files at mixed 16/24/48 kHz. The rate comes from each file's header, never its name; the
  system is the third field, else the file name before the first `-`. Our copy of the official
  file names could not be checked offline: if yours differs, write the generic CSV instead.

Relative paths resolve against the corpus's wav root (default: the list's own folder).
Every problem (missing file, unreadable audio, bad or out-of-scale label) becomes one
`Problem` naming the list, the row and the cause; a file is reported once, at its first row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from ..audio import AudioError, AudioInfo, probe
from .tables import TableError, as_records, read_lines

LAYOUTS = ("auto", "csv", "bvcc", "amc25t3")
OPTIONAL_COLUMNS = ("system", "listener", "domain", "bandwidth_hz")


class LabelError(Exception):
    """A list that cannot be used at all (unreadable, no `mos` column), or rows that failed checks."""


@dataclass(frozen=True)
class Problem:
    """One bad row: `file: row N (line M): cause`. Rows count data rows from 1; lines count the file's lines."""

    file: str
    row: int
    line: int
    cause: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row} (line {self.line}): {self.cause}"


@dataclass
class Utterance:
    """One labelled file: the mean label and every individual rating as (listener or None, score)."""

    path: str
    mos: float
    system: str
    domain: int
    info: AudioInfo | None
    bandwidth_hz: float | None = None
    ratings: list[tuple[str | None, float]] = field(default_factory=list)
    row: int = 0


def _sniff(first: list[str]) -> str:
    names = {c.strip().lower() for c in first}
    if "path" in names or "mos" in names:
        return "csv"
    return "bvcc"


def _rows(path: Path, layout: str) -> tuple[str, list[tuple[int, int, dict]]]:
    """(layout, [(row, line, fields)]) with fields named path/mos/system/listener/domain/bandwidth_hz."""
    try:
        numbered = read_lines(path)
        if not numbered:
            raise LabelError(f"{path}: no rows")
        if layout == "auto":
            layout = _sniff(numbered[0][1])
        if layout == "csv":
            return layout, [(row, line, d) for row, (line, d) in
                            enumerate(as_records(numbered, path, ("path", "mos")), 1)]
    except TableError as e:
        raise LabelError(f"{e}; a label list is path,mos[,{','.join(OPTIONAL_COLUMNS)}]") from None
    out = []
    for row, (line, r) in enumerate(numbered, 1):
        r = [c.strip() for c in r]
        if layout == "bvcc" and len(r) == 5:
            d = {"system": r[0], "path": r[1], "mos": r[2], "listener": r[4]}
        elif len(r) in (2, 3):
            d = {"path": r[0], "mos": r[1], "system": r[2] if len(r) == 3 else None}
        else:
            d = {"path": r[0], "mos": None, "_error": f"{len(r)} fields; {layout} lines are wav,mos"
                                                     + (" or system,wav,score,_,listener" if layout == "bvcc"
                                                        else "[,system]")}
        out.append((row, line, d))
    return layout, out


def default_system(path: str, layout: str) -> str:
    p = PurePath(path.replace("\\", "/"))
    if layout == "csv":
        return p.parent.name or "."
    return p.name.split("-", 1)[0] if "-" in p.name else p.stem


def read_labels(csv_path: str | os.PathLike, wav_root: str | os.PathLike | None = None, layout: str = "auto",
                domain: int = 0, scale: tuple[float, float] = (1.0, 5.0), check_audio: bool = True
                ) -> tuple[list[Utterance], list[Problem]]:
    """Read one labelled list. Returns the usable utterances (in first-row order) and the problems.

    `domain` is the corpus's domain id; a `domain` column overrides it per row. With
    `check_audio`, every file's header is read once (rate, length, channels).
    """
    if layout not in LAYOUTS:
        raise LabelError(f"{csv_path}: unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    csv_path = Path(csv_path)
    root = Path(wav_root) if wav_root is not None else csv_path.parent
    layout, rows = _rows(csv_path, layout)
    lo, hi = scale
    utts: dict[str, Utterance] = {}
    bad_paths: set[str] = set()
    problems: list[Problem] = []

    def bad(row: int, line: int, cause: str) -> None:
        problems.append(Problem(str(csv_path), row, line, cause))

    for row, line, d in rows:
        if d.get("_error"):
            bad(row, line, d["_error"])
            continue
        raw_path = d.get("path") or ""
        if not raw_path:
            bad(row, line, "empty path")
            continue
        full = str(Path(raw_path) if os.path.isabs(raw_path) else root / raw_path)
        if full in bad_paths:
            continue  # the file's problem was reported at its first row
        raw = d.get("mos")
        try:
            mos = float(raw)
        except (TypeError, ValueError):
            bad(row, line, "missing mos value" if raw in (None, "") else f"mos {raw!r} is not a number")
            continue
        if not lo <= mos <= hi:  # also rejects NaN
            bad(row, line, f"mos {raw} is outside the declared scale {lo:g}-{hi:g}")
            continue
        dom = domain
        if d.get("domain"):
            try:
                dom = int(d["domain"])
                if dom < 0:
                    raise ValueError
            except ValueError:
                bad(row, line, f"domain {d['domain']!r} is not a non-negative integer")
                continue
        bw = None
        if d.get("bandwidth_hz"):
            try:
                bw = float(d["bandwidth_hz"])
            except ValueError:
                bad(row, line, f"bandwidth_hz {d['bandwidth_hz']!r} is not a number")
                continue
        listener = d.get("listener") or None
        if full in utts:
            utts[full].ratings.append((listener, mos))
            continue
        info = None
        if check_audio:
            if not os.path.lexists(full):
                bad_paths.add(full)
                bad(row, line, f"no such file: {full}")
                continue
            try:
                info = probe(full)
            except AudioError as e:
                bad_paths.add(full)
                bad(row, line, f"{full}: {e}")
                continue
        system = d.get("system") or default_system(full, layout)
        utts[full] = Utterance(full, mos, system, dom, info, bw, [(listener, mos)], row)
    for u in utts.values():
        u.mos = sum(s for _, s in u.ratings) / len(u.ratings)
    return list(utts.values()), problems
