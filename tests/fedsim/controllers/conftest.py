"""Synthetic bandit problems for the controller tests: known means per (device, arm), seeded.

Every device is an independent problem (rows of one (N, K) matrix), so one run of a controller
over N devices averages its regret over N problems. Rewards are Gaussian around the means with
σ = 0.1; the UCB-type controllers are run with c = 0.3 (3σ), the width the noise calls for: at
their default c = 1 (any reward in [0, 1]) they are still exploring 16 arms after these horizons.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from fedsim.controllers import Controller, ControllerConfig, build_controller

NOISE = 0.1
UCB_C = 0.3
BEST = 0.9


def grid_means(
    num_devices: int, num_arms: int, rng: np.random.Generator, groups: np.ndarray | None = None
) -> np.ndarray:
    """(N, K) means: one best arm at 0.9 per row, the others uniform in [0.1, 0.7] (gaps >= 0.2).
    Devices with the same `groups` value share a row."""
    groups = np.arange(num_devices) if groups is None else groups
    rows = int(groups.max()) + 1
    means = rng.uniform(0.1, 0.7, (rows, num_arms))
    means[np.arange(rows), rng.integers(0, num_arms, rows)] = BEST
    return means[groups]


def play(
    ctrl: Controller,
    means: np.ndarray | Callable[[int], np.ndarray],
    rounds: int,
    rng: np.random.Generator,
    noise: float = NOISE,
) -> np.ndarray:
    """(rounds,) regret per round, averaged over devices; every device plays every round.
    `means` is (N, K) over the grid arms, or a function of the round giving it."""
    devices = np.arange(ctrl.num_devices)
    regret = np.zeros(rounds)
    for t in range(rounds):
        m = means(t) if callable(means) else means
        ranks, ratios = ctrl.choose(devices, t)
        mu = m[devices, ctrl.grid.arm_of(ranks, ratios)]
        regret[t] = (m.max(axis=1) - mu).mean()
        ctrl.update(
            devices, ranks, ratios, mu + noise * rng.standard_normal(len(devices)), np.ones(len(devices), dtype=bool)
        )
    return regret


def regret_curves(
    name: str, rounds: int, seeds: tuple[int, ...] = (0, 1), devices: int = 50, profiles: int | None = None, **overrides
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative regret (rounds,) of controller `name` and of a uniform-random policy, averaged
    over seeds × devices. With `profiles`, devices of a profile share their means."""
    ours, uniform = [], []
    for seed in seeds:
        groups = np.arange(devices) % profiles if profiles else np.zeros(devices, dtype=np.int64)
        ctrl = build_controller(ControllerConfig(name=name, **overrides), devices, groups, None, seed)
        rng = np.random.default_rng(1000 + seed)
        means = grid_means(devices, ctrl.grid.num_arms, rng, groups if profiles else None)
        ours.append(np.cumsum(play(ctrl, means, rounds, rng)))
        uniform.append(np.cumsum(np.full(rounds, (means.max(axis=1) - means.mean(axis=1)).mean())))
    return np.mean(ours, axis=0), np.mean(uniform, axis=0)


def sparse_regret(
    name: str,
    seeds: tuple[int, ...] = (0, 1, 2),
    devices: int = 60,
    profiles: int | tuple[int, ...] = 3,
    sampled: int = 6,
    rounds: int = 200,
    jitter: float = 0.03,
    round_max: bool = False,
    **overrides,
) -> float:
    """Cumulative regret after `rounds`, averaged over seeds, of a federated-style run: `sampled`
    of `devices` devices a round (each pulled ~rounds·sampled/devices times, about once per arm),
    devices of a profile sharing their means up to a small per-device jitter (σ = `jitter`).
    `profiles`: how many, of equal size, or each one's size (summing to `devices`).
    `round_max`: rewards divided by the round's largest, as the reward module's default does."""
    totals = []
    for seed in seeds:
        groups = (
            np.arange(devices) % profiles
            if isinstance(profiles, int)
            else np.repeat(np.arange(len(profiles)), profiles)
        )
        ctrl = build_controller(ControllerConfig(name=name, **overrides), devices, groups, None, seed)
        rng = np.random.default_rng(1000 + seed)
        means = grid_means(devices, ctrl.grid.num_arms, rng, groups) + jitter * rng.standard_normal(
            (devices, ctrl.grid.num_arms)
        )
        total = 0.0
        for t in range(rounds):
            chosen = np.sort(rng.choice(devices, sampled, replace=False))
            ranks, ratios = ctrl.choose(chosen, t)
            mu = means[chosen, ctrl.grid.arm_of(ranks, ratios)]
            total += (means[chosen].max(axis=1) - mu).sum()
            reward = mu + NOISE * rng.standard_normal(sampled)
            ctrl.update(
                chosen, ranks, ratios, reward / reward.max() if round_max else reward, np.ones(sampled, dtype=bool)
            )
        totals.append(total)
    return float(np.mean(totals))


def assert_sublinear(cumulative: np.ndarray, uniform: np.ndarray, horizon: int) -> None:
    """Regret at 4T under 2.5× regret at T (linear growth would be 4×), and under half a
    uniform-random policy's."""
    at_t, at_4t = cumulative[horizon - 1], cumulative[4 * horizon - 1]
    assert at_4t < 2.5 * at_t, f"regret grew from {at_t:.1f} at T = {horizon} to {at_4t:.1f} at 4T: not sublinear"
    assert at_4t < 0.5 * uniform[4 * horizon - 1], (
        f"regret {at_4t:.1f} at 4T is not far below uniform's {uniform[4 * horizon - 1]:.1f}"
    )


@pytest.fixture
def bandit() -> SimpleNamespace:
    return SimpleNamespace(
        grid_means=grid_means,
        play=play,
        regret_curves=regret_curves,
        sparse_regret=sparse_regret,
        assert_sublinear=assert_sublinear,
        NOISE=NOISE,
        UCB_C=UCB_C,
        BEST=BEST,
    )
