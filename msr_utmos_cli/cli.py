"""The `utmos` command line: each command parses, calls the library and prints."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_base import _Command, _err, _sigterm_as_interrupt, app
from .rows import DEFAULT_WINDOW_S


# --- score -------------------------------------------------------------------
def _missing(paths: list[str]) -> list[str]:
    """Command-line paths (and @list or scp: files) that do not exist; the paths inside a list get rows."""
    import os

    return [p for p in paths if p != "-" and not os.path.lexists(p)
            and not (p.startswith("@") and os.path.lexists(p[1:]))
            and not (p.startswith("scp:") and os.path.lexists(p[4:]))]


def _progress(console):
    """A bar over files with a known total (when the inputs can be counted), elapsed time and ETA;
    redrawn four times a second, and advanced by every scored window, not every chunk."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                   refresh_per_second=4)
    task = bar.add_task("score", total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def _print_summary(console, summary: dict, out: str) -> None:
    from .provenance import describe

    where = f" in {out} ({summary['earlier']} earlier, {summary['new']} new)" if summary["earlier"] else ""
    console.print(f"{summary['files']} files{where}: {summary['scored']} scored, {summary['errors']} errors; "
                  f"mean MOS {summary['mean_mos']:.3f}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"model: {describe(summary['provenance'])}", highlight=False, markup=False)
    for line in summary["first_errors"]:
        console.print(f"  {line}", style="yellow", highlight=False, soft_wrap=True, markup=False)


def _engine(batch_size: str, precision: str) -> dict:
    """--batch-size and --precision checked before the model loads (ValueError: a one-line error)."""
    from .batching import check_precision, parse_batch_size

    return {"batch_size": parse_batch_size(batch_size), "precision": check_precision(precision)}


@app.command(cls=_Command)
def score(
    paths: Annotated[list[str], typer.Argument(
        metavar="PATH", help="Audio files, folders (walked recursively, sorted), '-' (paths on stdin), @list.txt, "
                                "or a Kaldi wav.scp (*.scp or scp:FILE; ids in the utt_id column). m4a, aac, wma... "
                                "are decoded by ffmpeg when it is installed.")],
    out: Annotated[str, typer.Option("--out", "-o", metavar="FILE", help=(
        "Output file; '-' writes the data to stdout. An existing file with rows is refused "
        "unless --resume or --overwrite."))] = "-",
    fmt: Annotated[str, typer.Option("--format", metavar="csv|jsonl", help=(
        "csv (provenance in FILE.meta.json) or jsonl (provenance in every row)."))] = "csv",
    model: Annotated[Optional[str], typer.Option(metavar="MODEL", help=(
        "Model folder, released model name or hf:owner/repo. Default: the bundled default model."),
        envvar="UTMOS_MODEL")] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto (CUDA when available), cpu, cuda, cuda:N "
                                                               "or mps.")] = "auto",
    window: Annotated[float, typer.Option(min=1.0, metavar="SECONDS", help=(
        "Longest window; longer files are cut into equal windows and all frame scores averaged."))] = DEFAULT_WINDOW_S,
    channel: Annotated[Optional[int], typer.Option(min=0, metavar="N", help=(
        "Score this channel (0-based) instead of the mean of all channels."))] = None,
    recursive: Annotated[bool, typer.Option(help="Walk directories recursively.")] = True,
    resume: Annotated[bool, typer.Option(help=(
        "Keep the rows already in --out and score only the rest; the summary and gates then judge every "
        "row of the file. Refused if the file's format, columns or model differ."))] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any row of the output is an error.")] = False,
    fail_under: Annotated[Optional[float], typer.Option(metavar="MOS", help=(
        "Exit 1 if the mean MOS of the output is below this."))] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    batch_size: Annotated[str, typer.Option(metavar="N|auto", help=(
        "Windows scored together. A file's score never depends on the other files; batch sizes agree to "
        "1e-5. auto: 1 on a CPU, 32 on a GPU of 40 GiB or more, else 8."))] = "auto",
    precision: Annotated[str, typer.Option(metavar="fp32|bf16|fp16", help=(
        "Arithmetic of the model; bf16 and fp16 are faster on a GPU and move scores slightly."))] = "fp32",
    workers: Annotated[Optional[int], typer.Option(min=0, metavar="N", help=(
        "Threads reading and decoding files ahead of the model. Default: 0 on a CPU, up to 16 with CUDA."))] = None,
    chunk_files: Annotated[Optional[int], typer.Option(min=1, hidden=True, help=(
        "Files scored per flushed chunk: at most this many are redone after a kill. Default: 64, or 256 "
        "per batch row."))] = None,
) -> None:
    """Predict the MOS of audio files at their native sampling rates.

    The bundled model scores speech quality as 16 kHz DistillMOS judges it (noise, codecs, band limits
    below 8 kHz); content above ~8 kHz is not rewarded (examples/slt_hts_clean_44k.flac: 3.675 full band,
    3.693 low-passed to 8 kHz). Column bandwidth_hz estimates how high each file's content goes.

    Exit 1 when no file could be scored or a gate (--strict, --fail-under) fails; 2 on a usage or
    input error (a missing path, no audio found, an output that would be replaced); 130 when
    interrupted (finished rows are kept: continue with --resume).

    Example: score a TTS output folder, fail the job if any file fails or the mean is below 3.5:

    ```
    utmos score tts_out/ -o scores.csv --strict --fail-under 3.5
    ```
    """
    import sys

    from rich.console import Console

    from .checkpoint import ModelLoadError, load_model
    from .output import OutputError, ReaderGone, check_out, gate_failures, nothing_found, write_scores

    console = Console(stderr=True)
    if missing := _missing(paths):
        raise _err(console, f"{missing[0]}: no such file or directory"
                            + (f" (and {len(missing) - 1} more missing path(s))" if len(missing) > 1 else ""))
    try:
        check_out(out, fmt, resume, overwrite)
        engine = _engine(batch_size, precision)
        net = load_model(model, device)
    except (OutputError, ModelLoadError, ValueError, RuntimeError) as e:
        raise _err(console, str(e)) from None
    bar = update = None
    if not quiet and sys.stderr.isatty():
        bar, update = _progress(console)
        bar.start()

    try:
        with _sigterm_as_interrupt():
            summary = write_scores(net, paths, out, fmt, resume=resume, overwrite=overwrite, recursive=recursive,
                                   progress=update, window_s=window, channel=channel, chunk_files=chunk_files,
                                   workers=workers, **engine)
    except ReaderGone:  # `| head`: no message, the SIGPIPE status; stdout is dropped so exit does not flush into it
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except OutputError as e:
        raise _err(console, str(e)) from None
    except KeyboardInterrupt:
        raise _err(console, f"interrupted; finished rows are in {out} (continue with --resume)", 130) from None
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if "out of memory" not in str(e):
            raise
        raise _err(console, f"out of memory on {net.device} at --batch-size {batch_size}; finished rows are in "
                            f"{out} (continue with --resume and a smaller --batch-size)") from None
    finally:
        if bar is not None:
            bar.stop()
    if not summary["files"]:
        raise _err(console, nothing_found(paths, summary["not_audio"]))
    if not quiet:
        _print_summary(console, summary, out)
    if failures := gate_failures(summary, strict, fail_under):
        raise _err(console, "; ".join(failures), 1)


from . import cli_train  # noqa: E402,F401  (registers distill and finetune after score)


# --- export ------------------------------------------------------------------
@app.command(cls=_Command)
def export(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", help=(
        "Model folder, released model name or hf:owner/repo. Default: the bundled default model."))] = None,
    onnx: Annotated[Path, typer.Option("--onnx", metavar="FILE", help="Write the ONNX graph here.")] = ...,
    rate: Annotated[int, typer.Option(metavar="HZ", help="The one sampling rate (Hz) the graph takes.")] = ...,
) -> None:
    """Export a model at one sampling rate as ONNX (SFI taps baked in), checked against PyTorch.

    Example: the bundled model for 16 kHz input:

    ```
    utmos export --onnx utmos16k.onnx --rate 16000
    ```
    """
    from .checkpoint import ModelLoadError, load_model
    from .export import ExportError, export_onnx

    try:
        info = export_onnx(load_model(model, "cpu"), rate, onnx)
    except (ModelLoadError, ExportError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {info['path']}: input wave (batch, samples >= {info['min_samples']}) float32 at {rate} Hz; "
               f"outputs mos (batch,) and frame_scores (batch, frames); max |ONNX - PyTorch| "
               f"{info['max_abs_diff']:.1e}", err=True)


# --- report ------------------------------------------------------------------
@app.command(cls=_Command)
def report(
    scores: Annotated[list[Path], typer.Argument(metavar="SCORES", help=(
        "Score files from `utmos score` (.csv or .jsonl)."))],
    truth: Annotated[Optional[Path], typer.Option(metavar="CSV", help=(
        "Listening-test labels: CSV path,mos[,system,listener,domain]; repeated paths are averaged."))] = None,
    system_regex: Annotated[Optional[str], typer.Option(metavar="REGEX", help=(
        "Regex searched in each file name: system = group (?P<system>), group 1 or the match; utterance id = "
        "(?P<utt>) or the name without the match. Default: the parent folder."))] = None,
    system_per_file: Annotated[bool, typer.Option(
        "--system-per-file", help="One score file per system; the system is the score file's stem.")] = False,
    system_depth: Annotated[Optional[int], typer.Option(metavar="N", help=(
        "The system is the top N folders below the folder all scored files share (sysA/sub/x.wav: sysA)."))] = None,
    html: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Write an HTML report here.")] = None,
    json_out: Annotated[Optional[str], typer.Option(
        "--json", metavar="FILE", help="Write the report as JSON to this path, or '-' for stdout.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(metavar="SCORES", help=(
        "Score file of an earlier run to compare each system against."))] = None,
    fail_under: Annotated[Optional[float], typer.Option(metavar="MOS", help=(
        "Exit 1 if any system's mean MOS is below this."))] = None,
    fail_drop: Annotated[Optional[float], typer.Option(metavar="MOS", help=(
        "Exit 1 if any system's mean drops by more than this versus --baseline."))] = None,
    n_boot: Annotated[int, typer.Option(metavar="N", help="Bootstrap resamples for the 95% intervals.")] = 2000,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for the bootstrap.")] = 0,
    worst: Annotated[int, typer.Option(min=0, metavar="N", help=(
        "List the N lowest-scored files, and the N furthest from the truth (HTML: with audio players)."))] = 10,
) -> None:
    """Summarise score files per system and against listening-test truth.

    Truth: --truth or a `true_mos` column. --baseline pairs files by path, else utterance id. Warns on
    repeated paths and on scores (or a baseline) from different models.

    Example: fail CI if any system lost more than 0.1 MOS against last release's scores:

    ```
    utmos report scores.csv --baseline baseline.csv --fail-drop 0.1 --html report.html
    ```
    """
    from rich.console import Console

    from .report import ReportError, build_report, check_writable, report_json
    from .report_render import print_report, render_html

    try:
        for path in (html, None if json_out == "-" else json_out):
            if path is not None:
                check_writable(path)
        rep = build_report(scores, truth, system_regex=system_regex, system_per_file=system_per_file,
                           system_depth=system_depth, baseline=baseline, fail_under=fail_under,
                           fail_drop=fail_drop, n_boot=n_boot, seed=seed, worst=worst)
        for w in rep["warnings"]:
            typer.echo(f"warning: {w}", err=True)
        # With --json -, stdout is for the JSON alone; the tables go to stderr.
        print_report(rep, Console(stderr=json_out == "-"))
        if html is not None:
            render_html(rep, html)
        if json_out == "-":
            typer.echo(report_json(rep))
        elif json_out is not None:
            Path(json_out).write_text(report_json(rep) + "\n")
    except (ReportError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if not rep["gate"]["passed"]:
        typer.echo("FAIL: " + "; ".join(rep["gate"]["failures"]), err=True)
        raise typer.Exit(1)


def main() -> None:
    app()
