"""How much of the teacher's ranking a model's frozen features hold at each rate, read by simple heads.

    python scripts/label_with_teacher.py --manifest corpus/manifest.csv --splits test \
        --out corpus/teacher_distillmos_test.csv   # a labels CSV's paths are relative to its folder
    python benchmarks/probe_frozen_features.py --model models/<name> \
        --train-manifest corpus8/manifest.csv --train-labels corpus8/teacher_distillmos.csv \
        --test-manifest corpus/manifest.csv --test-labels corpus/teacher_distillmos_test.csv [--rates 8000 16000] \
        [--max-train N] [--seeds 0 1] [--per-layer] [--out probe.json]

Each clip, presented at every rate in --rates (band-limited resampling, as eval_default_model.py does),
goes through the frozen backbone; the head's input (the head layer's frames) is pooled into its mean and
standard deviation over frames. A ridge regression and small MLPs are fitted on the training clips at all
those rates to the teacher's MOS (the labels CSVs of scripts/label_with_teacher.py), and the test split's
SRCC with the teacher is printed per rate beside the model's own head. A probe well above the head says
the backbone holds ranking that the head does not read; one at the head's level says the backbone is the
limit. Whole clips are used (the corpus's clips are seconds long). --per-layer adds ridge readers of the CNN
output and of each encoder layer (mean and std of its frames), alone and all together, each at the penalty
that 5-fold cross-validation over the training clips picks: is the ranking in a layer the head does not read?
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_default_model as ev  # noqa: E402

from msr_utmos_cli import load_model  # noqa: E402
from msr_utmos_cli.audio import resample  # noqa: E402
from msr_utmos_cli.checkpoint import ModelLoadError  # noqa: E402
from msr_utmos_cli.training.config import ConfigError  # noqa: E402
from msr_utmos_cli.training.teacher_cache import read_teacher_labels  # noqa: E402


def labelled(manifest: Path, labels: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """Paths of the split's clips that the labels CSV scores, and their teacher MOS."""
    mos = read_teacher_labels(labels)  # keyed by resolved path, as `utmos distill` reads it
    keyed = [(p, str(p.resolve())) for p in (manifest.parent / r["path"] for r in ev.read_rows(manifest, split))]
    keyed = [(p, k) for p, k in keyed if k in mos]
    return [p for p, _ in keyed], np.asarray([mos[k] for _, k in keyed])


@torch.no_grad()
def pooled_layers(model, paths: list[Path], rates, depth: int | None = None) -> dict[int, list[np.ndarray]]:
    """{rate: [(N, 2C) CNN output, (N, 2D) encoder layer 1, ... layer depth]}: each one's frame mean and std."""
    out = {r: [] for r in rates}
    for p in paths:
        wave, sr = ev.load(p)
        for r in rates:
            w = resample(wave, sr, r)[None].float()
            x, n = model.conv_features(w, torch.tensor([w.shape[-1]]), r)  # (1, T) -> (1, F, C)
            k = int(n[0])
            reps = [x] + model.encoder.extract_features(x, n, depth)
            out[r].append([_mean_std(f[0, :k]) for f in reps])
    return {r: [np.stack(col) for col in zip(*v)] for r, v in out.items()}


def pooled(model, paths: list[Path], rates) -> dict[int, np.ndarray]:
    """{rate: (N, 2D)}: mean and standard deviation over frames of the head layer's output."""
    depth = model.readout_depth  # [CNN output, layer 1, ...]: the head's layer is at index depth
    return {r: v[depth] for r, v in pooled_layers(model, paths, rates, depth).items()}


def _mean_std(frames: torch.Tensor) -> np.ndarray:
    """(F, D) -> (2D,)"""
    f = frames.double()
    return torch.cat([f.mean(0), f.std(0, unbiased=False)]).numpy()


def ridge(x: np.ndarray, y: np.ndarray, lam: float):
    """Closed-form ridge on standardised inputs (intercept not penalised) -> predict(x)."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(z.T @ z + lam * np.diag(np.r_[np.ones(x.shape[1]), 0.0]), z.T @ y)
    return lambda q: np.c_[(q - mu) / sd, np.ones(len(q))] @ w


def ridge_cv(x: np.ndarray, y: np.ndarray, clips: np.ndarray, lams=(1.0, 10.0, 100.0, 1e3, 1e4), folds: int = 5):
    """Ridge with the penalty of least error in k-fold cross-validation over clips (all rates of a clip
    in one fold), so readers of wider features are not judged at a penalty chosen for narrower ones."""
    fold = np.random.default_rng(0).permutation(clips.max() + 1)[clips] % folds
    err = [sum(((ridge(x[fold != k], y[fold != k], lam)(x[fold == k]) - y[fold == k]) ** 2).sum()
               for k in range(folds)) for lam in lams]
    lam = lams[int(np.argmin(err))]
    return ridge(x, y, lam), lam


def mlp(x: np.ndarray, y: np.ndarray, seed: int, hidden: int = 256, steps: int = 9000):
    """Two-layer MLP with dropout, AdamW, minibatches of 128 -> predict(x)."""
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-8
    t = lambda q: torch.tensor((q - mu) / sd, dtype=torch.float32)  # noqa: E731
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Dropout(0.3), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-3)
    xt, yt = t(x), torch.tensor(y, dtype=torch.float32)
    for _ in range(steps):
        b = torch.randint(0, len(xt), (min(128, len(xt)),))
        loss = ((net(xt[b]).squeeze(-1) - yt[b]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return lambda q: net(t(q)).squeeze(-1).detach().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train-manifest", type=Path, required=True)
    ap.add_argument("--train-labels", type=Path, required=True)
    ap.add_argument("--test-manifest", type=Path, required=True)
    ap.add_argument("--test-labels", type=Path, required=True)
    ap.add_argument("--rates", type=int, nargs="+", default=[8000, 16000])
    ap.add_argument("--max-train", type=int, default=0, help="a seeded random subset of the training clips (0: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one MLP per seed")
    ap.add_argument("--mlp-steps", type=int, default=9000)
    ap.add_argument("--per-layer", action="store_true",
                    help="also a ridge reader on the CNN output and on each encoder layer alone, and on all of them")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    try:
        model = load_model(args.model, "cpu")
        train, y = labelled(args.train_manifest, args.train_labels, "train")
        test, t = labelled(args.test_manifest, args.test_labels, "test")
    except (ConfigError, ModelLoadError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.max_train:
        idx = sorted(random.Random(0).sample(range(len(train)), min(args.max_train, len(train))))
        train, y = [train[i] for i in idx], y[idx]
    if len(train) < 3 or len(test) < 3:
        sys.exit(f"error: {len(train)} labelled training and {len(test)} labelled test clips; need 3 of each")
    if args.per_layer:
        ltr, lte = pooled_layers(model, train, args.rates), pooled_layers(model, test, args.rates)
        head = model.readout_depth
        xtr, xte = ({r: v[head] for r, v in d.items()} for d in (ltr, lte))
    else:
        xtr, xte = pooled(model, train, args.rates), pooled(model, test, args.rates)
    x, yy = np.concatenate([xtr[r] for r in args.rates]), np.tile(y, len(args.rates))
    own = ev.student_at_rates(model, test, args.rates)
    readers = {"the model's own head": {r: np.asarray(own[str(r)]) for r in args.rates}}
    f = ridge(x, yy, 10.0)
    readers["ridge on frame mean + std"] = {r: f(xte[r]) for r in args.rates}
    for s in args.seeds:
        f = mlp(x, yy, s, steps=args.mlp_steps)
        readers[f"MLP on frame mean + std, seed {s}"] = {r: f(xte[r]) for r in args.rates}
    if args.per_layer:
        clips = np.tile(np.arange(len(train)), len(args.rates))
        names = ["CNN output"] + [f"encoder layer {j}" for j in range(1, len(ltr[args.rates[0]]))]
        for j, name in [*enumerate(names), (None, "all of them")]:
            cols = range(len(names)) if j is None else [j]
            f, lam = ridge_cv(np.concatenate([np.concatenate([ltr[r][c] for c in cols], 1) for r in args.rates]),
                              yy, clips)
            readers[f"ridge on {name} (penalty {lam:g})"] = {
                r: f(np.concatenate([lte[r][c] for c in cols], 1)) for r in args.rates}
    res = {"model": args.model, "train_clips": len(train), "test_clips": len(test), "rates": args.rates,
           "srcc": {k: {str(r): float(spearmanr(p, t)[0]) for r, p in v.items()} for k, v in readers.items()}}
    print(f"\n## SRCC with the teacher, test split ({len(test)} clips); readers fitted on {len(train)} training "
          f"clips at {', '.join(map(str, args.rates))} Hz\n")
    print("| reader | " + " | ".join(f"{r} Hz" for r in args.rates) + " |")
    print("|---|" + "---|" * len(args.rates))
    for k, v in res["srcc"].items():
        print(f"| {k} | " + " | ".join(f"{v[str(r)]:.3f}" for r in args.rates) + " |")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
