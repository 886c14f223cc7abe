"""Score files (CSV or JSON lines): flushed per chunk, locked against a second writer, resumable.

A run killed at any point leaves whole rows only: on `--resume` a torn last line is cut off,
the paths already present are skipped, and new rows are appended.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import sys
from typing import IO

from .scoring import Row, iter_inputs, score_files

COLUMNS = ["path", "sample_rate", "duration_s", "mos", "error"]


class OutputError(Exception):
    """The output file cannot be used; the message names it and says why."""


def _fmt(row: Row) -> dict:
    return {"path": row.path, "sample_rate": row.sample_rate,
            "duration_s": None if row.duration_s is None else round(row.duration_s, 4),
            "mos": None if row.mos is None else round(row.mos, 5), "error": row.error}


def format_rows(rows: list[Row], fmt: str, header: bool) -> str:
    buf = io.StringIO()
    if fmt == "jsonl":
        for r in rows:
            buf.write(json.dumps(_fmt(r), ensure_ascii=False) + "\n")
    else:
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in _fmt(r).items()})
    return buf.getvalue()


def done_paths(text: str, fmt: str) -> set[str]:
    """Paths that already have a complete row in an existing output."""
    if fmt == "jsonl":
        out = set()
        for line in text.splitlines():
            try:
                out.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue
        return out
    return {r["path"] for r in csv.DictReader(io.StringIO(text)) if r.get("path") is not None}


class ScoreWriter:
    """Appends rows to `path` (or stdout for "-") under an exclusive lock."""

    def __init__(self, path: str, fmt: str = "csv", resume: bool = False):
        if fmt not in ("csv", "jsonl"):
            raise OutputError(f"unknown format {fmt!r} (csv or jsonl)")
        self.fmt, self.path, self.done = fmt, path, set()
        self.f: IO[str]
        if path == "-":
            self.f, self.header = sys.stdout, fmt == "csv"
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot open for writing ({e.strerror or e})") from None
        self.f = os.fdopen(fd, "r+", encoding="utf-8", newline="")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise OutputError(f"{path}: another utmos run is writing this file") from None
        try:
            text = self.f.read() if resume else ""
        except UnicodeDecodeError:
            self.f.close()
            raise OutputError(f"{path}: existing output is not text; cannot resume") from None
        keep = text[: text.rfind("\n") + 1]  # drop a torn last line
        if resume and fmt == "csv" and keep and not keep.startswith(COLUMNS[0]):
            self.f.close()
            raise OutputError(f"{path}: existing file is not a score CSV (no header); cannot resume")
        self.done = done_paths(keep, fmt) if resume else set()
        self.f.seek(len(keep.encode("utf-8")))
        self.f.truncate()
        self.header = fmt == "csv" and not keep

    def write(self, rows: list[Row]) -> None:
        if not rows:
            return
        data = format_rows(rows, self.fmt, self.header)
        self.header = False
        try:
            self.f.write(data)
            self.f.flush()
            if self.f is not sys.stdout:
                os.fsync(self.f.fileno())
        except OSError as e:
            raise OutputError(f"{self.path}: write failed ({e.strerror or e}); rows written before are kept") from None

    def close(self) -> None:
        if self.f is not sys.stdout:
            self.f.close()


def write_scores(model, inputs: list[str], out: str, fmt: str = "csv", resume: bool = False,
                 recursive: bool = True, progress=None, **score_kw) -> dict:
    """Score every input into `out`, chunk by chunk; returns the run summary.

    Skips paths already in `out` when resuming. `progress(rows)` is called after each chunk.
    """
    writer = ScoreWriter(out, fmt, resume)
    mos: list[float] = []
    summary = {"files": 0, "scored": 0, "errors": 0, "skipped": 0, "audio_s": 0.0, "first_errors": []}

    def todo():
        for p, e in iter_inputs(inputs, recursive):
            if p in writer.done:
                summary["skipped"] += 1
            else:
                yield p, e

    try:
        for rows in score_files(model, todo(), **score_kw):
            writer.write(rows)
            for r in rows:
                summary["files"] += 1
                if r.error:
                    summary["errors"] += 1
                    if len(summary["first_errors"]) < 5:
                        summary["first_errors"].append(f"{r.path}: {r.error}")
                else:
                    mos.append(r.mos)
                    summary["audio_s"] += r.duration_s or 0.0
            if progress is not None:
                progress(rows)
    finally:
        writer.close()
    summary["scored"] = len(mos)
    summary["mean_mos"] = sum(mos) / len(mos) if mos else math.nan
    return summary
