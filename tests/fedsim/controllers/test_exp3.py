"""EXP3 and its FedEx update: the distribution and the weight update against the formulas,
infeasible arms at probability 0, sublinear regret."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.controllers import ControllerConfig, build_controller


def make(n: int = 2, **overrides):
    return build_controller(ControllerConfig(name="exp3", **overrides), n, np.zeros(n, dtype=np.int64), None, seed=0)


def test_probabilities_match_the_formula_and_skip_infeasible_arms():
    ctrl = make(exp3_gamma=0.2)
    rng = np.random.default_rng(0)
    ctrl.log_weights[:] = rng.normal(size=ctrl.log_weights.shape)
    ctrl.infeasible[1, [0, 5, 7]] = True
    p = ctrl.probabilities(np.array([0, 1]))
    for d in range(2):
        feasible = ~ctrl.infeasible[d]
        w = np.where(feasible, np.exp(ctrl.log_weights[d]), 0.0)
        expected = 0.8 * w / w.sum() + 0.2 * feasible / feasible.sum()
        np.testing.assert_allclose(p[d], expected, rtol=1e-12)
    assert (p[1, [0, 5, 7]] == 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_auto_gamma_is_the_anytime_tuning():
    ctrl = make()
    ctrl.pulls[:] = [0, 99]
    gamma = ctrl._gamma(np.array([0, 1]), np.array([[16], [16]]))[:, 0]
    expected = [min(1.0, math.sqrt(16 * math.log(16) / ((math.e - 1) * t))) for t in (1, 100)]
    np.testing.assert_allclose(gamma, expected)


@pytest.mark.parametrize("update", ["exp3", "fedex"])
def test_weight_update_matches_the_formula(update):
    ctrl = make(n=1, exp3_gamma=0.3, exp3_update=update, fedex_discount=0.5)
    device, rewards = np.array([0]), [0.8, 0.2, 0.6]
    lam_sum = lam_weight = 0.0
    for r in rewards:
        ranks, ratios = ctrl.choose(device, 0)
        arm, p = ctrl.grid.arm_of(ranks, ratios)[0], ctrl.chosen_prob[0]
        before = ctrl.log_weights[0].copy()
        ctrl.update(device, ranks, ratios, np.array([r]), np.array([True]))
        lam = lam_sum / lam_weight if lam_weight else 0.0
        x_hat = (r - lam) / p if update == "fedex" else r / p
        step = before.copy()
        step[arm] += 0.3 / 16 * x_hat
        np.testing.assert_allclose(ctrl.log_weights[0], step - step.max(), atol=1e-12)
        lam_sum, lam_weight = 0.5 * lam_sum + 0.5 * r, 0.5 * lam_weight + 0.5


@pytest.mark.parametrize("update", ["exp3", "fedex"])
def test_regret_is_sublinear_and_far_below_uniform(bandit, update):
    cumulative, uniform = bandit.regret_curves("exp3", 2000, exp3_update=update)
    bandit.assert_sublinear(cumulative, uniform, 500)
