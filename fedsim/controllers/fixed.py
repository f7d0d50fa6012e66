"""Fixed arms: the non-adaptive baselines the bandits are measured against.

Rule: device d in profile g plays a* = `profile_arms[g]` if given, else `fixed_arm`, else the
grid's (max rank, min ratio), i.e. the full adapter on the unpruned model, which is what a run
without a controller trains. Nothing is learned (the statistics are kept for reporting).

If a* does not fit the device, it plays the feasible arm nearest to a* in the grid's unit
coordinates (L1 distance of (u_rank, u_ratio), see `arms`), the cheaper one on a tie: the
baseline stays as close to its setting as the device allows, and never repeats an arm that ran
out of memory. The client does nothing special.
"""

from __future__ import annotations

import numpy as np

from fedsim.controllers.base import Controller


class Fixed(Controller):
    """One arm for everybody, or one per device profile."""

    name = "fixed"
    uses_rewards = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        grid, cfg = self.grid, self.config
        rank, ratio = cfg.fixed_arm if cfg.fixed_arm is not None else (grid.ranks[-1], grid.ratios[0])
        self.target = np.full(
            self.num_devices, grid.arm_of(np.array([rank]), np.array([ratio]))[0], dtype=np.int64
        )  # (N,)
        for name, (r, p) in cfg.profile_arms.items():  # a loop over profiles
            if name not in self.profile_names:
                raise ValueError(
                    f"`profile_arms.{name}`: no such device profile; known: {', '.join(self.profile_names)}"
                )
            self.target[self.profiles == self.profile_names.index(name)] = grid.arm_of(np.array([r]), np.array([p]))[0]
        u_rank, u_ratio = grid.rank_coord(self.point_ranks), grid.ratio_coord(self.point_ratios)
        self._coords = np.stack([u_rank, u_ratio], axis=1)  # (K, 2)
        self._cheapness = 1e-6 * (u_rank - u_ratio)  # tie-break towards small rank, large ratio

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        target = self._coords[self.target[devices]]  # (n, 2)
        distance = np.abs(self._coords[None, :, :] - target[:, None, :]).sum(axis=2)  # (n, K)
        return self._pick(devices, -(distance + self._cheapness))
