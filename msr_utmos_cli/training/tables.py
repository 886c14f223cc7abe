"""The CSV lists training reads (labelled lists, manifests, cached teacher scores), read one way."""
from __future__ import annotations

import csv
import os


class TableError(Exception):
    """A list that cannot be read, or lacks a column it needs; one line naming the file."""


def read_lines(path: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every line that holds something. UTF-8 with or without a byte-order
    mark; spaces after a comma are dropped, so `a.wav, 3.5` reads as written by a spreadsheet."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [(i, r) for i, r in enumerate(csv.reader(f, skipinitialspace=True), 1)
                    if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TableError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def as_records(lines: list[tuple[int, list[str]]], path: str | os.PathLike,
               required: tuple[str, ...] = ()) -> list[tuple[int, dict[str, str | None]]]:
    """The first line as a header (names stripped, lower case) -> (line number, {column: stripped text,
    None where the row is short}) for the others. A missing `required` column raises TableError."""
    if not lines:
        return []
    (hline, header), body = lines[0], lines[1:]
    header = [h.strip().lower() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise TableError(f"{path}: line {hline}: no {' or '.join(repr(c) for c in missing)} column "
                         f"(header: {','.join(header)})")
    return [(line, {h: (r[i].strip() if i < len(r) else None) for i, h in enumerate(header)}) for line, r in body]


def read_records(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[tuple[int, dict[str, str | None]]]:
    """A CSV with a header line as (line number, {column: text}) rows; see read_lines and as_records."""
    return as_records(read_lines(path), path, required)
