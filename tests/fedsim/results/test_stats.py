"""Intervals for comparisons, against direct computations: the t interval by its formula, the
bootstrap against the mean it resamples and the normal approximation of its width."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedsim.results.stats import (
    Interval,
    bootstrap_mean,
    bootstrap_mean_difference,
    distinguishable,
    paired_t_interval,
    t_interval,
)

# Student t quantiles t_{0.975, df} from a table
T_975 = {2: 4.302652729749462, 4: 2.7764451051977934}


@pytest.mark.parametrize("values", [[0.31, 0.42, 0.38], [1.0, 2.0, 4.0, 8.0, 16.0]])
def test_t_interval_is_mean_plus_minus_t_times_standard_error(values: list[float]) -> None:
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975[n - 1] * s / math.sqrt(n)

    iv = t_interval(values)

    assert iv.estimate == pytest.approx(mean)
    assert (iv.lo, iv.hi) == (pytest.approx(mean - half), pytest.approx(mean + half))


def test_t_interval_is_undefined_with_one_value_and_a_point_when_all_agree() -> None:
    one = t_interval([0.5])
    assert one.estimate == 0.5 and not one.defined and not one.excludes_zero
    assert t_interval([0.25, 0.25, 0.25]) == Interval(0.25, 0.25, 0.25)
    assert t_interval([0.5, math.nan, 0.7]) == t_interval([0.5, 0.7])  # a seed that did not reach the target
    assert not t_interval([]).defined and math.isnan(t_interval([]).estimate)


def test_paired_t_interval_is_scipys_ttest_rel_interval() -> None:
    a, b = [0.50, 0.62, 0.58, 0.55], [0.41, 0.50, 0.52, 0.49]
    expected = stats.ttest_rel(a, b).confidence_interval(0.95)

    iv = paired_t_interval(a, b)

    assert iv.estimate == pytest.approx(np.mean(np.subtract(a, b)))
    assert (iv.lo, iv.hi) == (pytest.approx(expected.low), pytest.approx(expected.high))
    with pytest.raises(ValueError, match="same length"):
        paired_t_interval([1.0, 2.0], [1.0])


def _correct(n: int, rate: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < rate


def test_bootstrap_mean_contains_the_mean_and_narrows_with_more_examples() -> None:
    widths = {}
    for n in (100, 1600):
        correct = _correct(n, 0.4, seed=n)
        iv = bootstrap_mean(correct, seed=0)
        p = correct.mean()
        assert iv.estimate == pytest.approx(p) and iv.lo < p < iv.hi
        widths[n] = iv.hi - iv.lo
        normal = 2 * 1.959964 * math.sqrt(p * (1 - p) / n)  # the normal approximation's width
        assert widths[n] == pytest.approx(normal, rel=0.15)
    assert widths[1600] < 0.35 * widths[100]  # ~1/4: the width goes as 1/√n


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    loss = np.random.default_rng(1).uniform(1.0, 3.0, 300)

    assert bootstrap_mean(loss, seed=7) == bootstrap_mean(loss, seed=7)
    assert bootstrap_mean(loss, seed=7) != bootstrap_mean(loss, seed=8)  # the resamples come from the seed


def test_weighted_bootstrap_estimates_the_token_weighted_mean() -> None:
    rng = np.random.default_rng(2)
    loss, tokens = rng.uniform(1.0, 3.0, 500), rng.integers(1, 20, 500)

    iv = bootstrap_mean(loss, tokens, seed=0)

    assert iv.estimate == pytest.approx((loss * tokens).sum() / tokens.sum())
    assert iv.lo < iv.estimate < iv.hi
    unweighted = bootstrap_mean(loss, seed=0).estimate
    assert unweighted == pytest.approx(loss.mean()) and unweighted != pytest.approx(iv.estimate)


def test_paired_difference_sees_what_an_unpaired_one_misses() -> None:
    # the strategy gets right every example the baseline does, plus about 4 % more: the two share most
    # of their variation, which pairing cancels
    base = _correct(1000, 0.5, seed=3)
    better = base | _correct(1000, 0.08, seed=4)
    diff = better.mean() - base.mean()

    paired = bootstrap_mean_difference(better, base, seed=0)
    alone = [bootstrap_mean(x, seed=0) for x in (better, base)]

    assert paired.estimate == pytest.approx(diff) and paired.lo > 0
    unpaired = math.hypot(*(iv.hi - iv.lo for iv in alone))  # width of an unpaired difference's interval
    assert paired.hi - paired.lo < 0.4 * unpaired
    assert alone[0].lo < alone[1].hi  # separately their intervals overlap


def test_bootstrap_of_identical_results_is_the_point_zero() -> None:
    base = _correct(200, 0.3, seed=5)

    iv = bootstrap_mean_difference(base, base.copy(), seed=0)

    assert iv == Interval(0.0, 0.0, 0.0) and not iv.excludes_zero


def test_weight_zero_items_do_not_count() -> None:
    loss = np.array([2.0, math.nan, 4.0, 1.0])
    tokens = np.array([1, 0, 3, 0])  # an example the truncation left without response tokens

    assert bootstrap_mean(loss, tokens, seed=0).estimate == pytest.approx((2.0 + 12.0) / 4)


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ((Interval(0.1, 0.05, 0.15), Interval(0.1, 0.07, 0.13)), True),  # both exclude 0
        ((Interval(0.1, -0.05, 0.25), Interval(0.1, 0.07, 0.13)), False),  # seeds cannot tell
        ((Interval(0.1, 0.05, 0.15), Interval(0.1, -0.01, 0.2)), False),  # the examples cannot tell
        ((Interval(0.1, math.nan, math.nan), Interval(0.1, 0.07, 0.13)), True),  # one seed: the bootstrap alone
        ((Interval(-0.1, -0.2, -0.05), Interval(math.nan, math.nan, math.nan)), True),  # no per-example results
        ((Interval(0.1, math.nan, math.nan), Interval(math.nan, math.nan, math.nan)), False),  # nothing defined
    ],
)
def test_a_difference_is_real_only_when_every_defined_interval_excludes_zero(
    intervals: tuple[Interval, ...], expected: bool
) -> None:
    assert distinguishable(*intervals) is expected
