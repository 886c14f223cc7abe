"""MOS metrics against scipy/numpy, the system-level definition, bootstrap coverage."""
import math
import warnings

import numpy as np
import pytest
import scipy.stats

from msr_utmos_cli import metrics
from msr_utmos_cli.metrics import (bootstrap_mean_ci, mos_metrics, paired_bootstrap_diff_ci,
                                   utterance_metrics)


@pytest.mark.parametrize("seed", range(5))
def test_utterance_metrics_agree_with_scipy(seed):
    rng = np.random.default_rng(seed)
    true = rng.uniform(1, 5, 60)
    pred = true + rng.normal(0, 0.7, 60)
    got = utterance_metrics(list(pred), tuple(true))  # any array-like
    assert got.keys() == {"utt_MSE", "utt_LCC", "utt_SRCC", "utt_KTAU"}
    assert got["utt_MSE"] == pytest.approx(((pred - true) ** 2).mean())
    assert got["utt_LCC"] == pytest.approx(scipy.stats.pearsonr(pred, true)[0])
    assert got["utt_SRCC"] == pytest.approx(scipy.stats.spearmanr(pred, true)[0])
    assert got["utt_KTAU"] == pytest.approx(scipy.stats.kendalltau(pred, true)[0])


def test_mos_metrics_utterance_keys_match_utterance_metrics():
    rng = np.random.default_rng(7)
    pred, true = rng.normal(3, 1, 30), rng.normal(3, 1, 30)
    assert mos_metrics(pred, true) == utterance_metrics(pred, true)


def test_system_level_is_per_system_means_on_hand_built_case():
    # A: pred mean 2, true mean 2; B: 4 vs 5; C: 3 vs 2 (unequal group sizes on purpose).
    systems = ["A", "C", "B", "A", "C", "C"]
    pred = [1, 2, 4, 3, 2, 5]
    true = [2, 1, 5, 2, 1, 4]
    got = mos_metrics(pred, true, systems)
    # Worked by hand: x = (2, 4, 3), y = (2, 5, 2).
    assert got["sys_MSE"] == pytest.approx(2 / 3)
    assert got["sys_LCC"] == pytest.approx(3 / math.sqrt(12))
    assert got["sys_SRCC"] == pytest.approx(1.5 / math.sqrt(3))
    assert got["sys_KTAU"] == pytest.approx(2 / math.sqrt(6))  # tau-b: 2 concordant, 1 tie in y
    assert got["utt_MSE"] == pytest.approx(np.mean((np.array(pred) - np.array(true)) ** 2))


def test_system_ids_may_be_numbers():
    got = mos_metrics([1, 2, 3, 4], [1, 2, 4, 3], systems=np.array([10, 10, 20, 30]))
    assert got["sys_LCC"] == pytest.approx(scipy.stats.pearsonr([1.5, 3, 4], [1.5, 4, 3])[0])


def test_undefined_metrics_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        const = utterance_metrics([3.0] * 5, [1, 2, 3, 4, 5])
        one_system = mos_metrics([1, 2, 3], [2, 3, 4], systems=["a", "a", "a"])
        empty = utterance_metrics([], [])
        with_nan = utterance_metrics([1, np.nan, 3], [1, 2, 3])
    assert const["utt_MSE"] == pytest.approx(2.0)
    assert all(math.isnan(const[k]) for k in ("utt_LCC", "utt_SRCC", "utt_KTAU"))
    assert all(math.isnan(one_system[f"sys_{k}"]) for k in metrics.METRICS if k != "MSE")
    assert one_system["sys_MSE"] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in empty.values())
    assert all(math.isnan(v) for v in with_nan.values())
    assert mos_metrics([1, 2], [2, 1], systems=["a", "b"])["sys_LCC"] == pytest.approx(-1.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        utterance_metrics([1, 2, 3], [1, 2])


def test_bootstrap_is_deterministic_and_chunking_does_not_change_it(monkeypatch):
    x = np.random.default_rng(0).normal(3, 1, 500)
    a = bootstrap_mean_ci(x, n_boot=400, seed=3)
    assert a == bootstrap_mean_ci(x, n_boot=400, seed=3)
    assert a != bootstrap_mean_ci(x, n_boot=400, seed=4)
    monkeypatch.setattr(metrics, "_BOOT_CHUNK", 1000)  # 2 resamples per chunk
    assert a == bootstrap_mean_ci(x, n_boot=400, seed=3)
    assert a.mean == pytest.approx(x.mean()) and a.low < a.mean < a.high


def test_bootstrap_degenerate_inputs():
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))
    one = bootstrap_mean_ci([4.0])
    assert one.mean == 4.0 and math.isnan(one.low) and math.isnan(one.high)


def _coverage(make, truth: float, ci, reps: int) -> float:
    rng = np.random.default_rng(12345)
    hits = 0
    for r in range(reps):
        low, high = ci(*make(rng), seed=r)[1:]
        hits += low <= truth <= high
    return hits / reps


def test_bootstrap_mean_ci_covers_the_true_mean_at_about_95_percent():
    rate = _coverage(lambda rng: (rng.normal(3.0, 0.8, 60),), 3.0,
                     lambda v, seed: bootstrap_mean_ci(v, n_boot=400, seed=seed), reps=500)
    print(f"bootstrap_mean_ci coverage over 500 repetitions: {rate:.3f}")
    # Percentile intervals run slightly narrow at n=60 (0.940 over 4000 repetitions);
    # 500 repetitions have a standard error of ~0.011, so this band is ~2.7 SE each side.
    assert 0.91 <= rate <= 0.97


def test_paired_bootstrap_covers_the_true_difference_and_beats_unpaired_width():
    def make(rng):
        quality = rng.normal(3.0, 1.0, 60)  # shared per-file effect the pairing cancels
        return quality + rng.normal(0, 0.2, 60) - 0.1, quality + rng.normal(0, 0.2, 60)

    rate = _coverage(make, -0.1, lambda a, b, seed: paired_bootstrap_diff_ci(a, b, n_boot=400, seed=seed),
                     reps=300)
    print(f"paired_bootstrap_diff_ci coverage over 300 repetitions: {rate:.3f}")
    assert 0.91 <= rate <= 0.98
    new, old = make(np.random.default_rng(1))
    paired = paired_bootstrap_diff_ci(new, old)
    assert paired == bootstrap_mean_ci(new - old)
    unpaired_half = 1.96 * math.sqrt(new.var(ddof=1) / 60 + old.var(ddof=1) / 60)
    assert paired.high - paired.low < unpaired_half  # far below the unpaired width 2 * half
