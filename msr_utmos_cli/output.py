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
import re
import stat
import sys

from .scoring import Row, iter_inputs, score_files

COLUMNS = ["path", "sample_rate", "duration_s", "mos", "error"]


class OutputError(Exception):
    """The output file cannot be used; the message names it and says why."""


class ReaderGone(OutputError):
    """stdout's reader went away (`utmos score ... | head`): stop quietly, as `cat` would."""


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


def complete_prefix(data: bytes, fmt: str) -> int:
    """Length of the whole rows at the start of `data`: a torn last row is cut off. A CSV field may
    hold a quoted newline (a path can), so for CSV only a newline outside quotes ends a row."""
    if fmt != "csv":
        return data.rfind(b"\n") + 1
    cut, inside = 0, False
    for m in re.finditer(rb'["\n]', data):
        if m.group() == b'"':
            inside = not inside
        elif not inside:
            cut = m.end()
    return cut


class ScoreWriter:
    """Appends rows to `path` (or stdout for "-") under an exclusive lock.

    Each chunk is written with unbuffered writes and fsynced; a failed write (disk full) is cut
    back off, so the file always ends with a whole row. Paths that are not valid UTF-8 are written
    back as their original bytes (surrogateescape), so they round-trip through `--resume`.
    """

    def __init__(self, path: str, fmt: str = "csv", resume: bool = False):
        if fmt not in ("csv", "jsonl"):
            raise OutputError(f"unknown format {fmt!r} (csv or jsonl)")
        self.fmt, self.path, self.done, self.fd = fmt, path, set(), None
        self.header = fmt == "csv"
        if path == "-":
            return
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot open for writing ({e.strerror or e})") from None
        try:
            self._open(resume)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, resume: bool) -> None:
        path, fd = self.path, self.fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{path}: another utmos run is writing this file") from None
        except OSError as e:
            raise OutputError(f"{path}: cannot lock ({e.strerror or e})") from None
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if not self.regular:  # /dev/stdout, a pipe: nothing to read back or cut
            if resume:
                raise OutputError(f"{path}: not a regular file; cannot resume")
            return
        data = b""
        if resume:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            if b"\0" in data:
                raise OutputError(f"{path}: existing output is not text; cannot resume")
        keep = data[: complete_prefix(data, self.fmt)]
        text = keep.decode("utf-8", "surrogateescape")
        if self.fmt == "csv" and keep and not text.startswith(COLUMNS[0]):
            raise OutputError(f"{path}: existing file is not a score CSV (no header); cannot resume")
        self.done = done_paths(text, self.fmt) if resume else set()
        try:
            os.ftruncate(fd, len(keep))
        except OSError as e:
            raise OutputError(f"{path}: cannot truncate ({e.strerror or e})") from None
        os.lseek(fd, len(keep), os.SEEK_SET)
        self.size = len(keep)
        self.header = self.fmt == "csv" and not keep

    def write(self, rows: list[Row]) -> None:
        if not rows:
            return
        data = format_rows(rows, self.fmt, self.header).encode("utf-8", "surrogateescape")
        if self.fd is None:
            self._write_stdout(data)
        else:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
                if self.regular:
                    os.fsync(self.fd)
            except OSError as e:
                if self.regular:
                    try:  # cut the part of this chunk that made it, so the file ends with a whole row
                        os.ftruncate(self.fd, self.size)
                        os.lseek(self.fd, self.size, os.SEEK_SET)
                    except OSError:
                        pass
                raise OutputError(f"{self.path}: write failed ({e.strerror or e}); "
                                  "rows written before are kept") from None
            self.size += len(data)
        self.header = False

    def _write_stdout(self, data: bytes) -> None:
        try:
            out = getattr(sys.stdout, "buffer", None)
            if out is None:
                sys.stdout.write(data.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                sys.stdout.flush()
                out.write(data)
                out.flush()
        except BrokenPipeError:
            raise ReaderGone("stdout: the reading end of the pipe closed") from None
        except OSError as e:
            raise OutputError(f"stdout: write failed ({e.strerror or e})") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
