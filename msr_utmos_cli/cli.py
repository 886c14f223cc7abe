"""The `utmos` command line: each command parses, calls the library and prints."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MSR-UTMOS: naturalness MOS prediction at any sampling rate.")


# --- score -------------------------------------------------------------------
@app.command()
def score() -> None:
    """Predict the MOS of audio files at their native sampling rates."""
    raise typer.Exit(2)


# --- distill -----------------------------------------------------------------
@app.command()
def distill() -> None:
    """Train an SFI student from a 16 kHz teacher."""
    raise typer.Exit(2)


# --- finetune ----------------------------------------------------------------
@app.command()
def finetune() -> None:
    """Train the MOS head and SSL model on labelled CSVs."""
    raise typer.Exit(2)


# --- report ------------------------------------------------------------------
@app.command()
def report() -> None:
    """Summarise score files per system and against listening-test truth."""
    raise typer.Exit(2)


def main() -> None:
    app()
