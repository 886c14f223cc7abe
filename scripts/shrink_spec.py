"""Shrink the SFI spectrogram model: a narrower CNN, taught by the full model's CNN, or a shallower head;
or retarget its head to a shifted score.

    python scripts/shrink_spec.py --teacher models/msr-utmos-spec-distillmos --corpus corpus_ml \\
        --out runs/spec-fast --steps 1000 [--resume]
    python scripts/shrink_spec.py --teacher runs/spec-fast/model --head-layers 4 --out runs/spec-fast-head ...

The CNN costs ~80 % of the full model's time. Its filters are pruned (each layer keeps the half with
the largest L1 norm: 64/64/128/256/256 -> 32/32/64/128/128 channels, the last layer whole), then the
narrow CNN is trained to give the full CNN's features (after the head's input norm) on 2 s segments
of the corpus' training split at their own rates, padding included. The transformer head is the
teacher's, frozen, so the student inherits its reading of the features. The CNN sees only 6 STFT
frames either side of an output, so 2 s segments teach it all a 7.68 s crop would. Runs in the shared
training loop: checkpoints in --out, `--resume` continues an interrupted run exactly (and, on a
finished run, only writes the model again); the best checkpoint becomes the model folder OUT/model.

With --head-layers the CNN is kept (frozen, shared by teacher and student) and the transformer keeps
that many of the teacher's layers, evenly spaced; they are trained on whole 7.68 s crops to give the
teacher's last hidden states (after its norm) and its crop score.

With --score-shift CSV (`path,shift`, e.g. from scripts/blend_teachers.py) the crop-score target is the
teacher's crop score plus its clip's shift, and validation ranks against the shifted teacher; without
--head-layers all the teacher's layers are kept and trained (the CNN stays frozen). --hidden-weight
scales the hidden-state term, which otherwise holds the head at the teacher's reading. With --targets CSV
(`path,mos`, e.g. `scripts/blend_teachers.py --targets-out`) the crop-score target is the clip's MOS
itself, not the teacher's crop score: a student that agrees less with DistillMOS than its teacher did
is pulled towards DistillMOS's own labels.

With --low-rate-share P (head mode) that share of the batches whose clips are above 8 kHz is presented
at 8 kHz instead: resampled, scored by the student, and fitted to the full-band targets with each
batch's mean removed from both sides, so the head learns to rank band-limited audio as the full-band
judge ranks it without being told that losing the band above 4 kHz costs nothing. The hidden-state
term there stays the teacher's own reading of the 8 kHz presentation. Validation then also scores the
validation clips at 8 kHz, and the step is chosen by the mean of the two SRCCs.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from msr_utmos_cli.audio import AudioError, resample
from msr_utmos_cli.checkpoint import load_model, save_model
from msr_utmos_cli.spec_model import SpecMOSModel, cnn_widths
from msr_utmos_cli.spec_stft import sfi_stft
from msr_utmos_cli.training.checkpoints import find_checkpoint
from msr_utmos_cli.training.train import TrainConfig, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blend_teachers import order_share, severity_pairs  # noqa: E402

SEG_S, PAD_S, EDGE = 2.0, 2.0, 4  # segment length, zero padding after each clip, CNN columns not scored at each end
LOW_RATE = 8000  # --low-rate-share presents batches here


def kept_layers(layers: int, keep: int) -> list[int]:
    """`keep` of `layers` transformer layers, evenly spaced, the first and last included."""
    return sorted({round(i * (layers - 1) / max(keep - 1, 1)) for i in range(keep)})


def prune(teacher: SpecMOSModel, widths: list[int], head_layers: int | None = None) -> SpecMOSModel:
    """The teacher with each CNN layer cut to its `widths` strongest filters (L1 norm) and its transformer
    to `head_layers` of its layers; the head is copied and frozen (and eval: its BatchNorms keep the
    teacher's statistics)."""
    cfg = copy.deepcopy(teacher.cfg)
    cfg.cnn_widths = list(widths)
    cfg.layers = head_layers or teacher.cfg.layers
    student = SpecMOSModel(cfg)
    prefix = "transformer.transformer_encoder.layers."
    new_index = {old: new for new, old in enumerate(kept_layers(teacher.cfg.layers, cfg.layers))}
    head = {}
    for key, value in teacher.transformer_pool_attn.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix):].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}{new_index[int(old)]}.{rest}"
        head[key] = value
    student.transformer_pool_attn.load_state_dict(head)
    student.transformer_pool_attn.requires_grad_(False)
    convs_t = [m for m in teacher.cnn.cnn if isinstance(m, torch.nn.Conv2d)]
    convs_s = [m for m in student.cnn.cnn if isinstance(m, torch.nn.Conv2d)]
    keep_in = torch.arange(2)
    for ct, cs, w in zip(convs_t, convs_s, widths):
        keep = ct.weight.abs().sum((1, 2, 3)).topk(w).indices.sort().values if w < ct.out_channels \
            else torch.arange(ct.out_channels)
        with torch.no_grad():
            cs.weight.copy_(ct.weight[keep][:, keep_in])
            cs.bias.copy_(ct.bias[keep])
        keep_in = keep
    return student.eval()


class ShrinkTask:
    """fit's task. CNN mode: the student's CNN is the model; the loss is the normed-feature MSE to the
    teacher's CNN. Head mode (a shallower student head): its transformer layers are the model; the loss
    is the MSE to the teacher's normed last hidden states plus that of the crop scores."""

    def __init__(self, teacher: SpecMOSModel, student: SpecMOSModel, corpus: Path, batch_size: int,
                 valid_clips: int, shift: dict[str, float] | None = None, hidden_weight: float = 1.0,
                 absolute: bool = False, low_share: float = 0.0):
        """shift: MOS added to the teacher's crop score per clip, or with `absolute` the clip's target MOS."""
        self.head_mode = student.cfg.layers < teacher.cfg.layers or shift is not None
        if low_share and not self.head_mode:
            raise SystemExit("error: --low-rate-share needs head mode (--head-layers, --score-shift or --targets)")
        self.hidden_weight, self.absolute, self.low_share = hidden_weight, absolute, low_share
        self.teacher, self.student = teacher.eval(), student
        if self.head_mode:
            student.cnn.requires_grad_(False)
            self.model = student.transformer_pool_attn.transformer.transformer_encoder.requires_grad_(True)
        else:
            self.model = student.cnn
        self.norm = teacher.transformer_pool_attn.norm_input  # fixed affine in eval mode
        man = pd.read_csv(corpus / "manifest.csv")
        self.train = man[man.split == "train"].reset_index(drop=True)
        self.train["sample_rate"] = [sf.info(corpus / p).samplerate for p in self.train.path]  # the file's own
        if shift is not None:
            lacking = [p for p in list(self.train.path) + list(man[man.split == "valid"].path) if p not in shift]
            if lacking:
                raise SystemExit(f"error: the target table has no row for {len(lacking)} clip(s), e.g. {lacking[0]}")
        shift = shift or {}
        self.train_shift = np.array([shift.get(p, 0.0) for p in self.train.path], np.float32)
        self.by_rate = {sr: g.index.to_numpy() for sr, g in self.train.groupby("sample_rate")}
        self.rates = sorted(self.by_rate)
        self.rate_p = np.array([len(self.by_rate[r]) for r in self.rates], float) / len(self.train)
        valid = man[man.split == "valid"]
        utts = valid.utt_id.drop_duplicates().sample(frac=1.0, random_state=0)
        sizes = valid.groupby("utt_id").size()[utts]
        valid = valid[valid.utt_id.isin(sizes.index[(sizes.cumsum() - sizes < valid_clips).to_numpy()])]
        valid = valid.reset_index(drop=True)  # whole utterances, so their severity pairs can be scored
        self.valid = [corpus / p for p in valid.path]  # scored at the file's own rate, not the manifest's
        self.valid_pairs = severity_pairs(valid.to_dict("records"), "utt_id")
        self.valid_shift = np.array([shift.get(p, 0.0) for p in valid.path])
        self.corpus, self.batch_size, self._teacher_valid = corpus, batch_size, None

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters())}]

    def set_device(self, device: torch.device) -> None:
        self.teacher.to(device)
        self.student.to(device)

    def segment(self, i: int, rng: np.random.Generator) -> np.ndarray:
        """CNN mode: SEG_S of a clip followed by PAD_S of zeros. Head mode: one whole crop as scoring makes it."""
        x, sr = sf.read(self.corpus / self.train.path[i], dtype="float32", always_2d=True)
        x = x[:, 0] / (np.abs(x[:, 0]).max() + 1e-8)  # peak-normalised, as a crop
        if self.head_mode:
            n = round(self.student.cfg.crop_s * sr)
            start = int(rng.integers(0, max(len(x) - n, 0) + 1))
            return np.pad(x[start:start + n], (0, max(n - len(x), 0)))
        x = np.concatenate([x, np.zeros(int(PAD_S * sr), np.float32)])  # crops end in zero padding
        n = int(SEG_S * sr)
        if len(x) < n:
            x = np.pad(x, (0, n - len(x)))
        start = int(rng.integers(0, len(x) - n + 1))
        return x[start:start + n]

    def batches(self, rank: int, world: int, seed: int, start: int):
        step = start
        while True:
            rng = np.random.default_rng([seed, rank, step])
            sr = self.rates[rng.choice(len(self.rates), p=self.rate_p)]
            idx = rng.choice(self.by_rate[sr], size=self.batch_size)
            segs = [self.segment(int(i), rng) for i in idx]
            low = bool(self.low_share) and sr > LOW_RATE and rng.random() < self.low_share  # no draw when off
            yield (torch.from_numpy(np.stack(segs)), torch.tensor(sr), torch.from_numpy(self.train_shift[idx]),
                   torch.tensor(low))
            step += 1

    def loss(self, batch, step: int):
        x, sr, shift, low = batch
        if self.head_mode:
            with torch.no_grad():
                if self.absolute:  # the head's score is (MOS - 1) / 4
                    target = ((shift.to(x) - 1) / 4).clamp(0, 1)
                else:  # the teacher's full-band crop score, shifted
                    feats, hidden_t, score_t = self._teacher_view(x, int(sr))
                    target = (score_t + shift.to(score_t) / 4).clamp(0, 1)
                if low:  # (B, T) at sr -> (B, T') at 8 kHz, each row peak-normalised as scoring does
                    x8 = resample(x, int(sr), LOW_RATE)
                    feats, hidden_t, _ = self._teacher_view(x8 / (x8.abs().amax(dim=1, keepdim=True) + 1e-8), LOW_RATE)
                elif self.absolute:
                    feats, hidden_t, _ = self._teacher_view(x, int(sr))
            hidden, score = self.student.transformer_pool_attn.hidden_and_score(feats)
            mse = torch.nn.functional.mse_loss
            if low:  # ranks, not level: the batch's mean is taken off both sides
                score, target = score - score.mean(), target - target.mean()
            return self.hidden_weight * mse(hidden, hidden_t) + mse(4 * score, 4 * target), {}  # on the 1-5 scale
        frames = int(SEG_S * self.student.cfg.frames_per_s)
        spec = sfi_stft(x, int(sr), frames, self.student.cfg)  # (B, 2, K, M)
        with torch.no_grad():
            target = self.norm(self.teacher.cnn(spec).transpose(1, 2))  # (B, D, M/2)
        out = self.norm(self.model(spec).transpose(1, 2))
        loss = torch.nn.functional.mse_loss(out[..., EDGE:-EDGE], target[..., EDGE:-EDGE])
        return loss, {}

    def _teacher_view(self, x: torch.Tensor, sr: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head mode: the shared frozen CNN's features of whole crops and the teacher's reading of them:
        (B, T) -> (B, N, C), its normed last hidden states (B, N, D) and crop scores (B,) in [0, 1]."""
        feats = self.student.cnn(sfi_stft(x, sr, 2 * self.student.cfg.crop_frames, self.student.cfg))
        return feats, *self.teacher.transformer_pool_attn.hidden_and_score(feats)

    def audio_seconds(self, batch) -> float:
        return (self.student.cfg.crop_s if self.head_mode else SEG_S) * batch[0].shape[0]

    def _scores(self, model: SpecMOSModel, rate: int | None = None) -> np.ndarray:
        """Scores of the validation clips (at `rate` where given and lower than the file's); NaN where
        scoring refuses one (an all-silent clip, say)."""
        model.forget_zero_features()  # the all-zero crop's features change as the CNN trains
        out = []
        for p in self.valid:
            x, sr = sf.read(p, dtype="float32", always_2d=True)
            w = torch.from_numpy(x[:, 0])
            if rate and rate < sr:
                w, sr = resample(w, sr, rate), rate
            try:
                with torch.no_grad():
                    out.append(float(model.score(w, sr)[0]))
            except AudioError:
                out.append(float("nan"))
        return np.array(out)

    def validate(self) -> dict:
        was = self.model.training
        self.student.eval()
        if self._teacher_valid is None:
            self._teacher_valid = self.valid_shift if self.absolute else self._scores(self.teacher) + self.valid_shift
        s, t = self._scores(self.student), self._teacher_valid
        ok = np.isfinite(s) & np.isfinite(t)
        srcc = float(pd.Series(s[ok]).corr(pd.Series(t[ok]), method="spearman"))
        pairs = [p for p in self.valid_pairs if ok[p[0]] and ok[p[1]]]
        order = order_share(pairs, s) if pairs else float("nan")
        out = {"srcc": srcc, "mad": float(np.abs(s[ok] - t[ok]).mean()), "order": order, "pairs": len(pairs)}
        if self.low_share:
            s8 = self._scores(self.student, LOW_RATE)
            ok8 = np.isfinite(s8) & np.isfinite(t)
            out["srcc8k"] = float(pd.Series(s8[ok8]).corr(pd.Series(t[ok8]), method="spearman"))
            out["srcc_both"] = (srcc + out["srcc8k"]) / 2
        self.model.train(was)
        return out

    def export(self, folder: Path, metadata: dict) -> None:
        self.student.forget_zero_features()
        save_model(self.student, folder, metadata)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="models/msr-utmos-spec-distillmos")
    ap.add_argument("--corpus", type=Path, default=Path("corpus_ml"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--widths", default="32,32,64,128,128,256")
    ap.add_argument("--head-layers", type=int, help="keep this many transformer layers (the CNN is kept, frozen)")
    ap.add_argument("--score-shift", type=Path, help="CSV path,shift: MOS added to the teacher's crop scores (see above)")
    ap.add_argument("--targets", type=Path, help="CSV path,mos: each clip's crop-score target itself (see above)")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the hidden-state term (head mode)")
    ap.add_argument("--low-rate-share", type=float, default=0.0, help="share of batches presented at 8 kHz (head mode)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--valid-clips", type=int, default=48)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="seeds the data order and which batches go to 8 kHz")
    ap.add_argument("--model-version", default="1.0.0")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    teacher = load_model(args.teacher, device="cpu")
    if args.score_shift and args.targets:
        raise SystemExit("error: give --score-shift or --targets, not both")
    if not 0 <= args.low_rate_share <= 1:
        raise SystemExit("error: --low-rate-share must be between 0 and 1")
    shift = None
    if args.score_shift or args.targets:
        table = pd.read_csv(args.score_shift or args.targets)
        column = "shift" if args.score_shift else "mos"
        if column not in table or "path" not in table:
            raise SystemExit(f"error: {args.score_shift or args.targets}: expected columns path,{column}")
        shift = dict(zip(table.path, table[column].astype(float)))
        args.head_layers = args.head_layers or teacher.cfg.layers
    widths = cnn_widths(teacher.cfg) if args.head_layers else [int(w) for w in args.widths.split(",")]
    most = teacher.cfg.layers - (shift is None)
    if args.head_layers is not None and not 1 <= args.head_layers <= most:
        raise SystemExit(f"error: --head-layers must be 1-{most} (the teacher has {teacher.cfg.layers})")
    student = prune(teacher, widths, args.head_layers)
    task = ShrinkTask(teacher, student, args.corpus, args.batch_size, args.valid_clips, shift, args.hidden_weight,
                      absolute=args.targets is not None, low_share=args.low_rate_share)
    cfg = TrainConfig(out_dir=str(args.out), max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=min(50, args.steps // 10), ckpt_every=args.ckpt_every, device="cpu",
                      seed=args.seed)
    summary = fit(task, cfg, {"script": "shrink_spec", **{k: str(v) for k, v in vars(args).items()}},
                  resume=args.resume, select_metric="srcc_both" if args.low_rate_share else "srcc")
    print(json.dumps(summary, indent=1, default=str))
    release(args, teacher)


def release(args, teacher: SpecMOSModel) -> None:
    """OUT/model: the best checkpoint as a model folder, without trainer state, with the teacher's licence notices."""
    best = find_checkpoint(args.out, "best") or find_checkpoint(args.out, "last")
    model = load_model(best, device="cpu")
    meta = {"model_version": args.model_version, "task": "retarget" if args.score_shift or args.targets else "shrink",
            "source": f"{teacher.identity['model']} {teacher.identity['model_version']} "
                      f"(weights sha256 {teacher.identity['model_sha256'][:12]})",
            "cnn_widths": model.cfg.cnn_widths, "layers": model.cfg.layers, "step": model.metadata.get("step"),
            "valid": model.metadata.get("valid"),
            "command": " ".join(["python scripts/shrink_spec.py"] + [a for a in sys.argv[1:] if a != "--resume"])}
    folder = save_model(model, args.out / "model", meta)
    for notice in Path(teacher.source).glob("LICENSE*"):
        shutil.copy(notice, folder / notice.name)
    print(f"wrote {folder} (step {meta['step']}, validation {meta['valid']})")


if __name__ == "__main__":
    main()
