"""`utmos distill` and `utmos finetune`: parse, run the training floor, print the outcome."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_base import _Command, app


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
