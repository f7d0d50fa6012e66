"""Fixed arms: the default, one arm for all, one per profile, the nearest feasible fallback."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.controllers import ControllerConfig, build_controller


def choices(ctrl, devices=None):
    devices = np.arange(ctrl.num_devices) if devices is None else devices
    ranks, ratios = ctrl.choose(devices, 0)
    return list(zip(ranks.tolist(), ratios.tolist()))


def test_default_is_the_full_adapter_on_the_unpruned_model():
    ctrl = build_controller(ControllerConfig(name="fixed"), 3, np.zeros(3, dtype=np.int64))
    assert choices(ctrl) == [(32, 0.0)] * 3


def test_fixed_arm_for_everybody_and_profile_arms_by_name():
    cfg = ControllerConfig(name="fixed", fixed_arm=(16, 0.2), profile_arms={"phone": (4, 0.6)})
    ctrl = build_controller(cfg, 4, np.array([0, 1, 0, 1]), profile_names=["laptop", "phone"])
    assert choices(ctrl) == [(16, 0.2), (4, 0.6), (16, 0.2), (4, 0.6)]


def test_profile_arms_naming_an_unknown_profile_is_refused():
    cfg = ControllerConfig(name="fixed", profile_arms={"tablet": (4, 0.6)})
    with pytest.raises(ValueError, match=r"`profile_arms.tablet`.*known: laptop, phone"):
        build_controller(cfg, 2, np.array([0, 1]), profile_names=["laptop", "phone"])


def test_an_infeasible_fixed_arm_falls_back_to_the_nearest_feasible_one():
    cfg = ControllerConfig(name="fixed", fixed_arm=(16, 0.2), infer_infeasible=False)
    ctrl = build_controller(cfg, 1, np.zeros(1, dtype=np.int64))
    device = np.array([0])
    ctrl.update(device, np.array([16]), np.array([0.2]), np.array([0.0]), np.array([False]))
    # Neighbours at distance 1/3: (8, 0.2), (32, 0.2), (16, 0.0), (16, 0.4); the cheapest is (8, 0.2).
    assert choices(ctrl, device) == [(8, 0.2)]
    ctrl.update(device, np.array([8]), np.array([0.2]), np.array([0.0]), np.array([False]))
    assert choices(ctrl, device) == [(16, 0.4)]
