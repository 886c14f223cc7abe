"""MOS agreement metrics and bootstrap intervals, shared by `report` and `finetune`.

Metric names and the system-level definition (per-system mean of predictions vs
per-system mean of labels) follow the VoiceMOS/AudioMOS challenges, so numbers
are comparable with published results. Anything undefined (constant input, fewer
than two points or systems, a non-finite value) comes back as NaN, never raises.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats

METRICS = ("MSE", "LCC", "SRCC", "KTAU")
_BOOT_CHUNK = 2_000_000  # resampled values held in memory at once; bounds RAM for big n


class Interval(NamedTuple):
    """A point estimate with a (1 - alpha) bootstrap percentile interval."""

    mean: float
    low: float
    high: float


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred has {pred.size} values but true has {true.size}")
    return pred, true


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    # scipy warns (or raises for n < 2) where a correlation is undefined; we say NaN instead.
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b).statistic)


def _metrics(pred: np.ndarray, true: np.ndarray, prefix: str) -> dict:
    mse = float(np.mean((pred - true) ** 2)) if pred.size else float("nan")
    return {
        f"{prefix}_MSE": mse,
        f"{prefix}_LCC": _corr(stats.pearsonr, pred, true),
        f"{prefix}_SRCC": _corr(stats.spearmanr, pred, true),
        f"{prefix}_KTAU": _corr(stats.kendalltau, pred, true),
    }


def utterance_metrics(pred, true) -> dict:
    """MSE, LCC, SRCC and KTAU over utterances: keys `utt_MSE`, `utt_LCC`, `utt_SRCC`, `utt_KTAU`."""
    return _metrics(*_pair(pred, true), "utt")


def system_means(values, systems) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique system ids and the mean of `values` within each."""
    values = np.asarray(values, dtype=np.float64).ravel()
    ids, inverse = np.unique(np.asarray(systems).ravel(), return_inverse=True)
    if ids.size and inverse.size != values.size:
        raise ValueError(f"{values.size} values but {inverse.size} system ids")
    sums = np.bincount(inverse, weights=values, minlength=ids.size)
    return ids, sums / np.bincount(inverse, minlength=ids.size)


def mos_metrics(pred, true, systems=None) -> dict:
    """Utterance metrics, plus `sys_*` metrics over per-system means when `systems` is given."""
    pred, true = _pair(pred, true)
    out = _metrics(pred, true, "utt")
    if systems is not None:
        _, sys_pred = system_means(pred, systems)
        _, sys_true = system_means(true, systems)
        out.update(_metrics(sys_pred, sys_true, "sys"))
    return out


def bootstrap_mean_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """Mean with a percentile bootstrap interval; deterministic for a given seed.

    Fewer than two values give a NaN interval: one value says nothing about spread.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    n = values.size
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    mean = float(values.mean())
    if n < 2 or not np.isfinite(values).all():
        return Interval(mean, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    step = max(1, _BOOT_CHUNK // n)
    for start in range(0, n_boot, step):
        rows = min(step, n_boot - start)
        # Resample files with replacement :: (rows, n) indices -> (rows,) means
        boot[start:start + rows] = values[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return Interval(mean, float(low), float(high))


def paired_bootstrap_diff_ci(new, old, n_boot: int = 2000, alpha: float = 0.05,
                             seed: int = 0) -> Interval:
    """Mean of `new - old` over shared files, resampling files so each keeps its pair.

    Pairing removes the between-file variance both runs share, so the interval is
    much tighter than comparing two independent means.
    """
    new, old = _pair(new, old)
    return bootstrap_mean_ci(new - old, n_boot=n_boot, alpha=alpha, seed=seed)
