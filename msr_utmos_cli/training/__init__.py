"""The training floor: run configs, the one training loop, teachers, labelled lists, distill and finetune.

It builds on the inference floor (`msr_utmos_cli.model`, `checkpoint`, `scoring`, ...); nothing there
imports from here, so scoring never pays for training code.
"""
