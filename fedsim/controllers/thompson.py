"""Gaussian Thompson sampling per device over the arm grid.

Thompson sampling (Thompson, "On the Likelihood that One Unknown Probability Exceeds Another in
View of the Evidence of Two Samples", Biometrika 25, 1933), with the Gaussian prior and
likelihood analysed by Agrawal & Goyal ("Further Optimal Regret Bounds for Thompson Sampling",
AISTATS 2013, arXiv:1209.3353). Rule, for device d, arm k with n_k pulls and reward sum S_k:

    prior μ_k ~ N(μ_0, σ_0²), rewards r | μ_k ~ N(μ_k, σ²)
    posterior precision  τ_k = 1/σ_0² + n_k/σ²
    posterior mean       m_k = (μ_0/σ_0² + S_k/σ²) / τ_k
    θ_k ~ N(m_k, 1/τ_k)            a = argmax_k θ_k

μ_0, σ_0, σ are `ts_prior_mean` (0.5, the middle of the normalised reward range),
`ts_prior_std` (1.0: wide) and `ts_noise_std` (0.5: a [0, 1]-bounded reward is 1/2-sub-Gaussian,
so the likelihood never claims more certainty than the reward allows). The samples come from the
controller's Generator. The client does nothing special.
"""

from __future__ import annotations

import numpy as np

from fedsim.controllers.base import Controller


class GaussianThompson(Controller):
    """Gaussian Thompson sampling on each device's pulls."""

    name = "thompson"

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        cfg = self.config
        prior_prec, noise_prec = 1.0 / cfg.ts_prior_std**2, 1.0 / cfg.ts_noise_std**2
        counts, sums = self._statistics(devices)  # (n, K)
        precision = prior_prec + counts * noise_prec
        mean = (cfg.ts_prior_mean * prior_prec + sums * noise_prec) / precision
        theta = mean + self.rng.standard_normal(precision.shape) / np.sqrt(precision)
        return self._pick(devices, theta)
