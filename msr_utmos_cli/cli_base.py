"""What every `utmos` command shares: the app, help without type tags, errors, --version, SIGTERM."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup


class _Flags:
    """Help without Python type tags (`<bool>`, `<list[str]>`): a flag's name says all there is,
    and every other parameter has a metavar that says what to give."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
            elif p.param_type_name == "argument" and p.metavar:
                p.display_type_rich = lambda ctx: None  # arguments show their type even with a metavar
        return params


class _Command(_Flags, TyperCommand):
    pass


class _Group(_Flags, TyperGroup):
    pass


app = typer.Typer(cls=_Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="MSR-UTMOS: naturalness MOS prediction at any sampling rate.\n\n"
                       "Exit codes: 0 ok, 1 a gate failed, 2 usage or input error, 130 interrupted.")


def _version(value: bool) -> None:
    if not value:
        return
    from . import __version__

    typer.echo(f"msr-utmos {__version__}")
    from .checkpoint import ModelLoadError, default_model_identity

    try:
        ident = default_model_identity()
        typer.echo(f"default model: {ident['model']} {ident['model_version'] or '(no version)'}, "
                   f"weights sha256 {ident['model_sha256']}")
    except (ModelLoadError, OSError) as e:
        typer.echo(f"default model: none ({e})")
    raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_version,
        help="Print the msr-utmos version and the default model's name, version and weights sha256.")] = False,
) -> None:
    pass


def _err(console, msg: str, code: int = 2):
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)



@contextmanager
def _sigterm_as_interrupt():
    """A CI job cancelled with SIGTERM ends as Ctrl-C does: rows kept, exit 130."""
    import signal
    import threading

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    before = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
