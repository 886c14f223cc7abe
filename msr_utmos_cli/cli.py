"""The `utmos` command line: each command parses, calls the library and prints."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .rows import DEFAULT_WINDOW_S


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


# --- score -------------------------------------------------------------------
def _err(console, msg: str, code: int = 2):
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


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


# --- distill and finetune ----------------------------------------------------
def _train(run, user_errors: tuple, verb: str) -> None:
    """Run a training command and print its outcome; the same exit codes for distill and finetune:
    2 bad config/data/model or an out_dir holding a run, 1 training failure (NaN), 130 interrupted
    (checkpoint kept)."""
    import os

    from .training.config import ConfigError
    from .training import OutDirError, TrainingError

    main = os.environ.get("RANK", "0") == "0"
    try:
        summary = run(lambda line: typer.echo(line, err=True) if main else None)
    except (ConfigError, OutDirError, *user_errors) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except TrainingError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if not main:
        return
    out = Path(summary["out_dir"])
    if summary["interrupted"]:
        typer.echo(f"interrupted at step {summary['step']}; checkpoint in {out / 'last'} (continue with --resume)",
                   err=True)
        raise typer.Exit(130)
    best = f"; best {summary['select_metric']} {summary['best']:.4f} in {out / 'best'}" \
        if summary.get("best") is not None else ""
    preds = f"; validation predictions in {summary['predictions']}" if summary.get("predictions") else ""
    stopped = " (early stop)" if summary.get("early_stopped") else ""
    typer.echo(f"{verb} {summary['step']} steps{stopped}; model in {out / 'last'}{best}{preds}", err=True)


PAPER_FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}
PAPER_HELP = ("The paper's LightningCLI configs and --section.key=value flags are read too "
              "(docs/paper_compat.md).")


def _sets(ctx: typer.Context, set_: list[str] | None) -> list[str]:
    """--set values, then the paper's dotted flags (`--trainer.max_epochs=5`) as more of them."""
    from .training.paper_config import dotted_flags

    return [*(set_ or []), *dotted_flags(ctx.args)]


def _print_config(resolve) -> None:
    """--print-config: the resolved config as YAML on stdout, exit 0 (2 on a bad config)."""
    import yaml

    from .training.config import ConfigError

    try:
        _, resolved, note = resolve()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if note:
        typer.echo(note, err=True)
    typer.echo(yaml.safe_dump(resolved, sort_keys=False), nl=False)
    raise typer.Exit(0)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", metavar="YAML",
                                                   help="Run config YAML (ours or the paper's).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set trainer.lr=3e-4 (repeatable).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in trainer.out_dir exactly where it stopped.")]
OverwriteOpt = Annotated[bool, typer.Option(
    help="Delete the run already in trainer.out_dir (checkpoints, metrics.jsonl) and start afresh; without it "
         "(or --resume) such a folder is refused.")]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", "--print_config",
                                              help="Print the resolved config as YAML and exit.")]


@app.command(cls=_Command, context_settings=PAPER_FLAGS, epilog=PAPER_HELP)
def distill(ctx: typer.Context, config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False,
            overwrite: OverwriteOpt = False, print_config: PrintConfigOpt = False) -> None:
    """Train an SFI student from a 16 kHz teacher (launch under torchrun for several processes).

    Example: distill the wav2vec2-base teacher, then continue after an interruption:

    ```
    utmos distill -c configs/distill_wav2vec2_base.yaml
    utmos distill -c configs/distill_wav2vec2_base.yaml --resume
    ```
    """
    from .training.teachers import TeacherError

    def run(log):
        from .training.distill import run

        return run(config, _sets(ctx, set_), resume=resume, log=log, overwrite=overwrite)

    if print_config:
        from .training.distill import resolve

        _print_config(lambda: resolve(config, _sets(ctx, set_)))
    _train(run, (TeacherError,), "distilled")


@app.command(cls=_Command, context_settings=PAPER_FLAGS, epilog=PAPER_HELP)
def finetune(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    init: Annotated[Optional[str], typer.Option(metavar="MODEL", help=(
        "Start from this model folder (a distill or finetune checkpoint) or preset (tiny/small/base); "
        "overrides model.init."))] = None,
    wav_root: Annotated[Optional[str], typer.Option(metavar="DIR", help=(
        "Relative audio paths of lists without their own wav_root resolve here (default: the list's folder); "
        "overrides data.wav_root."))] = None,
    skip_bad_rows: Annotated[bool, typer.Option(
        "--skip-bad-rows", help="Drop bad label rows (each still listed) instead of stopping before training.")] = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Fine-tune (or pretrain) the MOS head and SSL model on labelled lists; best model in OUT_DIR/best.

    Example: fine-tune the bundled model on your labels:

    ```
    utmos finetune -c configs/finetune_example.yaml --init models/msr-utmos-small-distillmos
    ```
    """
    from .checkpoint import ModelLoadError
    from .training.labels import LabelError

    def run(log):
        from .training.finetune import run

        return run(config, _sets(ctx, set_), init=init, wav_root=wav_root, skip_bad_rows=skip_bad_rows,
                   resume=resume, log=log, overwrite=overwrite)

    if print_config:
        from .training.finetune import resolve

        _print_config(lambda: resolve(config, _sets(ctx, set_), init, wav_root))
    _train(run, (LabelError, ModelLoadError), "fine-tuned")


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
