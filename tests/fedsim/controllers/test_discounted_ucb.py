"""Discounted and sliding-window UCB: statistics against their formulas, UCB-like regret with a
long memory, and a faster recovery than UCB1 when the best arm switches."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.controllers import ControllerConfig, build_controller


def one_device(name: str, **overrides):
    return build_controller(ControllerConfig(name=name, **overrides), 1, np.zeros(1, dtype=np.int64), None, seed=0)


def feed(ctrl, arms: np.ndarray, rewards: np.ndarray) -> None:
    for arm, reward in zip(arms, rewards):
        ctrl.update(
            np.array([0]), ctrl.grid.rank_of([arm]), ctrl.grid.ratio_of([arm]), np.array([reward]), np.array([True])
        )


def test_discounted_statistics_match_the_formula():
    rng = np.random.default_rng(1)
    arms, rewards = rng.integers(0, 16, 40), rng.random(40)
    ctrl = one_device("discounted_ucb", discount=0.9)
    feed(ctrl, arms, rewards)
    weights = 0.9 ** np.arange(39, -1, -1)  # γ^(t − s)
    for k in range(16):
        hit = arms == k
        np.testing.assert_allclose(ctrl.counts[0, k], weights[hit].sum(), atol=1e-12)
        np.testing.assert_allclose(ctrl.sums[0, k], (weights * rewards)[hit].sum(), atol=1e-12)


def test_window_statistics_equal_a_recount_of_the_last_pulls():
    rng = np.random.default_rng(2)
    arms, rewards = rng.integers(0, 16, 57), rng.random(57)
    ctrl = one_device("sliding_window_ucb", window=10)
    feed(ctrl, arms, rewards)
    last_arms, last_rewards = arms[-10:], rewards[-10:]
    np.testing.assert_array_equal(ctrl.counts[0], np.bincount(last_arms, minlength=16))
    np.testing.assert_allclose(ctrl.sums[0], np.bincount(last_arms, weights=last_rewards, minlength=16), atol=1e-12)


@pytest.mark.parametrize(
    ("name", "memory"),
    [("discounted_ucb", {"discount": 0.9999, "ucb_c": 0.15}), ("sliding_window_ucb", {"window": 5000, "ucb_c": 0.3})],
)
def test_with_a_long_memory_regret_is_sublinear(bandit, name, memory):
    # Forgetting keeps exploring, so on a stationary problem regret is sublinear only over a
    # horizon within the memory. D-UCB's bonus is 2c·√(…): c = 0.15 is UCB1's width at 0.3.
    cumulative, uniform = bandit.regret_curves(name, 1200, **memory)
    bandit.assert_sublinear(cumulative, uniform, 300)


def recovery_rounds(
    play, name: str, seed: int, before: int = 600, after: int = 300, devices: int = 50, **overrides
) -> int:
    """Rounds after the switch until the 10-round mean regret is back within 0.05 of the
    controller's own level before it (`after` if never). Arm a (0.9) drops to 0.5 and arm b
    (0.6) rises to 0.8; the others stay in [0.1, 0.4]."""
    ctrl = build_controller(
        ControllerConfig(name=name, **overrides), devices, np.zeros(devices, dtype=np.int64), None, seed
    )
    rng, rows, k = np.random.default_rng(seed), np.arange(devices), ctrl.grid.num_arms
    first = rng.uniform(0.1, 0.4, (devices, k))
    a = rng.integers(0, k, devices)
    b = (a + 1 + rng.integers(0, k - 1, devices)) % k
    first[rows, a], first[rows, b] = 0.9, 0.6
    second = first.copy()
    second[rows, a], second[rows, b] = 0.5, 0.8
    regret = play(ctrl, lambda t: first if t < before else second, before + after, rng)
    settled = regret[before - 100 : before].mean()
    smoothed = np.convolve(regret[before:], np.ones(10) / 10, mode="valid")
    back = np.flatnonzero(smoothed <= settled + 0.05)
    return int(back[0]) if back.size else after


def test_forgetting_variants_recover_faster_than_ucb1_after_a_switch(bandit):
    seeds = (0, 1)
    ucb1 = np.mean([recovery_rounds(bandit.play, "ucb1", s, ucb_c=0.3) for s in seeds])
    discounted = np.mean([recovery_rounds(bandit.play, "discounted_ucb", s, ucb_c=0.15) for s in seeds])
    window = np.mean([recovery_rounds(bandit.play, "sliding_window_ucb", s, ucb_c=0.3) for s in seeds])
    assert discounted < 0.5 * ucb1, (discounted, ucb1)
    assert window < 0.5 * ucb1, (window, ucb1)
