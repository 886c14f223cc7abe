"""What a model rewards above 8 kHz: each file scored as it is and low-passed to 8 and 4 kHz.

    python benchmarks/eval_bandwidth.py examples/slt_hts_clean_44k.flac /usr/share/sounds/alsa/Front_Center.wav
        [--model NAME|PATH] [--cutoffs 8000 4000]

The low-pass is a band-limited resampling round trip (torchaudio's sinc, as `audio.resample`), so the
file keeps its rate and length and only loses what lies above the cutoff. A model that hears content above 8 kHz scores the
full-band file higher than its 8 kHz version; the bundled model (distilled from 16 kHz DistillMOS) cannot.
The effective bandwidth `utmos score` writes is shown for both.
"""
from __future__ import annotations

import argparse

import torch

from msr_utmos_cli import load_model
from msr_utmos_cli.audio import probe, read_segment, resample
from msr_utmos_cli.bandwidth import effective_bandwidth
from msr_utmos_cli.provenance import describe, of_model


def low_pass(wave: torch.Tensor, sr: int, cutoff: float) -> torch.Tensor:
    """Down to 2 x cutoff and back up, trimmed or padded to the input's length. (T,) -> (T,)"""
    y = resample(resample(wave, sr, int(2 * cutoff)), int(2 * cutoff), sr)
    return torch.nn.functional.pad(y, (0, max(0, wave.shape[-1] - y.shape[-1])))[: wave.shape[-1]]


def measure(model, path: str, cutoffs: list[float]) -> list[dict]:
    """One row per version of the file: full band first, then each cutoff."""
    info = probe(path)
    wave = torch.from_numpy(read_segment(info, 0, info.frames))
    rows = []
    for cutoff in [None, *cutoffs]:
        x = wave if cutoff is None else low_pass(wave, info.sample_rate, cutoff)
        rows.append({"path": path, "sample_rate": info.sample_rate, "cutoff_hz": cutoff,
                     "bandwidth_hz": effective_bandwidth(x.numpy(), info.sample_rate),
                     "mos": float(model.score(x, info.sample_rate)[0])})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--model", default=None, help="model folder or name (default: the bundled model)")
    ap.add_argument("--cutoffs", type=float, nargs="+", default=[8000.0, 4000.0])
    args = ap.parse_args(argv)
    model = load_model(args.model, "cpu")
    print(f"model: {describe(of_model(model))}")
    print(f"{'file':48} {'rate':>6} {'low-pass':>9} {'bandwidth':>9} {'MOS':>6} {'vs full':>8}")
    for path in args.paths:
        rows = measure(model, path, args.cutoffs)
        for r in rows:
            cut = "none" if r["cutoff_hz"] is None else f"{r['cutoff_hz']:.0f}"
            bw = "n/a" if r["bandwidth_hz"] is None else f"{r['bandwidth_hz']:.0f}"
            print(f"{path[-48:]:48} {r['sample_rate']:>6} {cut:>9} {bw:>9} {r['mos']:6.3f} "
                  f"{r['mos'] - rows[0]['mos']:+8.3f}")


if __name__ == "__main__":
    main()
