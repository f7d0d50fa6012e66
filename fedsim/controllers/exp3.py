"""EXP3 per device over the arm grid: exponential weights, for rewards that need not be stochastic.

EXP3 (Auer, Cesa-Bianchi, Freund & Schapire, "The Nonstochastic Multiarmed Bandit Problem",
SIAM Journal on Computing 32(1), 2002). Rule, for device d at its t-th pull, over its K feasible
arms with log-weights log w_k:

    p_k = (1 − γ_t)·w_k / Σ_j w_j + γ_t / K                    sample a ~ p
    x̂_a = r / p_a                                              (importance-weighted reward)
    log w_a ← log w_a + γ_t·x̂_a / K

γ_t is `exp3_gamma`, or with "auto" the anytime version of the paper's tuning
γ_t = min(1, √(K ln K / ((e − 1)·t))) (Corollary 3.2 with the horizon replaced by t), so the
uniform exploration fades and the regret grows as √t instead of linearly.

FedEx option (`exp3_update = "fedex"`): Khodak, Tu, Li, Li, Balcan, Smith & Talwalkar, "Federated
Hyperparameter Tuning: Challenges, Baselines, and Connections to Weight-Sharing", NeurIPS 2021,
arXiv:2106.04502. FedEx updates its hyperparameter distribution with an importance-weighted,
baseline-corrected gradient; here, as a reward:

    x̂_a = (r − λ_d) / p_a        λ_d ← β·λ_d + (1 − β)·r    (bias-corrected: divided by 1 − β^n)

λ_d is the device's discounted mean reward (β = `fedex_discount`; 0 before its first pull).
Subtracting λ keeps the estimate unbiased up to a constant shared by all arms (which the softmax
ignores) and cuts its variance when rewards sit far from 0. Where this departs from FedEx: FedEx
steps η_t = √(2 ln K)/(‖∇̃‖_∞·√t) on a gradient aggregated over the round's clients; with one
observation per device that normalisation would cancel the importance weight, so the step stays
EXP3's γ_t / K (with the γ_t/K floor on p_a, |γ_t·x̂/K| ≤ |r − λ|).

Infeasible arms get p = 0 and K counts the feasible ones. The client does nothing special.
"""

from __future__ import annotations

import math

import numpy as np

from fedsim.controllers.base import Controller


class Exp3(Controller):
    """EXP3 (or its FedEx-corrected update) with per-device log-weights."""

    name = "exp3"
    state_keys = (
        *Controller.state_keys,
        "log_weights",
        "pulls",
        "chosen",
        "chosen_prob",
        "baseline",
        "baseline_weight",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n, k = self.counts.shape
        self.log_weights = np.zeros((n, k))  # (N, K)
        self.pulls = np.zeros(n, dtype=np.int64)  # (N,) t − 1
        self.chosen = np.full(n, -1, dtype=np.int64)  # (N,) arm sampled at the last choose, -1 = none
        self.chosen_prob = np.zeros(n)  # (N,) its probability then
        self.baseline = np.zeros(n)  # (N,) FedEx: discounted reward sum
        self.baseline_weight = np.zeros(n)  # (N,) FedEx: discounted count (bias correction)

    def probabilities(self, devices: np.ndarray) -> np.ndarray:
        """(n, K) the sampling distribution of each device (0 on infeasible and avoided arms)."""
        feasible = ~self._blocked(devices)
        feasible[~feasible.any(axis=1)] = True  # exhausted: choose() overrides; avoid 0/0
        logw = np.where(feasible, self.log_weights[devices], -np.inf)
        w = np.exp(logw - logw.max(axis=1, keepdims=True))  # (n, K)
        k = feasible.sum(axis=1, keepdims=True)
        gamma = self._gamma(devices, k)
        return (1.0 - gamma) * w / w.sum(axis=1, keepdims=True) + gamma * feasible / k

    def _gamma(self, devices: np.ndarray, k: np.ndarray) -> np.ndarray:
        """(n, 1) γ_t of each device given its number k (n, 1) of feasible arms."""
        if self.config.exp3_gamma != "auto":
            return np.full(k.shape, float(self.config.exp3_gamma))
        t = (self.pulls[devices] + 1)[:, None]
        return np.minimum(1.0, np.sqrt(k * np.log(np.maximum(k, 1)) / ((math.e - 1.0) * t)))

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        p = self.probabilities(devices)
        cdf = p.cumsum(axis=1)
        u = self.rng.random(len(devices)) * cdf[:, -1]
        arms = np.minimum((cdf <= u[:, None]).sum(axis=1), p.shape[1] - 1)  # first k with cdf_k > u
        self.chosen[devices], self.chosen_prob[devices] = arms, p[np.arange(len(devices)), arms]
        return arms

    def _learn(self, devices: np.ndarray, points: np.ndarray, rewards: np.ndarray) -> None:
        rows = np.arange(len(devices))
        current = self.probabilities(devices)
        p = np.where(self.chosen[devices] == points, self.chosen_prob[devices], current[rows, points])
        k = (~self.infeasible[devices]).sum(axis=1, keepdims=True).clip(min=1)
        step = (self._gamma(devices, k) / k)[:, 0]
        if self.config.exp3_update == "fedex":
            weight = self.baseline_weight[devices]
            lam = np.divide(self.baseline[devices], weight, out=np.zeros(len(devices)), where=weight > 0)
            x_hat = (rewards - lam) / p
            beta = self.config.fedex_discount
            self.baseline[devices] = beta * self.baseline[devices] + (1.0 - beta) * rewards
            self.baseline_weight[devices] = beta * weight + (1.0 - beta)
        else:
            x_hat = rewards / p
        self.log_weights[devices, points] += step * x_hat
        self.log_weights[devices] -= self.log_weights[devices].max(axis=1, keepdims=True)
        self.pulls[devices] += 1
        self.chosen[devices] = -1
        super()._learn(devices, points, rewards)
