"""UCB for a changing device: discounted UCB and sliding-window UCB, per device over the grid.

A device's best arm drifts: the loss improvements shrink as training converges, its load and
network change. Garivier & Moulines ("On Upper-Confidence Bound Policies for Switching Bandit
Problems", ALT 2011; arXiv:0805.3415) forget old pulls. For device d at its t-th pull, with
I_s its arm and X_s its reward at pull s:

Discounted UCB (`discounted_ucb`), discount γ:

    N_t(γ, k) = Σ_{s≤t} γ^(t−s)·1{I_s = k}          X̄_t(γ, k) = Σ_{s≤t} γ^(t−s)·X_s·1{I_s = k} / N_t(γ, k)
    n_t(γ) = Σ_k N_t(γ, k)
    a = argmax_k  X̄_t(γ, k) + 2c·√(ξ·ln n_t(γ) / N_t(γ, k))

Sliding-window UCB (`sliding_window_ucb`), window τ:

    N_t(τ, k) = Σ_{s=t−τ+1}^{t} 1{I_s = k}           X̄_t(τ, k) = window mean of arm k
    a = argmax_k  X̄_t(τ, k) + c·√(ξ·ln min(t, τ) / N_t(τ, k))

An arm with N = 0 scores +∞. c is `ucb_c` (the paper's reward bound B), ξ is `xi` (> 1/2 in the
paper's bounds), γ is `discount`, τ is `window`.

Time is the device's own pulls, not server rounds: a device sampled once in a hundred rounds
keeps what it learned (its environment is the device, which a round it sat out did not change).
`counts` and `sums` hold N and X̄·N (discounted, or over the window); the window keeps each
device's last τ (arm, reward) in a ring buffer (N, τ).

The client does nothing special (see `ucb1`).
"""

from __future__ import annotations

import numpy as np

from fedsim.controllers.base import Controller


class DiscountedUCB(Controller):
    """D-UCB: statistics discounted by γ at each pull of the device."""

    name = "discounted_ucb"

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        counts, sums = self._statistics(devices)  # (n, K)
        n = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            index = sums / counts + 2.0 * self.config.ucb_c * np.sqrt(self.config.xi * np.log(n) / counts)
        return self._pick(devices, np.where(counts > 0, index, np.inf))

    def _learn(self, devices: np.ndarray, points: np.ndarray, rewards: np.ndarray) -> None:
        self.counts[devices] *= self.config.discount
        self.sums[devices] *= self.config.discount
        super()._learn(devices, points, rewards)


class SlidingWindowUCB(Controller):
    """SW-UCB: statistics over the device's last τ pulls."""

    name = "sliding_window_ucb"
    state_keys = (*Controller.state_keys, "history_arm", "history_reward", "cursor", "pulls")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tau = self.config.window
        self.history_arm = np.full((self.num_devices, tau), -1, dtype=np.int64)  # (N, τ), -1 = empty
        self.history_reward = np.zeros((self.num_devices, tau))  # (N, τ)
        self.cursor = np.zeros(self.num_devices, dtype=np.int64)  # (N,) next slot to overwrite
        self.pulls = np.zeros(self.num_devices, dtype=np.int64)  # (N,) t

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        counts, sums = self._statistics(devices)
        horizon = np.maximum(
            counts.sum(axis=1, keepdims=True), 1.0
        )  # min(t, τ): the pulls in the window (pooled ones too)
        with np.errstate(divide="ignore", invalid="ignore"):
            index = sums / counts + self.config.ucb_c * np.sqrt(self.config.xi * np.log(horizon) / counts)
        return self._pick(devices, np.where(counts > 0, index, np.inf))

    def _learn(self, devices: np.ndarray, points: np.ndarray, rewards: np.ndarray) -> None:
        slot = self.cursor[devices]
        old, old_reward = self.history_arm[devices, slot], self.history_reward[devices, slot]
        leaving = old >= 0  # the pull that drops out of the window
        d, k = devices[leaving], old[leaving]
        self.counts[d, k] -= 1.0
        self.sums[d, k] = np.where(self.counts[d, k] > 0, self.sums[d, k] - old_reward[leaving], 0.0)  # no drift at 0
        self.history_arm[devices, slot], self.history_reward[devices, slot] = points, rewards
        super()._learn(devices, points, rewards)
        self.cursor[devices] = (slot + 1) % self.config.window
        self.pulls[devices] += 1
