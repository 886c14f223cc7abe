"""The `utmos` command line: each command parses, calls the library and prints."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MSR-UTMOS: naturalness MOS prediction at any sampling rate.")


# --- score -------------------------------------------------------------------
def _err(console, msg: str, code: int = 2):
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _device(name: str):
    from .checkpoint import default_device

    if name == "auto":
        return default_device()
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
    return name


@app.command()
def score(
    paths: Annotated[list[str], typer.Argument(help="Audio files, directories (walked recursively, sorted), "
                                                    "'-' for paths on stdin, or @list.txt.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output file; '-' writes the data to stdout.")] = "-",
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    model: Annotated[Optional[str], typer.Option(help="Model folder, released model name or hf:owner/repo. "
                                                      "Default: the bundled default model.",
                                                 envvar="UTMOS_MODEL")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")] = "auto",
    window: Annotated[float, typer.Option(min=1.0, help="Longest window in seconds; longer files are cut "
                                                        "into equal windows and all frame scores averaged.")] = 20.0,
    channel: Annotated[Optional[int], typer.Option(min=0, help="Score this channel (0-based) instead of the "
                                                               "mean of all channels.")] = None,
    recursive: Annotated[bool, typer.Option(help="Walk directories recursively.")] = True,
    resume: Annotated[bool, typer.Option(help="Keep the rows already in --out and score only the rest.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any file could not be scored.")] = False,
    fail_under: Annotated[Optional[float], typer.Option(help="Exit 1 if the mean MOS is below this.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    chunk_files: Annotated[int, typer.Option(min=1, hidden=True, help="Files scored per flushed chunk: at "
                                                                       "most this many are redone after a kill.")] = 64,
) -> None:
    """Predict the MOS of audio files at their native sampling rates."""
    import sys

    from rich.console import Console

    from .checkpoint import ModelLoadError, load_model
    from .output import OutputError, ReaderGone, write_scores

    console = Console(stderr=True)
    if fmt not in ("csv", "jsonl"):
        raise _err(console, f"--format must be csv or jsonl, not {fmt!r}")
    try:
        net = load_model(model, _device(device))
    except (ModelLoadError, ValueError, RuntimeError) as e:
        raise _err(console, str(e)) from None
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="file", file=sys.stderr, dynamic_ncols=True)
    try:
        summary = write_scores(net, paths, out, fmt, resume=resume, recursive=recursive,
                               progress=None if bar is None else lambda rows: bar.update(len(rows)),
                               window_s=window, channel=channel, chunk_files=chunk_files)
    except ReaderGone:  # `| head`: no message, the SIGPIPE status; stdout is dropped so exit does not flush into it
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except OutputError as e:
        raise _err(console, str(e)) from None
    except KeyboardInterrupt:
        raise _err(console, f"interrupted; finished rows are in {out} (continue with --resume)", 130) from None
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        skipped = f", {summary['skipped']} already in {out}" if summary["skipped"] else ""
        console.print(f"{summary['files']} files: {summary['scored']} scored, {summary['errors']} errors"
                      f"{skipped}; mean MOS {summary['mean_mos']:.3f}", highlight=False)
        for line in summary["first_errors"]:
            console.print(f"  [yellow]{line}[/]", highlight=False, soft_wrap=True)
    if strict and summary["errors"]:
        raise _err(console, f"--strict: {summary['errors']} file(s) could not be scored", 1)
    if fail_under is not None and not summary["mean_mos"] >= fail_under:
        raise _err(console, f"mean MOS {summary['mean_mos']:.3f} is below --fail-under {fail_under}", 1)


# --- distill and finetune ----------------------------------------------------
def _train(run, user_errors: tuple, verb: str) -> None:
    """Run a training command and print its outcome; the same exit codes for distill and finetune:
    2 bad config/data/model, 1 training failure (NaN), 130 interrupted (checkpoint kept)."""
    import os

    from .config import ConfigError
    from .train import TrainingError

    main = os.environ.get("RANK", "0") == "0"
    try:
        summary = run(lambda line: typer.echo(line, err=True) if main else None)
    except (ConfigError, *user_errors) as e:
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
    from .paper_config import dotted_flags

    return [*(set_ or []), *dotted_flags(ctx.args)]


def _print_config(resolve) -> None:
    """--print-config: the resolved config as YAML on stdout, exit 0 (2 on a bad config)."""
    import yaml

    from .config import ConfigError

    try:
        _, resolved, note = resolve()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if note:
        typer.echo(note, err=True)
    typer.echo(yaml.safe_dump(resolved, sort_keys=False), nl=False)
    raise typer.Exit(0)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Run config YAML (ours or the paper's).")]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", "--print_config",
                                              help="Print the resolved config as YAML and exit.")]


@app.command(context_settings=PAPER_FLAGS, epilog=PAPER_HELP)
def distill(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config key, e.g. --set trainer.lr=3e-4 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from trainer.out_dir/last exactly where it stopped.")] = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Train an SFI student from a 16 kHz teacher (launch under torchrun for several processes)."""
    from .teachers import TeacherError

    def run(log):
        from .distill import run

        return run(config, _sets(ctx, set_), resume=resume, log=log)

    if print_config:
        from .distill import resolve

        _print_config(lambda: resolve(config, _sets(ctx, set_)))
    _train(run, (TeacherError,), "distilled")


@app.command(context_settings=PAPER_FLAGS, epilog=PAPER_HELP)
def finetune(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config key, e.g. --set trainer.lr=3e-5 (repeatable).")] = None,
    init: Annotated[Optional[str], typer.Option(
        help="Start from this model folder (a distill or finetune checkpoint) or preset (tiny/small/base); "
             "overrides model.init.")] = None,
    wav_root: Annotated[Optional[str], typer.Option(
        help="Relative audio paths of lists without their own wav_root resolve here (default: the list's folder); "
             "overrides data.wav_root.")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(
        "--skip-bad-rows", help="Drop bad label rows (each still listed) instead of stopping before training.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from trainer.out_dir/last exactly where it stopped.")] = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Fine-tune (or pretrain) the MOS head and SSL model on labelled lists; best model in OUT_DIR/best."""
    from .checkpoint import ModelLoadError
    from .labels import LabelError

    def run(log):
        from .finetune import run

        return run(config, _sets(ctx, set_), init=init, wav_root=wav_root, skip_bad_rows=skip_bad_rows,
                   resume=resume, log=log)

    if print_config:
        from .finetune import resolve

        _print_config(lambda: resolve(config, _sets(ctx, set_), init, wav_root))
    _train(run, (LabelError, ModelLoadError), "fine-tuned")


# --- export ------------------------------------------------------------------
@app.command()
def export(
    model: Annotated[Optional[str], typer.Argument(help="Model folder, released model name or hf:owner/repo. "
                                                        "Default: the bundled default model.")] = None,
    onnx: Annotated[Path, typer.Option("--onnx", help="Write the ONNX graph here.")] = ...,
    rate: Annotated[int, typer.Option(help="The one sampling rate (Hz) the graph takes.")] = ...,
) -> None:
    """Export a model at one sampling rate as ONNX (SFI taps baked in), checked against PyTorch."""
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
@app.command()
def report(
    scores: Annotated[list[Path], typer.Argument(help="Score files from `utmos score` (.csv or .jsonl).")],
    truth: Annotated[Optional[Path], typer.Option(
        help="Listening-test labels: CSV path,mos[,system,listener,domain]; repeated paths are averaged.")] = None,
    system_regex: Annotated[Optional[str], typer.Option(
        help="Regex searched in each file name; the system is group 1 (or the whole match). "
             "Default: the parent folder name.")] = None,
    system_per_file: Annotated[bool, typer.Option(
        "--system-per-file", help="One score file per system; the system is the score file's stem.")] = False,
    html: Annotated[Optional[Path], typer.Option(help="Write a self-contained HTML report here.")] = None,
    json_out: Annotated[Optional[str], typer.Option(
        "--json", help="Write the report as JSON to this path, or '-' for stdout.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        help="Score file of an earlier run to compare each system against.")] = None,
    fail_under: Annotated[Optional[float], typer.Option(
        help="Exit 1 if any system's mean MOS is below this.")] = None,
    fail_drop: Annotated[Optional[float], typer.Option(
        help="Exit 1 if any system's mean drops by more than this versus --baseline.")] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed for the bootstrap.")] = 0,
) -> None:
    """Summarise score files per system and against listening-test truth."""
    from rich.console import Console

    from .report import ReportError, build_report, print_report, render_html, report_json

    try:
        rep = build_report(scores, truth, system_regex=system_regex, system_per_file=system_per_file,
                           baseline=baseline, fail_under=fail_under, fail_drop=fail_drop,
                           n_boot=n_boot, seed=seed)
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
