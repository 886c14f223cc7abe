"""Build the SFI spectrogram model from DistillMOS's released weights (no training): model 2.1.0.

    pip install distillmos && python scripts/convert_distillmos.py runs/spec-2.1.0

The default model since 2.2.0 is this one with its transformer fine-tuned (its model card has the
commands); this conversion is the first step and the teacher of that fine-tuning.

DistillMOS's network is kept as released (MIT); only its 16 kHz STFT is replaced by the SFI STFT
of msr_utmos_cli/spec_stft.py, so no weight changes. The folder's weights are checked to give
DistillMOS's own score at 16 kHz (on full-band noise, where the empty-band rule has nothing to do)
before it is written. The front end is model 2.1.0's: the empty top band filled 90 dB down, and a
bin live only when more than 2 % of the frames reach the floor.
"""
from __future__ import annotations

import argparse
from importlib.metadata import distribution, version
from pathlib import Path

import torch

from msr_utmos_cli.checkpoint import save_model
from msr_utmos_cli.spec_model import SpecModelConfig, SpecMOSModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model-version", default="2.1.0")
    args = ap.parse_args()
    import distillmos  # the teacher package: only this script needs it

    teacher = distillmos.ConvTransformerSQAModel().eval()
    state = {k: v for k, v in teacher.state_dict().items() if "position_encoding" not in k}  # rebuilt from cfg
    model = SpecMOSModel(SpecModelConfig(empty_band_db=-90.0, band_share=0.02)).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3 * 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        diff = abs(float(teacher(x)[0, 0]) - float(model.crop_scores(model.crops(x[0], 16000), 16000).mean()))
    if diff > 1e-4:
        raise SystemExit(f"converted model differs from DistillMOS by {diff:.2g} at 16 kHz")
    save_model(model, args.out, {"model_version": args.model_version, "task": "convert",
                                 "source": f"distillmos {version('distillmos')} (distill_mos_v7.pt, MIT)",
                                 "check_16k_abs_diff": diff})
    (args.out / "LICENSE-DistillMOS").write_text(distribution("distillmos").read_text("LICENSE"))  # MIT: keep the notice
    print(f"wrote {args.out} (|diff| to DistillMOS at 16 kHz: {diff:.2g})")


if __name__ == "__main__":
    main()
