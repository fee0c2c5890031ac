"""Intervals for report tables that hold both sources of chance in a score: the dev rows and the seeds.

A setting's score is the mean over its seeds of each run's metric on the same dev rows. It moves
for two reasons, and its interval accounts for both:

- **rows**: the dev set is a sample of sentences. A paired bootstrap over dev rows (Efron and
  Tibshirani 1993; the same draws for every run of a table, so differences are paired) gives
  V_rows, the variance of the seed-mean over resampled rows.
- **seeds**: training is random. Over n seeds the per-seed scores have sample variance s^2, and
  their mean's variance is s^2 / n, an estimate with n - 1 degrees of freedom.

The interval is  estimate +- t(nu, 0.975) * sqrt(V_rows + s^2 / n), where nu is the
Welch-Satterthwaite degrees of freedom (Satterthwaite 1946; Welch 1947) with the row part
counted as known (thousands of bootstrap draws of hundreds of rows): nu = (V_rows + s^2/n)^2 /
((s^2/n)^2 / (n - 1)). When the seeds dominate this is Student's t with n - 1 degrees of freedom
(3 seeds: t = 4.30, not 1.96), when the rows do it is the normal interval; it stays valid at 3
seeds, where a bootstrap over seeds is not (it draws one seed three times 3.7% of the time, so its
tails are the lowest and highest seed and it covers 80-90%). Bouthillier et al. (MLSys 2021,
"Accounting for variance in machine learning benchmarks") motivate modelling both sources.
`tests/test_stats.py` measures the coverage on simulated studies with known truth.

Differences pair seeds by seed value (setting A's seed 2 with setting B's seed 2) and use the seeds
both settings have; their row part uses the same bootstrap draws for both. With one seed the
interval holds the rows only (the seed spread is unknown), and the tables say n. The same
estimate gives one-sided p-values, and two one-sided tests (TOST, Schuirmann 1987) against a
margin give equivalence. numpy and scipy do the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sp
from scipy.optimize import brentq
from scipy.stats import rankdata

N_BOOT = 1000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate, its 95% interval, and what it rests on.

    Attributes:
        value: the estimate (a mean over seeds).
        low, high: the interval's ends.
        se: its standard error (rows and seeds together).
        df: the degrees of freedom of its t quantile (inf: rows only).
        n: seeds it rests on.
        rows: dev rows it rests on (per task; the smallest task's where it averages tasks).
    """

    value: float
    low: float
    high: float
    se: float = math.nan
    df: float = math.inf
    n: int = 1
    rows: int = 0

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def signed(self, digits: int = 3) -> str:
        mark = " *" if self.excludes_zero else ""
        return f"{self.value:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{mark}"

    def plain(self, digits: int = 3) -> str:
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def _t(self, x: float) -> float:
        """P(T > x) for the estimate's t distribution."""
        if not self.se > 0:
            return 0.0 if x < 0 else 1.0 if x > 0 else 0.5
        return float(sp.t.sf(x / self.se, self.df))

    def p_above(self, margin: float = 0.0) -> float:
        """One-sided p-value of "the true value is at most `margin`" (small: it is above)."""
        return self._t(self.value - margin)

    def p_below(self, margin: float = 0.0) -> float:
        """One-sided p-value of "the true value is at least `margin`" (small: it is below)."""
        return self._t(margin - self.value)

    def p_equivalent(self, margin: float) -> float:
        """TOST p-value of "the true value is outside [-margin, margin]" (small: it is inside)."""
        return max(self.p_above(-margin), self.p_below(margin))


def metric_rows(metric: str, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """`metric` of `pred` against `label` along their last axis (other axes broadcast)."""
    pred, label = np.broadcast_arrays(pred, label)
    if metric == "acc":
        return (pred == label).mean(axis=-1)
    if metric == "f1":
        tp = ((pred == 1) & (label == 1)).sum(axis=-1)
        fp = ((pred == 1) & (label == 0)).sum(axis=-1)
        fn = ((pred == 0) & (label == 1)).sum(axis=-1)
        denom = 2 * tp + fp + fn
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    if metric == "spearman":
        pred, label = rankdata(pred, axis=-1), rankdata(label, axis=-1)
    elif metric != "pearson":
        raise ValueError(f"metric {metric!r} is unknown; expected acc, f1, pearson or spearman")
    p = pred - pred.mean(axis=-1, keepdims=True)
    q = label - label.mean(axis=-1, keepdims=True)
    denom = np.sqrt((p * p).sum(axis=-1) * (q * q).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * q).sum(axis=-1) / np.where(denom > 0, denom, 1.0), 0.0)


def draws(n_examples: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n_examples) row indices, the same for every setting compared in one table."""
    return np.random.default_rng(seed).integers(0, n_examples, size=(n_boot, n_examples))


def seed_scores(metric: str, preds: np.ndarray, label: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each seed's metric on the rows, and on each bootstrap draw of them.

    Args:
        preds: (..., S, n) predictions of S seeds on n rows.
        label: (..., n) the rows' labels.
        idx: (B, n) `draws(n, B)`.

    Returns:
        (..., S) per-seed scores and (..., S, B) per-seed scores on the drawn rows.
    """
    label = label[..., None, :]  # (..., 1, n): the same labels for every seed
    point = metric_rows(metric, preds, label)
    reps = metric_rows(metric, preds[..., idx], label[..., idx])  # (..., S, B, n) -> (..., S, B)
    return point, reps


def t_interval(per_seed: np.ndarray, reps: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, ...]:
    """The estimate and its interval from per-seed values and their row replicates (see the module doc).

    The per-seed spread s^2 already holds each seed's own row noise (a model is right on some rows by
    chance of its seed: the row-by-seed interaction), so the row part is only what the seeds share:
    the covariance of two different seeds' replicates, averaged over the pairs (an unbiased estimate
    of the shared row variance under the two-way random-effects model; adding the whole replicate
    variance would count the interaction twice). With one seed nothing can be separated, and the row
    part is the whole replicate variance.

    Args:
        per_seed: (..., S) the quantity for each seed on all rows (paired by seed for a difference).
        reps: (..., S, B) each seed's quantity on each bootstrap draw of the rows (the same draws).

    Returns:
        value, se, half-width, low, high: arrays of shape (...).
    """
    n = per_seed.shape[-1]
    value = per_seed.mean(axis=-1)
    centred = reps - reps.mean(axis=-1, keepdims=True)
    cov = np.einsum("...sb,...tb->...st", centred, centred) / (reps.shape[-1] - 1)  # (..., S, S)
    if n > 1:
        trace = np.trace(cov, axis1=-2, axis2=-1)
        shared = (cov.sum(axis=(-2, -1)) - trace) / (n * (n - 1))  # mean covariance of two seeds
        v_rows = np.maximum(shared, 0.0)
        v_seed = per_seed.var(axis=-1, ddof=1) / n
    else:
        v_rows, v_seed = cov[..., 0, 0], np.zeros_like(value)
    var = v_rows + v_seed
    se = np.sqrt(var)
    # each part its own quantile: the rows' normal one, the seeds' Student t with n - 1 degrees of freedom
    z, t = sp.norm.ppf(0.5 + level / 2), sp.t.ppf(0.5 + level / 2, max(n - 1, 1))
    half = np.sqrt(z**2 * v_rows + (t**2 if n > 1 else 0.0) * v_seed)
    return value, se, half, value - half, value + half


def _df_of(q: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """Degrees of freedom nu with t(nu, 0.5 + level / 2) = q, for q above the normal quantile."""
    q = np.atleast_1d(np.asarray(q, dtype=float))
    out = np.full(q.shape, np.inf)
    for i, x in enumerate(q.flat):
        if x > sp.t.ppf(0.5 + level / 2, 1e9):  # above the normal quantile (else: the normal's df)
            out.flat[i] = brentq(lambda nu, x=x: sp.t.ppf(0.5 + level / 2, nu) - x, 0.05, 1e9)
    return out


def interval(per_seed: np.ndarray, reps: np.ndarray, rows: int) -> Interval:
    """`t_interval` of one quantity, as an `Interval` (its df: the t whose quantile gives its half-width)."""
    value, se, half, low, high = (float(x) for x in t_interval(np.asarray(per_seed), np.asarray(reps)))
    df = float(_df_of(np.array([half / se]))[0]) if se > 0 else math.inf
    return Interval(value, low, high, se, df, len(per_seed), rows)


@dataclass(frozen=True)
class Scores:
    """A quantity of one setting, per seed (keyed by seed value): on all rows, and on each bootstrap
    draw of the rows. Differences pair seeds by value and keep the seeds both sides have; averages
    over tasks keep the seeds every task has (each task's rows drawn apart).

    Attributes:
        point: seed -> the quantity on all rows.
        reps: seed -> (B,) the quantity on each draw.
        rows: rows it rests on (summed over the tasks of an average).
    """

    point: dict
    reps: dict
    rows: int

    @classmethod
    def of(cls, metric: str, preds: dict, label: np.ndarray, idx: np.ndarray) -> Scores:
        """`metric` of each seed's predictions (seed -> (n,) array) against `label` on the rows and on `idx`'s draws."""
        seeds = sorted(preds)
        point, reps = seed_scores(metric, np.stack([preds[s] for s in seeds]), label, idx)
        return cls(dict(zip(seeds, point.tolist())), dict(zip(seeds, reps)), len(label))

    @property
    def seeds(self) -> list:
        return sorted(self.point, key=str)

    def __sub__(self, other: Scores) -> Scores:
        # a seedless reference (seed None: a deterministic model, the bag-of-words floor) pairs with every seed
        fixed = list(other.point) == [None]
        pair = {s: None if fixed else s for s in self.seeds if fixed or s in other.point}
        return Scores(
            {s: self.point[s] - other.point[o] for s, o in pair.items()},
            {s: self.reps[s] - other.reps[o] for s, o in pair.items()},
            self.rows,
        )

    @staticmethod
    def average(parts: list[Scores]) -> Scores:
        """The mean of the parts (tasks), per seed, on the seeds all of them have."""
        common = [s for s in parts[0].seeds if all(s in p.point for p in parts)]
        return Scores(
            {s: float(np.mean([p.point[s] for p in parts])) for s in common},
            {s: np.mean([p.reps[s] for p in parts], axis=0) for s in common},
            sum(p.rows for p in parts),
        )

    def interval(self) -> Interval | None:
        """The mean over seeds and its 95% interval (None without a seed)."""
        if not self.point:
            return None
        seeds = self.seeds
        return interval(np.array([self.point[s] for s in seeds]), np.stack([self.reps[s] for s in seeds]), self.rows)
