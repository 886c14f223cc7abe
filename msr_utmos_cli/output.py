"""Score files (CSV or JSON lines): flushed per chunk, locked against a second writer, resumable,
never silently replaced, and labelled with the model and msr-utmos version that made them.

A run killed at any point leaves whole rows only: on `--resume` a torn last line is cut off,
the paths already present are skipped, and new rows are appended. JSON lines carry the model's
name, version and weights hash in every row; a CSV keeps plain columns (any CSV reader takes it)
and gets them in a sidecar `<file>.meta.json`.
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
from collections import Counter, deque
from dataclasses import dataclass, field

from .provenance import FIELDS as PROVENANCE, META_SUFFIX, describe, of_model, read_meta, same_model
from .rows import COLUMNS, Row
from .scoring import iter_inputs, score_chunks

JSONL_KEYS = COLUMNS + PROVENANCE
CSV_HEADER = ",".join(COLUMNS)


class OutputError(Exception):
    """The output file cannot be used; the message names it and says why."""


class ReaderGone(OutputError):
    """stdout's reader went away (`utmos score ... | head`): stop quietly, as `cat` would."""


def _key(path: str, utt_id) -> tuple[str, str]:
    """What --resume skips: a path, or one wav.scp line (two ids may name one file)."""
    return path, utt_id or ""


def row_fields(row: Row) -> dict:
    """A row as the file holds it: duration to 0.1 ms, MOS to 5 decimals."""
    return {"path": row.path, "sample_rate": row.sample_rate,
            "duration_s": None if row.duration_s is None else round(row.duration_s, 4),
            "mos": None if row.mos is None else round(row.mos, 5), "error": row.error,
            "bandwidth_hz": row.bandwidth_hz, "utt_id": row.utt_id}


def format_rows(rows: list[Row], fmt: str, header: bool, prov: dict | None = None) -> str:
    buf = io.StringIO()
    if fmt == "jsonl":
        for r in rows:
            buf.write(json.dumps({**row_fields(r), **(prov or {})}, ensure_ascii=False) + "\n")
    else:
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row_fields(r).items()})
    return buf.getvalue()


def read_rows(text: str, fmt: str):
    """The complete rows of an existing output, as dicts (CSV values as text)."""
    if fmt == "jsonl":
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "path" in row:
                yield row
        return
    yield from (r for r in csv.DictReader(io.StringIO(text)) if r.get("path") is not None)


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


# --- what may be written where ----------------------------------------------------
def check_out(path: str, fmt: str, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any work and without touching it, an output that would lose results or mix
    formats. ScoreWriter repeats the check under its lock."""
    _check_args(path, fmt, resume, overwrite)
    if path == "-":
        return
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            if resume:
                raise OutputError(f"{path}: not a regular file; cannot resume")
            return
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return  # absent, or unreadable: opening it for writing says which
    check_head(path, head, fmt, resume, overwrite)


def _check_args(path: str, fmt: str, resume: bool, overwrite: bool) -> None:
    if fmt not in ("csv", "jsonl"):
        raise OutputError(f"unknown format {fmt!r} (csv or jsonl)")
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other")
    if path == "-" and resume:
        raise OutputError("stdout: cannot resume (--resume needs an --out file)")


def check_head(path: str, head: bytes, fmt: str, resume: bool, overwrite: bool) -> None:
    """The rules on an existing file's first bytes: refuse to replace results without --overwrite,
    and to resume a file whose format or columns differ from what this run writes."""
    if not resume:
        if not overwrite and head.strip() not in (b"", CSV_HEADER.encode()):
            raise OutputError(f"{path}: already holds results; add --resume to continue it or "
                              "--overwrite to replace it")
        return
    if b"\n" not in head:
        return  # empty, or one torn line that resuming cuts off
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    if fmt == "csv":
        if first == CSV_HEADER:
            return
        why = ("it holds JSON lines (resume it with --format jsonl)" if first.lstrip().startswith("{") else
               f"its columns ({first[:120]}) differ from {CSV_HEADER}")
        raise OutputError(f"{path}: cannot resume: {why}")
    try:
        keys = list(json.loads(first))
    except (ValueError, TypeError):
        why = ("it is a CSV (resume it with --format csv)" if first.startswith(COLUMNS[0] + ",")
               else "it is not a JSON lines score file")
        raise OutputError(f"{path}: cannot resume: {why}") from None
    if sorted(keys) != sorted(JSONL_KEYS):
        raise OutputError(f"{path}: cannot resume: its fields ({', '.join(map(str, keys))[:160]}) differ "
                          f"from those this version writes ({', '.join(JSONL_KEYS)})")


def _check_model(path: str, theirs: dict | None, ours: dict) -> None:
    if theirs and ours.get("model_sha256") and theirs.get("model_sha256") and not same_model(theirs, ours):
        raise OutputError(f"{path}: cannot resume: it was scored by {describe(theirs)}, this run uses "
                          f"{describe(ours)}; use another --out, or --overwrite")


@dataclass
class Tally:
    """Counts over every row of an output, old and new: what the summary and the gates judge."""
    files: int = 0
    scored: int = 0
    errors: int = 0
    mos_sum: float = 0.0
    audio_s: float = 0.0
    first_errors: list = field(default_factory=list)

    def add(self, path: str, mos, error, duration) -> None:
        self.files += 1
        try:
            mos = float(mos) if mos not in (None, "") else math.nan
        except (TypeError, ValueError):
            mos = math.nan
        if error or math.isnan(mos):
            self.errors += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(f"{path}: {error or 'no mos value'}")
            return
        self.scored += 1
        self.mos_sum += mos
        try:
            self.audio_s += float(duration or 0.0)
        except (TypeError, ValueError):
            pass


class ScoreWriter:
    """Appends rows to `path` (or stdout for "-") under an exclusive lock.

    An existing file that holds rows is refused unless `resume` (keep them, skip their paths) or
    `overwrite`, and left as it was. The CSV header is written on opening, so even a run that
    scores nothing leaves a readable file. Each chunk is written with unbuffered writes and
    fsynced; a failed write (disk full) is cut back off, so the file always ends with a whole
    row. Paths that are not valid UTF-8 are written back as their original bytes
    (surrogateescape), so they round-trip through `--resume`.
    """

    def __init__(self, path: str, fmt: str = "csv", resume: bool = False, overwrite: bool = False,
                 prov: dict | None = None):
        _check_args(path, fmt, resume, overwrite)
        self.fmt, self.path, self.done, self.fd = fmt, path, set(), None
        self.prov = prov or {}
        self.earlier = Tally()
        self.header = fmt == "csv"
        if path == "-":
            self.write([])
            return
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot open for writing ({e.strerror or e})") from None
        try:
            self._open(resume, overwrite)
        except BaseException:
            os.close(self.fd)
            raise
        self.write([])

    def _open(self, resume: bool, overwrite: bool) -> None:
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
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read() if resume else f.read(1 << 16)
        check_head(path, data, self.fmt, resume, overwrite)
        keep = b""
        if resume:
            if b"\0" in data:
                raise OutputError(f"{path}: existing output is not text; cannot resume")
            keep = data[: complete_prefix(data, self.fmt)]
            rows = list(read_rows(keep.decode("utf-8", "surrogateescape"), self.fmt))
            if rows:
                _check_model(path, read_meta(path) if self.fmt == "csv" else next(
                    (r for r in rows if not same_model(r, self.prov)), None), self.prov)
            for r in rows:
                if _key(r["path"], r.get("utt_id")) not in self.done:
                    self.done.add(_key(r["path"], r.get("utt_id")))
                    self.earlier.add(r["path"], r.get("mos"), r.get("error"), r.get("duration_s"))
        try:
            os.ftruncate(fd, len(keep))
        except OSError as e:
            raise OutputError(f"{path}: cannot truncate ({e.strerror or e})") from None
        os.lseek(fd, len(keep), os.SEEK_SET)
        self.size = len(keep)
        self.header = self.fmt == "csv" and not keep
        if self.fmt == "csv" and (not self.done or read_meta(path) is None):
            self._write_meta()

    def _write_meta(self) -> None:
        from pathlib import Path

        from .checkpoint import atomic_write

        text = json.dumps({"format": "csv", "columns": COLUMNS, **self.prov}, indent=2) + "\n"
        try:
            atomic_write(Path(self.path + META_SUFFIX), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError as e:
            raise OutputError(f"{self.path}{META_SUFFIX}: cannot write ({e.strerror or e})") from None

    def write(self, rows: list[Row]) -> None:
        if not rows and not self.header:
            return
        data = format_rows(rows, self.fmt, self.header, self.prov).encode("utf-8", "surrogateescape")
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
                 overwrite: bool = False, recursive: bool = True, progress=None, **score_kw) -> dict:
    """Score every input into `out`, chunk by chunk; returns the summary of the whole file.

    With `resume`, paths already in `out` are skipped and the summary (files, scored, errors,
    mean_mos) counts the earlier rows too, so gates judge the file, not just this run.
    `progress(files_done, files_total)` is called after every window; the total is None when
    paths come from stdin (not counted in advance).
    """
    writer = ScoreWriter(out, fmt, resume, overwrite, of_model(model))
    tally, not_audio = writer.earlier, Counter()
    ids: deque[str] = deque()  # the wav.scp ids of the inputs handed on, matched to their rows (in input order)

    def todo():
        for p, e, utt in iter_inputs(inputs, recursive, not_audio):
            if _key(p, utt) not in writer.done:
                ids.append(utt)
                yield p, e

    tick = None
    if progress is not None:
        total = None if "-" in inputs else sum(1 for p, _, u in iter_inputs(inputs, recursive)
                                                if _key(p, u) not in writer.done)
        done = [0.0]
        progress(0.0, total)

        def tick(share: float) -> None:
            done[0] += share
            progress(done[0], total)
    earlier = tally.files
    try:
        for rows in score_chunks(model, todo(), progress=tick, **score_kw):
            for r in rows:
                r.utt_id = ids.popleft()
            writer.write(rows)
            for r in rows:
                tally.add(r.path, r.mos, r.error, r.duration_s)
    finally:
        writer.close()
    return {"files": tally.files, "scored": tally.scored, "errors": tally.errors,
            "mean_mos": tally.mos_sum / tally.scored if tally.scored else math.nan,
            "audio_s": tally.audio_s, "first_errors": tally.first_errors, "earlier": earlier,
            "new": tally.files - earlier, "not_audio": dict(not_audio),
            "provenance": writer.prov}


def gate_failures(summary: dict, strict: bool = False, fail_under: float | None = None) -> list[str]:
    """Why a finished run fails its gates (empty: it passes). Judges every row of the output."""
    if not summary["scored"]:
        return [f"no file could be scored ({summary['errors']} error(s))"]
    failures = []
    if strict and summary["errors"]:
        failures.append(f"--strict: {summary['errors']} file(s) could not be scored")
    if fail_under is not None and not summary["mean_mos"] >= fail_under:
        failures.append(f"mean MOS {summary['mean_mos']:.3f} is below --fail-under {fail_under:g}")
    return failures


def nothing_found(inputs: list[str], not_audio: dict) -> str:
    """The reason for a run whose inputs held no audio file at all."""
    where = ", ".join(inputs)
    where = where if len(where) <= 120 else where[:117] + "..."
    msg = f"no audio files found in {where}"
    if not_audio:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(not_audio.items(), key=lambda kv: -kv[1])[:5])
        msg += f" (passed over {sum(not_audio.values())} file(s) of types it cannot read: {kinds})"
    return msg
