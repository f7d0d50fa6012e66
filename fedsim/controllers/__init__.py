"""Bandit controllers: per device and round, the server picks an arm = (LoRA rank, pruning ratio)
and learns which one serves that device best, as FedSpine (Yao et al., 2025, arXiv:2501.02438) does.

Pure numpy, vectorised over devices (10,000 devices are rows of (N, K) arrays), deterministic
given the seed, and checkpointable (`state_dict` → dict of arrays, the RNG state included).

- `arms`: the (rank, ratio) grid, arm index ↔ (rank, ratio), unit coordinates.
- `base`: `Controller`, the choose / update / state_dict interface and shared bookkeeping,
  including `pool = "profile"`: a device's statistics shrunk toward its profile peers'.
- `ucb1`, `discounted_ucb` (discounted and sliding-window), `exp3` (optionally FedEx's update),
  `thompson`, `linucb` (shared per profile or over device features), `fixed` (baselines),
  `sucb` (FedSpine's default: HOO-style smooth UCB over the continuous box).
- `reward`: one round's `Observations` → rewards (progress, straggler factor, normalisation,
  floor, infeasible penalty).
- `pace`: each device's observed pace, to price and screen arms it has not tried.
- `config`: `ControllerConfig` (with its `RewardConfig`), validated field by field.

    ctrl = build_controller(config, num_devices, profiles, features, seed)
    ranks, ratios = ctrl.choose(devices, round)
    r, state = rewards(observations, config.reward, state)
    ctrl.update(devices, ranks, ratios, r, observations.feasible)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.config.controller import ControllerConfig, ControllerConfigError, RewardConfig, validate_controller
from fedsim.controllers.arms import ArmGrid
from fedsim.controllers.base import Controller
from fedsim.controllers.discounted_ucb import DiscountedUCB, SlidingWindowUCB
from fedsim.controllers.exp3 import Exp3
from fedsim.controllers.fixed import Fixed
from fedsim.controllers.linucb import LinUCB
from fedsim.controllers.reward import Observations, RewardState, rewards
from fedsim.controllers.sucb import SmoothUCB
from fedsim.controllers.thompson import GaussianThompson
from fedsim.controllers.ucb1 import UCB1

CONTROLLERS: dict[str, type[Controller]] = {
    cls.name: cls for cls in (DiscountedUCB, Exp3, Fixed, GaussianThompson, LinUCB, SlidingWindowUCB, SmoothUCB, UCB1)
}


def build_controller(
    config: ControllerConfig,
    num_devices: int,
    profiles: np.ndarray,
    features: np.ndarray | None = None,
    seed: int = 0,
    *,
    profile_names: Sequence[str] | None = None,
) -> Controller:
    """The controller `config.name` for `num_devices` devices: `profiles` (N,) the profile index
    of each device, `features` (N, d) what is known of each (None: nothing, all ones),
    `profile_names` the name of each profile index (for `profile_arms`; default "0", "1", ...)."""
    return CONTROLLERS[config.name](config, num_devices, profiles, features, seed, profile_names)


__all__ = [
    "CONTROLLERS",
    "UCB1",
    "ArmGrid",
    "Controller",
    "ControllerConfig",
    "ControllerConfigError",
    "DiscountedUCB",
    "Exp3",
    "Fixed",
    "GaussianThompson",
    "LinUCB",
    "Observations",
    "RewardConfig",
    "RewardState",
    "SlidingWindowUCB",
    "SmoothUCB",
    "build_controller",
    "rewards",
    "validate_controller",
]
