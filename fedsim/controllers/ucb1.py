"""UCB1 per device over the arm grid: the stationary baseline of the UCB family.

UCB1 (Auer, Cesa-Bianchi & Fischer, "Finite-time Analysis of the Multiarmed Bandit Problem",
Machine Learning 47, 2002). Rule, for device d at its t-th pull (t = Σ_k n_k):

    a = argmax_k  μ̂_k + c·√(2 ln t / n_k)          (n_k = 0 → +∞: every arm is tried once first)

μ̂_k: mean reward of arm k on device d, n_k: its pulls, c: `ucb_c` (the width of the reward range;
1 for the reward module's normalised rewards, as in the paper's [0, 1] setting). Regret O(K log T)
on a stationary problem; it adapts slowly when the best arm changes (see `discounted_ucb`).

The client does nothing special: it trains with the rank and pruning ratio it is sent and reports
what the reward needs (`fedsim.controllers.reward.Observations`).
"""

from __future__ import annotations

import numpy as np

from fedsim.controllers.base import Controller


def ucb_scores(counts: np.ndarray, sums: np.ndarray, c: float) -> np.ndarray:
    """(n, K) UCB1 index of every arm from pull counts and reward sums (n, K); +∞ if unpulled."""
    t = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)  # (n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        index = sums / counts + c * np.sqrt(2.0 * np.log(t) / counts)
    return np.where(counts > 0, index, np.inf)


class UCB1(Controller):
    """UCB1 on each device's own pulls."""

    name = "ucb1"

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        return self._pick(devices, ucb_scores(*self._statistics(devices), self.config.ucb_c))
