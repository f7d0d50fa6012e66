"""Confidence intervals for comparing runs: pure functions, arrays in, `Interval`s out.

Two sources of noise make a final metric a sample: the seed (data split, sampling, initial
adapter) and the held-out examples it is scored on. So each figure gets two 95 % intervals:

- over seeds, Student t: x̄ ± t_{0.975, n-1} · s / √n, s the sample standard deviation of the n
  per-seed values (`t_interval`; for a paired difference, the same on the per-seed differences,
  as `scipy.stats.ttest_rel(a, b).confidence_interval()`). Undefined (NaN) with one seed.
- over (seed, example) pairs pooled across seeds, percentile bootstrap (`scipy.stats.bootstrap`,
  seeded): the statistic is a weighted mean Σ w_i x_i / Σ w_i over the pairs — accuracy with
  x_i = correct, w_i = 1; token-weighted loss with x_i = l_i, w_i = n_i. A difference from a
  baseline resamples each pair together with the baseline's result on the same example
  (`paired=True`), so the variation the two share cancels.

A difference is told apart from zero (`distinguishable`) only when every interval that is defined
excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9999  # scipy's default; the percentile interval's Monte-Carlo error is then ~1e-3 of its width
_BATCH = 500  # resamples held in memory at once: (batch, pairs) floats per sample


@dataclass(frozen=True)
class Interval:
    """An estimate and its interval [lo, hi]; lo = hi = NaN when undefined."""

    estimate: float
    lo: float
    hi: float

    @property
    def defined(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval is defined and 0 lies outside it."""
        return self.defined and (self.lo > 0 or self.hi < 0)


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` (NaNs dropped) and the Student-t interval x̄ ± t_{(1+c)/2, n-1} · s/√n
    (s with n-1 in the denominator); NaN bounds with fewer than 2 values, and [x̄, x̄] when they
    are all equal."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan)
    sem = float(x.std(ddof=1)) / math.sqrt(len(x))
    if sem == 0:
        return Interval(mean, mean, mean)
    lo, hi = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return Interval(mean, float(lo), float(hi))


def paired_t_interval(values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of values[k] - baseline[k] over the seeds k where both are finite, with the t interval
    of those differences (`t_interval`)."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    return t_interval(a - b, confidence)


def bootstrap_mean(
    values: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    seed: int,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
) -> Interval:
    """Weighted mean Σ w_i x_i / Σ w_i (plain mean without `weights`) over the items i, and its
    percentile bootstrap interval, resampling items with their weights (items of weight 0 left out)."""
    x, w = _pairs(values, weights)
    counts = w > 0
    return _bootstrap((x[counts] * w[counts], w[counts]), _ratio, seed, confidence, resamples)


def bootstrap_mean_difference(
    values: np.ndarray,
    baseline: np.ndarray,
    weights: np.ndarray | None = None,
    baseline_weights: np.ndarray | None = None,
    *,
    seed: int,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
) -> Interval:
    """`bootstrap_mean` of `values` minus that of `baseline`, item i of both measured on the same
    example: each resample draws items and keeps both sides of each together (paired)."""
    x, w = _pairs(values, weights)
    y, v = _pairs(baseline, baseline_weights)
    if len(x) != len(y):
        raise ValueError(f"paired values need the same length, got {len(x)} and {len(y)}")
    counts = (w > 0) | (v > 0)
    samples = (x[counts] * w[counts], w[counts], y[counts] * v[counts], v[counts])
    return _bootstrap(samples, _ratio_difference, seed, confidence, resamples)


def distinguishable(*intervals: Interval) -> bool:
    """A difference is real when at least one of its intervals is defined and every defined one
    excludes 0 (one seed: the t interval is undefined and the bootstrap decides alone)."""
    defined = [i for i in intervals if i.defined]
    return bool(defined) and all(i.excludes_zero for i in defined)


def _pairs(values: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Items as float arrays; an item with weight 0 or a non-finite value counts with weight 0."""
    x = np.asarray(values, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    if x.shape != w.shape or x.ndim != 1:
        raise ValueError(f"values and weights must be 1-D of one length, got shapes {x.shape} and {w.shape}")
    keep = np.isfinite(x) & (w > 0)
    return np.where(keep, x, 0.0), np.where(keep, w, 0.0)


def _ratio(xw: np.ndarray, w: np.ndarray, axis: int = -1) -> np.ndarray:
    return xw.sum(axis=axis) / w.sum(axis=axis)


def _ratio_difference(xw: np.ndarray, w: np.ndarray, yv: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
    return _ratio(xw, w, axis) - _ratio(yv, v, axis)


def _bootstrap(
    samples: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray], seed: int, confidence: float, resamples: int
) -> Interval:
    """The statistic on the items and its percentile interval (NaN bounds with fewer than two
    items, NaN throughout with no weighted item)."""
    if len(samples[0]) == 0 or samples[1].sum() == 0:
        return Interval(math.nan, math.nan, math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):  # a side (or a resample's) of weight 0 is NaN
        estimate = float(statistic(*samples))
        if len(samples[0]) < 2:
            return Interval(estimate, math.nan, math.nan)
        res = stats.bootstrap(
            samples, statistic, paired=True, vectorized=True, n_resamples=resamples, batch=_BATCH,
            confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
        )  # fmt: skip
    return Interval(estimate, float(res.confidence_interval.low), float(res.confidence_interval.high))
