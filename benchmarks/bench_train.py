"""Training throughput (audio seconds per second) of `utmos distill` on this machine's CPU.

    python benchmarks/bench_train.py [--steps 3] [--presets tiny base]

Random wav2vec2 teacher of the student's shape, synthetic 4 s clips, crop 2 s, batch 2, fp32.
The first step (tap design, warm-up) is excluded from the timing.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torchaudio.models import wav2vec2_model

from msr_utmos_cli.training import distill
from msr_utmos_cli.training.config import load_config
from msr_utmos_cli.model import PRESETS
from msr_utmos_cli.training.teachers import Wav2Vec2Teacher, default_params


def teacher_like(preset: str) -> Wav2Vec2Teacher:
    c = PRESETS[preset]()
    p = default_params(extractor_conv_layer_config=[(c.sfi_channels, 10, 5)] + [tuple(x) for x in c.conv_layers],
                       encoder_embed_dim=c.embed_dim, encoder_pos_conv_kernel=c.pos_conv_kernel,
                       encoder_pos_conv_groups=c.pos_conv_groups, encoder_num_layers=c.num_layers,
                       encoder_num_heads=c.num_heads, encoder_ff_interm_features=c.ff_dim)
    return Wav2Vec2Teacher(wav2vec2_model(**p), p, f"random-{preset}")


def bench(preset: str, steps: int, root: Path, rate: int) -> dict:
    built, _ = load_config(None, [f"model.student={preset}", f"data.dirs=[{root / 'wav'}]", "data.crop_s=2.0",
                                  f"data.rates=[{rate}]", f"trainer.out_dir={root / preset}", "trainer.batch_size=2",
                                  "model.sfi_fit_steps=0"], distill.SECTIONS)
    task = distill.DistillTask(built["model"], built["data"], built["trainer"], teacher_like(preset))
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-4)
    stream = task.batches(0, 1, 0, 0)
    times, audio_s = [], 0.0
    for i in range(steps + 1):
        batch = next(stream)
        t0 = time.perf_counter()
        loss, _ = task.loss(batch, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
            audio_s += task.audio_seconds(batch)
    params = sum(p.numel() for p in task.model.student.parameters()) / 1e6
    return {"preset": preset, "rate": rate, "params_M": params, "s_per_step": sum(times) / len(times),
            "audio_s_per_s": audio_s / sum(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--rates", nargs="+", type=int, default=[16000, 44100])
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "wav").mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            sf.write(root / "wav" / f"{i}.wav", (0.1 * rng.standard_normal(4 * 48000)).astype(np.float32), 48000)
        rows = [bench(p, args.steps, root, r) for p in args.presets for r in args.rates]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    print("| student | rate (Hz) | params (M) | s/step (batch 2 x 2 s) | audio s / s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['rate']} | {r['params_M']:.2f} | {r['s_per_step']:.2f} | {r['audio_s_per_s']:.2f} |")


if __name__ == "__main__":
    main()
