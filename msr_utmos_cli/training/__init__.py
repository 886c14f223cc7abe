"""The training floor: run configs, the one training loop, teachers, labelled lists, distill and finetune.

It builds on the inference floor (`msr_utmos_cli.model`, `checkpoint`, `scoring`, ...); nothing there
imports from here, so scoring never pays for training code. Its two errors live here, so every
module of the loop can raise them.
"""


class TrainingError(Exception):
    """Training cannot go on; the message is one line saying why and what is kept."""


class OutDirError(Exception):
    """trainer.out_dir holds a run that this one would replace; nothing was touched."""
