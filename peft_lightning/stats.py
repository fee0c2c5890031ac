"""Confidence intervals for report tables: a paired bootstrap over dev examples, with the seeds.

Each setting of a study (a table row) has one or more runs (seeds), each with per-example dev
predictions. A bootstrap replicate draws the dev examples with replacement (the same draw for every
run being compared: the comparison is paired) and, where a setting has several seeds, draws its
seeds with replacement too (so the interval holds the seed spread as well as the finite dev
set); the setting's score in that replicate is the mean over the drawn seeds of each run's metric
on the drawn examples. Intervals are the 2.5 and 97.5 percentiles over `n_boot` replicates
(1,000 by default, seeded). A difference is marked when its interval excludes 0.

Metrics are those of the runs: accuracy (SST-5, QQP), F1 (QQP), Pearson and Spearman (STS-B; the
pairs of prediction and label are resampled together). numpy and scipy do the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

N_BOOT = 1000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def signed(self, digits: int = 3) -> str:
        mark = " *" if self.excludes_zero else ""
        return f"{self.value:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{mark}"

    def plain(self, digits: int = 3) -> str:
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def metric_rows(metric: str, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """`metric` of each row of `pred` against the same row of `label` (both (B, n))."""
    if metric == "acc":
        return (pred == label).mean(axis=1)
    if metric == "f1":
        tp = ((pred == 1) & (label == 1)).sum(axis=1)
        fp = ((pred == 1) & (label == 0)).sum(axis=1)
        fn = ((pred == 0) & (label == 1)).sum(axis=1)
        denom = 2 * tp + fp + fn
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    if metric == "spearman":
        pred, label = rankdata(pred, axis=1), rankdata(label, axis=1)
    elif metric != "pearson":
        raise ValueError(f"metric {metric!r} is unknown; expected acc, f1, pearson or spearman")
    p = pred - pred.mean(axis=1, keepdims=True)
    q = label - label.mean(axis=1, keepdims=True)
    denom = np.sqrt((p * p).sum(axis=1) * (q * q).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * q).sum(axis=1) / denom, 0.0)


def draws(n_examples: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n_examples) example indices, the same for every setting compared in one table."""
    return np.random.default_rng(seed).integers(0, n_examples, size=(n_boot, n_examples))


def replicate_scores(
    metric: str, runs: list[np.ndarray], label: np.ndarray, idx: np.ndarray, seed: int = SEED
) -> np.ndarray:
    """(n_boot,) the setting's score in each replicate: its seeds drawn with replacement, each
    run's metric on the drawn examples, averaged over the drawn seeds.

    Args:
        runs: one (n,) prediction array per seed of the setting, on the same n examples as `label`.
        idx: `draws(n, n_boot)`.
    """
    per_run = np.stack([metric_rows(metric, r[idx], label[idx]) for r in runs])  # (seeds, n_boot)
    if len(runs) == 1:
        return per_run[0]
    pick = np.random.default_rng(seed + 1).integers(0, len(runs), size=(idx.shape[0], len(runs)))
    return np.take_along_axis(per_run.T, pick, axis=1).mean(axis=1)


def point(metric: str, runs: list[np.ndarray], label: np.ndarray) -> float:
    return float(np.mean([metric_rows(metric, r[None], label[None])[0] for r in runs]))


def interval(values: np.ndarray, estimate: float) -> Interval:
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(estimate, float(low), float(high))


def score_interval(metric: str, runs: list[np.ndarray], label: np.ndarray, idx: np.ndarray) -> Interval:
    """The setting's metric (mean over seeds) and its 95% interval."""
    return interval(replicate_scores(metric, runs, label, idx), point(metric, runs, label))


def difference_interval(
    metric: str, runs: list[np.ndarray], reference: list[np.ndarray], label: np.ndarray, idx: np.ndarray
) -> Interval:
    """setting - reference on the same example draws (paired), and its 95% interval."""
    diff = replicate_scores(metric, runs, label, idx) - replicate_scores(metric, reference, label, idx)
    return interval(diff, point(metric, runs, label) - point(metric, reference, label))
