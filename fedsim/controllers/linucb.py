"""LinUCB shared across devices: a new device starts from its peers' estimate.

LinUCB with disjoint linear models (Li, Chu, Langford & Schapire, "A Contextual-Bandit Approach
to Personalized News Article Recommendation", WWW 2010, arXiv:1003.0146, Algorithm 1). Rule, for
a device with context x ∈ R^d in sharing group g, over arms k:

    A_{g,k} = λI + Σ x_s x_sᵀ          b_{g,k} = Σ r_s x_s      (pulls s of arm k in group g)
    θ_{g,k} = A_{g,k}⁻¹ b_{g,k}
    a = argmax_k  θ_{g,k}ᵀx + α·√(xᵀ A_{g,k}⁻¹ x)

Sharing (`linucb_share`): "profile" keeps one model per (device profile, arm), so every device
of a profile learns for the others and a device never seen before starts from its peers'
estimate; "global" keeps one model per arm for the whole fleet, and devices differ only by
their features.

Context: x = [1, z(f_1), …, z(f_m)], the device features (`features`, e.g. log speed, log memory,
log bandwidth) standardised over the fleet, with the columns that are constant over the fleet
dropped (the leading 1 carries them). All-ones features therefore give x = [1]: a shared mean
per (profile, arm) with a confidence bonus α/√(λ + n).

α is `linucb_alpha` (1.0; the paper's 1 + √(ln(2/δ)/2) is 2.36 at δ = 0.05 and known to
over-explore in practice), λ is `linucb_ridge` (1.0). A is accumulated and inverted per
(group, arm) after each update (G·K inversions of d × d, independent of the fleet size). The
client does nothing special.
"""

from __future__ import annotations

import numpy as np

from fedsim.controllers.base import Controller


def context(features: np.ndarray) -> np.ndarray:
    """(N, d) x = [1, standardised non-constant feature columns] of each device."""
    mean, std = features.mean(axis=0), features.std(axis=0)
    varying = std > 1e-12 * (1.0 + np.abs(mean))
    z = (features[:, varying] - mean[varying]) / std[varying]
    return np.hstack([np.ones((features.shape[0], 1)), z])


class LinUCB(Controller):
    """Disjoint LinUCB, one model per (sharing group, arm)."""

    name = "linucb"
    state_keys = (*Controller.state_keys, "A", "b")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.context = context(self.features)  # (N, d)
        shared = self.config.linucb_share == "profile"
        self.group = self.profiles if shared else np.zeros(self.num_devices, dtype=np.int64)  # (N,)
        num_groups, k, d = int(self.group.max(initial=0)) + 1, self.counts.shape[1], self.context.shape[1]
        self.A = np.tile(self.config.linucb_ridge * np.eye(d), (num_groups, k, 1, 1))  # (G, K, d, d)
        self.b = np.zeros((num_groups, k, d))  # (G, K, d)
        self._refresh()

    def _refresh(self) -> None:
        self.A_inv = np.linalg.inv(self.A)  # (G, K, d, d)
        self.theta = np.einsum("gkde,gke->gkd", self.A_inv, self.b)  # (G, K, d)

    def _after_load(self) -> None:
        self._refresh()

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        return self._pick(devices, self._scores(devices, self.config.linucb_alpha))

    def _exploit(self, devices: np.ndarray, round: int) -> np.ndarray:
        """The arm with the best estimate θᵀx, the shared model's (not the device's own means)."""
        return self._pick(devices, self._scores(devices, 0.0))

    def _scores(self, devices: np.ndarray, alpha: float) -> np.ndarray:
        """(n, K) θᵀx + α·√(xᵀA⁻¹x) of each device's arms."""
        groups = self.group[devices]
        scores = np.empty((len(devices), self.counts.shape[1]))
        for g in np.unique(groups):  # a loop over profiles, not devices
            rows = groups == g
            x = self.context[devices[rows]]  # (m, d)
            var = np.einsum("md,kde,me->mk", x, self.A_inv[g], x)  # (m, K)
            scores[rows] = x @ self.theta[g].T + alpha * np.sqrt(np.maximum(var, 0.0))
        return scores

    def _learn(self, devices: np.ndarray, points: np.ndarray, rewards: np.ndarray) -> None:
        groups, x = self.group[devices], self.context[devices]  # (n,), (n, d)
        np.add.at(self.A, (groups, points), x[:, :, None] * x[:, None, :])  # devices of a group may share an arm
        np.add.at(self.b, (groups, points), rewards[:, None] * x)
        self._refresh()
        super()._learn(devices, points, rewards)
