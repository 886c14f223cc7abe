"""MOS fine-tuning: labelled corpora, head rebuild, clipped-MSE + contrastive loss, validation, predictions.

Runs through the shared loop (`train.fit`). A run config has four sections:
`model:` (FinetuneModel), `data:` (FinetuneData), `loss:` (FinetuneLoss) and `trainer:` (TrainConfig).
Pretraining on a large MOS set and fine-tuning on a target set are two runs of `utmos finetune`,
the second with `--init` pointing at the first's `best/` folder.
"""
from __future__ import annotations

import csv
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import audio
from ..checkpoint import ModelLoadError, atomic_write, load_model, save_model
from ..metrics import mos_metrics
from ..model import PRESETS, MOSModel
from ..output import row_fields
from ..rows import COLUMNS
from ..scoring import score_files
from .checkpoints import check_out_dir
from .config import ConfigError, build
from .labels import LAYOUTS, LabelError, Utterance, read_labels
from .paper_config import load_run_config
from .train import TrainConfig, fit

PREDICTION_COLUMNS = [*COLUMNS, "true_mos", "system"]  # a score file's columns and the truth
AUTO_EMBED_DIM = 16  # embedding size chosen when the data needs an embedding the init model lacks


@dataclass
class FinetuneModel:
    """The `model:` section."""

    init: str = "small"  # model folder (a distill or finetune checkpoint such as out/best) or a preset name
    domain_dim: int | None = None  # null: keep the init's; 16 if the data has several domains and the init none; 0: off
    listener_dim: int | None = None  # null: keep the init's; 16 if the train data has listeners; 0: off (means only)
    freeze_ssl_steps: int = 0  # train only the head for the first N optimizer steps
    ssl_lr_scale: float = 1.0  # SSL learning rate = trainer.lr * this (the head uses trainer.lr)


@dataclass
class Corpus:
    """One labelled list (an item of `data.train` / `data.valid`)."""

    csv: str  # the list (relative paths in a config are relative to the working directory)
    wav_root: str | None = None  # relative audio paths resolve here (default: --wav-root, else the list's folder)
    domain: int = 0  # domain id for the UTMOS domain embedding (a `domain` column overrides it per row)
    layout: str = "auto"  # auto | csv | bvcc | amc25t3 (see labels.py)


@dataclass
class FinetuneData:
    """The `data:` section."""

    train: list[dict] = field(default_factory=list)  # Corpus mappings
    valid: list[dict] = field(default_factory=list)  # Corpus mappings; empty: no validation
    wav_root: str | None = None  # relative audio paths of corpora without their own wav_root (default: the list's folder)
    scale: list[float] = field(default_factory=lambda: [1.0, 5.0])  # labels outside [lo, hi] are bad rows
    crop_s: float = 4.0  # random crop of at most this many seconds (0: whole files)
    gain_db: float = 3.0  # random gain, uniform in +-gain_db
    present_rates: list[int] = field(default_factory=list)  # other presentation rates for training batches
    present_prob: float = 0.5  # chance a batch is presented at another allowed rate
    present_upsample: bool = False  # also allow rates above a clip's own (content stays band-limited)
    select_metric: str = "sys_SRCC"  # keeps out_dir/best; any key of metrics.mos_metrics
    select_mode: str = "max"  # max | min


@dataclass
class FinetuneLoss:
    """The `loss:` section (UTMOS22 style)."""

    clip_tau: float = 0.25  # clipped MSE: errors within +-tau cost nothing
    mse_weight: float = 1.0
    contrast_weight: float = 0.5  # pairwise ranking term over all pairs in a batch
    contrast_margin: float = 0.1  # pair differences within this margin cost nothing


SECTIONS = {"model": FinetuneModel, "data": FinetuneData, "loss": FinetuneLoss, "trainer": TrainConfig}


# --- data ------------------------------------------------------------------------------------
def load_corpora(specs: list[dict], where: str, wav_root: str | None, scale: tuple[float, float],
                 skip_bad_rows: bool, log=print) -> list[Utterance]:
    """Read every corpus; all problems are printed one line each, then raise unless skip_bad_rows."""
    utts, problems = [], []
    for i, spec in enumerate(specs):
        c = build(Corpus, spec, f"{where}[{i}]")
        if c.layout not in LAYOUTS:
            raise ConfigError(f"{where}[{i}].layout: {c.layout!r} is not one of {', '.join(LAYOUTS)}")
        root = c.wav_root if c.wav_root is not None else wav_root
        u, p = read_labels(c.csv, root, c.layout, c.domain, scale)
        utts += u
        problems += p
    for p in problems:
        log(str(p))
    if problems and not skip_bad_rows:
        raise LabelError(f"{len(problems)} bad row(s) in {where} (listed above); fix them or pass --skip-bad-rows")
    if not utts:
        raise LabelError(f"{where}: no usable rows")
    return utts


@dataclass(frozen=True)
class Item:
    utt: int  # index into the utterance list
    mos: float
    listener: int  # 0: the mean listener


def allowed_rates(u: Utterance, rates: list[int], upsample: bool) -> set[int]:
    """Rates a clip may be presented at without losing content: r/2 >= its bandwidth (and r <= its own rate)."""
    sr = u.info.sample_rate
    bw = min(u.bandwidth_hz or sr / 2, sr / 2)
    return {sr} | {r for r in rates if r >= 2 * bw - 1e-6 and (upsample or r <= sr)}


def plan_batches(groups: dict[int, list[int]], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle within each rate, chunk, shuffle the chunk order. Batch count is the same every epoch."""
    out = []
    for sr in sorted(groups):
        idx = rng.permutation(groups[sr])
        out += [idx[i:i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


# --- model -----------------------------------------------------------------------------------
def _transplant(old: MOSModel, new: MOSModel) -> None:
    """Copy every SSL weight, and every head weight whose meaning survives the head change."""
    o, n = old.state_dict(), new.state_dict()
    oc, nc = old.cfg, new.cfg
    for k, v in n.items():
        src = o[k] if k in o else None
        if not k.startswith("head."):
            v.copy_(src)
        elif k.startswith("head.lstm.weight_ih"):
            # LSTM input = [features | domain | listener]; copy the segments whose size is unchanged.
            v.zero_()  # new embedding columns start at zero so the rebuilt head computes what the old did
            segs_o = [oc.embed_dim, oc.domain_dim, oc.listener_dim]
            segs_n = [nc.embed_dim, nc.domain_dim, nc.listener_dim]
            oo, no = np.cumsum([0] + segs_o), np.cumsum([0] + segs_n)
            for j in range(3):
                if segs_o[j] == segs_n[j] and segs_n[j]:
                    v[:, no[j]:no[j + 1]] = src[:, oo[j]:oo[j + 1]]
        elif src is not None and src.shape == v.shape:
            v.copy_(src)
        elif src is not None and k.endswith(".weight") and src.dim() == 2 and src.shape[1] == v.shape[1]:
            rows = min(src.shape[0], v.shape[0])  # an embedding table that grew: keep the known ids
            v[:rows] = src[:rows]


def build_model(init: str, m: FinetuneModel, num_domains: int, num_listeners: int, seed: int) -> tuple[MOSModel, dict]:
    """The init model with a head sized for the data. Returns the model and a note on what was done."""
    torch.manual_seed(seed)
    if init in PRESETS and not Path(init).exists():
        old, cfg = None, PRESETS[init]()
    else:
        old = load_model(init, "cpu")
        if not isinstance(old, MOSModel):
            raise ModelLoadError(f"{init}: fine-tuning starts from an sfi-wav2vec2 model or preset (e.g. "
                                 "msr-utmos-small-distillmos), not the sfi-stft-transformer architecture")
        cfg = old.cfg
    dd = m.domain_dim if m.domain_dim is not None else (cfg.domain_dim or (AUTO_EMBED_DIM if num_domains > 1 else 0))
    ld = m.listener_dim if m.listener_dim is not None else (
        cfg.listener_dim or (AUTO_EMBED_DIM if num_listeners else 0))
    new_cfg = replace(cfg, domain_dim=dd, num_domains=max(cfg.num_domains, num_domains) if dd else 1,
                      listener_dim=ld, num_listeners=max(cfg.num_listeners, num_listeners) if ld else 0)
    note = {"init": init, "init_kind": "preset" if old is None else "model folder"}
    if old is not None and new_cfg == cfg:
        return old.train(), {**note, "head": "kept"}
    model = MOSModel(new_cfg)
    if old is not None:
        with torch.no_grad():
            _transplant(old, model)
        note["head"] = "rebuilt (SSL weights kept)"
    return model.train(), note


# --- the task --------------------------------------------------------------------------------
class FinetuneTask:
    """What `train.fit` trains: batches of labelled clips, the UTMOS loss, validation and export."""

    def __init__(self, m: FinetuneModel, d: FinetuneData, l: FinetuneLoss, trainer: TrainConfig,
                 train: list[Utterance], valid: list[Utterance], init: str | None = None):
        self.m, self.d, self.l, self.trainer = m, d, l, trainer
        self.train_utts, self.valid_utts = train, valid
        listeners = sorted({lis for u in train for lis, _ in u.ratings if lis is not None})
        domains = max(u.domain for u in train + valid) + 1
        self.model, self.init_info = build_model(init or m.init, m, domains, len(listeners), trainer.seed)
        use_listeners = self.model.cfg.listener_dim > 0 and listeners
        lid = {name: i + 1 for i, name in enumerate(listeners)}
        self.items: list[Item] = []
        for i, u in enumerate(train):
            self.items.append(Item(i, u.mos, 0))  # the mean listener learns the utterance mean
            if use_listeners:
                self.items += [Item(i, s, lid[lis]) for lis, s in u.ratings if lis is not None]
        self.num_listeners = len(listeners) if use_listeners else 0
        rates = {}
        for k, it in enumerate(self.items):
            rates.setdefault(train[it.utt].info.sample_rate, []).append(k)
        self.by_rate = rates
        self.allowed = [allowed_rates(u, d.present_rates, d.present_upsample) for u in train]
        self.predictions: list[dict] | None = None
        self.head_keys = {id(p) for p in self.model.head.parameters()}

    # optimizer groups: the SSL part may have its own learning rate
    def param_groups(self) -> list[dict]:
        head = list(self.model.head.parameters())
        ssl = [p for p in self.model.parameters() if id(p) not in self.head_keys]
        return [{"params": ssl, "lr_scale": self.m.ssl_lr_scale, "name": "ssl"}, {"params": head, "name": "head"}]

    def _load(self, u: Utterance, rng: np.random.Generator) -> np.ndarray:
        info = u.info
        n = info.frames
        crop = int(self.d.crop_s * info.sample_rate) if self.d.crop_s > 0 else n
        start = int(rng.integers(0, n - crop + 1)) if n > crop else 0
        x = audio.read_segment(info, start, min(n, start + crop))
        return x * np.float32(10 ** (rng.uniform(-self.d.gain_db, self.d.gain_db) / 20)) if self.d.gain_db else x

    def _batches_per_epoch(self, world: int) -> int:
        """Micro-batches of one rank in one pass over the items (the same count every epoch)."""
        return len(plan_batches(self.by_rate, self.trainer.batch_size, np.random.default_rng(0))) // world

    def steps_per_epoch(self, world: int) -> int:
        return math.ceil(self._batches_per_epoch(world) / self.trainer.grad_accum)

    def batches(self, rank: int, world: int, seed: int, start: int):
        """Endless, deterministic: batch b of rank r depends only on (seed, b, r), so resume skips `start`."""
        bs = self.trainer.batch_size
        per_epoch = self._batches_per_epoch(world)
        if per_epoch == 0:
            raise LabelError(f"too few training items ({len(self.items)}) for {world} rank(s)")
        b = start
        while True:
            epoch, k = divmod(b, per_epoch)
            plan = plan_batches(self.by_rate, bs, np.random.default_rng([seed, epoch]))
            for idx in plan[rank + world * k::world][:per_epoch - k]:
                yield self._batch([self.items[i] for i in idx], np.random.default_rng([seed, epoch, b, rank]))
                b += 1

    def _batch(self, items: list[Item], rng: np.random.Generator) -> dict:
        utts = [self.train_utts[it.utt] for it in items]
        sr = utts[0].info.sample_rate
        waves = [torch.from_numpy(self._load(u, rng)) for u in utts]
        choices = sorted(set.intersection(*(self.allowed[it.utt] for it in items)) - {sr})
        if choices and rng.random() < self.d.present_prob:
            new = int(choices[rng.integers(len(choices))])
            waves, sr = [audio.resample(w, sr, new) for w in waves], new
        lengths = torch.tensor([w.shape[0] for w in waves])
        return {"wave": torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), "lengths": lengths, "sr": sr,
                "mos": torch.tensor([it.mos for it in items], dtype=torch.float32),
                "listener": torch.tensor([it.listener for it in items]),
                "domain": torch.tensor([u.domain for u in utts])}

    def audio_seconds(self, batch: dict) -> float:
        return float(batch["lengths"].sum()) / batch["sr"]

    def predict(self, wave, lengths, sr, domain, listener, frozen: bool = False) -> torch.Tensor:
        """(B, T) -> raw utterance scores (B,); with `frozen` the SSL part runs without gradients."""
        model = self.model
        with torch.no_grad() if frozen else nullcontext():
            feats, n = model.extract_features(wave, lengths, sr, num_layers=model.readout_depth)
        return model.readout(feats, n, domain, listener)[1]

    def loss(self, batch: dict, step: int):
        pred = self.predict(batch["wave"], batch["lengths"], batch["sr"], batch["domain"], batch["listener"],
                            frozen=step < self.m.freeze_ssl_steps).float()
        return utmos_loss(pred, batch["mos"], self.l)

    def validate(self) -> dict[str, float] | None:
        """The validation files scored as `utmos score` scores them (so best/ is chosen on the numbers
        users will see), against their labels; files it cannot score get its error and are left out."""
        if not self.valid_utts:
            return None
        rows = list(score_files(self.model, [u.path for u in self.valid_utts]))
        scored = [(u, r.mos) for u, r in zip(self.valid_utts, rows) if r.mos is not None]
        metrics = mos_metrics([p for _, p in scored], [u.mos for u, _ in scored], [u.system for u, _ in scored])
        key = self.d.select_metric
        if not math.isfinite(metrics.get(key, float("nan"))):  # undefined (e.g. constant output) ranks last
            metrics[key] = -1.0 if self.d.select_mode == "max" else float("inf")
        self.predictions = [{**row_fields(r), "true_mos": round(u.mos, 5), "system": u.system}
                            for u, r in zip(self.valid_utts, rows)]
        return {key: metrics[key], **{k: v for k, v in metrics.items() if k != key}}

    def export(self, folder: Path, metadata: dict) -> None:
        meta = {**metadata, "task": "finetune", **self.init_info, "num_listeners_trained": self.num_listeners,
                "scale": list(self.d.scale), "train_utterances": len(self.train_utts)}
        save_model(self.model, folder, meta)
        if self.predictions is not None:
            write_predictions(Path(folder) / "predictions.csv", self.predictions)


def utmos_loss(pred: torch.Tensor, true: torch.Tensor, l: FinetuneLoss) -> tuple[torch.Tensor, dict]:
    """Clipped MSE + pairwise contrastive term; pred, true (B,) -> scalar loss and its parts."""
    err = pred - true
    mse = torch.where(err.abs() > l.clip_tau, err ** 2, torch.zeros_like(err)).mean()
    # All pairs :: (B, 1) - (1, B) -> (B, B); only the upper triangle counts each pair once.
    diff = (true[:, None] - true[None, :]) - (pred[:, None] - pred[None, :])
    pairs = torch.triu(torch.ones_like(diff, dtype=torch.bool), diagonal=1)
    con = (diff.abs() - l.contrast_margin).clamp(min=0)[pairs].mean() if pred.numel() > 1 else pred.sum() * 0
    total = l.mse_weight * mse + l.contrast_weight * con
    return total, {"clipped_mse": float(mse.detach()), "contrast": float(con.detach())}


def write_predictions(path: Path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


# --- entry point -----------------------------------------------------------------------------
def resolve(config: str | os.PathLike | None, overrides: list | None = None, init: str | None = None,
            wav_root: str | None = None) -> tuple[dict, dict, str | None]:
    """Our run config or the paper's, with --init and --wav-root applied last -> (built sections,
    resolved dict, note on the paper's ignored keys)."""
    last = [("model.init", init)] if init is not None else []
    last += [("data.wav_root", wav_root)] if wav_root is not None else []
    return load_run_config("finetune", config, [*(overrides or []), *last], SECTIONS)


def run(config: str | os.PathLike | None, overrides: list | None = None, init: str | None = None,
        wav_root: str | None = None, skip_bad_rows: bool = False, resume: bool = False, log=print,
        overwrite: bool = False) -> dict:
    """`utmos finetune`: read the config and labels, build the task, train. Returns fit's summary."""
    built, resolved, note = resolve(config, overrides, init, wav_root)
    if note:
        log(note)
    m, d, l, trainer = built["model"], built["data"], built["loss"], built["trainer"]
    check_out_dir(trainer.out_dir, resume, overwrite)  # before the labels and the model load
    if not d.train:
        raise ConfigError("data.train: no training corpus (a list of {csv: ..., wav_root: ..., domain: ...})")
    if len(d.scale) != 2 or not d.scale[0] < d.scale[1]:
        raise ConfigError(f"data.scale: expected [low, high], got {d.scale}")
    if d.select_mode not in ("max", "min"):
        raise ConfigError(f"data.select_mode: 'max' or 'min', got {d.select_mode!r}")
    scale = (d.scale[0], d.scale[1])
    train = load_corpora(d.train, "data.train", d.wav_root, scale, skip_bad_rows, log)
    valid = load_corpora(d.valid, "data.valid", d.wav_root, scale, skip_bad_rows, log) if d.valid else []
    if valid and any(u.domain != 0 for u in valid):
        log("note: validation scores as `utmos score` does, with domain 0; data.valid's domain ids are not used")
    if valid and d.select_metric.startswith("sys_") and len({u.system for u in valid}) < 3:
        log(f"note: the validation set has fewer than 3 systems; selecting by utt_{d.select_metric[4:]}")
        d.select_metric = resolved["data"]["select_metric"] = "utt_" + d.select_metric[4:]
    try:
        task = FinetuneTask(m, d, l, trainer, train, valid)
    except ModelLoadError as e:
        raise ConfigError(f"model.init: {e}") from None
    summary = fit(task, trainer, resolved, resume=resume, overwrite=overwrite,
                  select_metric=d.select_metric if valid else None,
                  select_mode=d.select_mode)
    best = Path(trainer.out_dir) / "best" / "predictions.csv"
    if best.is_file():
        out = Path(trainer.out_dir) / "predictions.csv"
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(best.read_bytes()))
        summary["predictions"] = str(out)
    return {**summary, **task.init_info, "train_utterances": len(train), "valid_utterances": len(valid),
            "train_items": len(task.items), "config": asdict(m)}
