"""Gaussian Thompson sampling: the posterior it samples from, sublinear regret."""

from __future__ import annotations

import numpy as np

from fedsim.controllers import ControllerConfig, build_controller


def test_samples_follow_the_gaussian_posterior():
    # 2,000 devices with the same statistics: the sampled θ of the chosen arm is the max of
    # draws from N(m_k, 1/τ_k); with one arm far ahead it is that arm, and otherwise the
    # choice frequencies match a direct simulation of the posterior.
    n = 2000
    cfg = ControllerConfig(name="thompson", ranks=(4, 8), ratios=(0.0,))
    ctrl = build_controller(cfg, n, np.zeros(n, dtype=np.int64), None, seed=0)
    ctrl.counts[:] = [3.0, 5.0]
    ctrl.sums[:] = [3 * 0.6, 5 * 0.5]
    arms = ctrl.grid.arm_of(*ctrl.choose(np.arange(n), 0))
    precision = 1 / 1.0**2 + ctrl.counts[0] / 0.5**2
    mean = (0.5 / 1.0**2 + ctrl.sums[0] / 0.5**2) / precision
    rng = np.random.default_rng(1)
    reference = (mean + rng.standard_normal((200_000, 2)) / np.sqrt(precision)).argmax(axis=1)
    assert abs((arms == 0).mean() - (reference == 0).mean()) < 0.04


def test_regret_is_sublinear_and_far_below_uniform(bandit):
    cumulative, uniform = bandit.regret_curves("thompson", 1200)
    bandit.assert_sublinear(cumulative, uniform, 300)
