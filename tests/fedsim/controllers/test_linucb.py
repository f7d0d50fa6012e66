"""LinUCB: the context, the ridge statistics, a new device starting from its peers' estimate,
sublinear regret when a profile's devices share their means."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.controllers import ControllerConfig, build_controller
from fedsim.controllers.linucb import context


def test_context_is_a_bias_and_the_standardised_varying_features():
    features = np.array([[1.0, 5.0, 2.0], [1.0, 5.0, 4.0], [1.0, 5.0, 6.0]])
    x = context(features)
    z = (features[:, 2] - 4.0) / np.std([2.0, 4.0, 6.0])
    np.testing.assert_allclose(x, np.stack([np.ones(3), z], axis=1))
    assert context(np.ones((4, 3))).shape == (4, 1)


def test_statistics_are_the_ridge_sums_per_profile_and_arm():
    rng = np.random.default_rng(0)
    profiles, features = np.array([0, 0, 1]), rng.normal(size=(3, 2))
    ctrl = build_controller(ControllerConfig(name="linucb", linucb_ridge=2.0), 3, profiles, features, seed=0)
    ranks, ratios, rewards = np.array([8, 8, 8]), np.array([0.2, 0.2, 0.2]), np.array([0.3, 0.9, 0.5])
    ctrl.update(np.arange(3), ranks, ratios, rewards, np.ones(3, dtype=bool))
    arm, x = ctrl.grid.arm_of(ranks[:1], ratios[:1])[0], context(features)
    np.testing.assert_allclose(ctrl.A[0, arm], 2.0 * np.eye(3) + x[0:1].T @ x[0:1] + x[1:2].T @ x[1:2])
    np.testing.assert_allclose(ctrl.b[0, arm], 0.3 * x[0] + 0.9 * x[1])
    np.testing.assert_allclose(ctrl.A[1, arm], 2.0 * np.eye(3) + x[2:3].T @ x[2:3])
    np.testing.assert_allclose(ctrl.theta[0, arm], np.linalg.solve(ctrl.A[0, arm], ctrl.b[0, arm]))


@pytest.mark.parametrize(("share", "exploring"), [("profile", 0), ("global", 2)])
def test_a_new_device_picks_its_peers_best_arm_at_once(bandit, share, exploring):
    # Profiles 0 and 1 (20 devices each) have different best arms. After the peers have played,
    # two devices that never played (one per profile) play their profile's best arm from their
    # first round on. With share = global the features alone (one column telling the profiles
    # apart) carry it; an arm the peers of its profile rarely tried is uncertain at its context,
    # so the new device may check up to `exploring` such arms first.
    peers, n = 40, 42
    profiles = np.r_[np.arange(peers) % 2, 0, 1]
    features = np.stack([np.ones(n), profiles.astype(float)], axis=1)
    ctrl = build_controller(ControllerConfig(name="linucb", linucb_share=share), n, profiles, features, seed=0)
    rng = np.random.default_rng(3)
    means = bandit.grid_means(n, ctrl.grid.num_arms, rng, groups=profiles)
    bandit.play(ControllerView(ctrl, np.arange(peers)), means[:peers], 60, rng)
    new, best, chosen = np.array([40, 41]), means[[40, 41]].argmax(axis=1), []
    for t in range(60, 66):
        ranks, ratios = ctrl.choose(new, t)
        chosen.append(ctrl.grid.arm_of(ranks, ratios))
        ctrl.update(
            new, ranks, ratios, means[new, chosen[-1]] + bandit.NOISE * rng.standard_normal(2), np.ones(2, dtype=bool)
        )
    np.testing.assert_array_equal(np.stack(chosen[exploring:]), np.tile(best, (6 - exploring, 1)))


class ControllerView:
    """A controller restricted to some of its devices, renumbered 0..m−1 (for `play`)."""

    def __init__(self, ctrl, devices: np.ndarray) -> None:
        self.ctrl, self.devices, self.num_devices, self.grid = ctrl, devices, len(devices), ctrl.grid

    def choose(self, devices, round):
        return self.ctrl.choose(self.devices[devices], round)

    def update(self, devices, *args):
        self.ctrl.update(self.devices[devices], *args)


def test_regret_is_sublinear_when_profiles_share_means(bandit):
    cumulative, uniform = bandit.regret_curves("linucb", 1200, profiles=10)
    bandit.assert_sublinear(cumulative, uniform, 300)
