"""A score row, the columns of a score file and the default window: torch-free, so the CLI's help and
`utmos report` use them without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_WINDOW_S = 20.0  # longest stretch of audio the model hears at once; longer files are cut into windows


@dataclass
class Row:
    """One scored input: a MOS, or the one-line reason it has none."""
    path: str
    sample_rate: int | None = None
    duration_s: float | None = None
    mos: float | None = None
    error: str = ""
    bandwidth_hz: int | None = None  # highest frequency the file carries (bandwidth.py): the model is blind above ~8 kHz
    utt_id: str = ""  # the utterance id of a wav.scp line


COLUMNS = [f.name for f in fields(Row)]  # a score file's columns, in this order
