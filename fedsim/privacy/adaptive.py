"""Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
Clipping", arXiv:1905.03871): the clip C follows the γ-quantile of the clients' update norms.

Each client k of the round's set S reports one bit, b_k = 1[‖Δ_k‖₂ ≤ C] (its norm before
clipping; the bit only, never the norm). The server estimates the share of unclipped updates
from centred bits, whose sum moves by at most 1/2 when a client is added or removed, and steps C
geometrically toward the quantile:

    b̃ = 1/2 + (Σ_{k∈S} (b_k − 1/2) + N(0, σ_b²)) / m,      m the expected number of clients
    C ← C · exp(−η_C (b̃ − γ))

Privacy: a round releases two Gaussian mechanisms, the updates with multiplier σ_Δ and the bits
with multiplier σ_b / (1/2) = 2σ_b; together they are one Gaussian mechanism with multiplier z,
z^{-2} = σ_Δ^{-2} + (2σ_b)^{-2} (the paper's Section 3). The accountant counts z, and the updates
get the larger multiplier σ_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2} (`update_noise_multiplier`), which
exists only when 2σ_b > z. The paper's defaults: σ_b = m / 20, γ = 0.5, η_C = 0.2. C_t, a function
of earlier noised releases, is public: the server sends it with the round's config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

PAPER_INDICATOR_NOISE = 1 / 20  # σ_b = m / 20 (Andrew et al., Section 4)


def update_noise_multiplier(z: float, indicator_std: float) -> float:
    """σ_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2}: the update noise multiplier that, with indicator noise σ_b,
    makes the round one Gaussian mechanism of multiplier z; ValueError unless 2σ_b > z > 0."""
    if not z > 0:
        raise ValueError(f"the noise multiplier z must be > 0, got {z}")
    if not 2 * indicator_std > z:
        raise ValueError(
            f"the indicator noise σ_b = {indicator_std:g} must be > z / 2 = {z / 2:g}, so that the update noise "
            "σ_Δ = (z^-2 − (2σ_b)^-2)^-1/2 exists"
        )
    return (z**-2 - (2 * indicator_std) ** -2) ** -0.5


def combined_noise_multiplier(update_multiplier: float, indicator_std: float) -> float:
    """z = (σ_Δ^{-2} + (2σ_b)^{-2})^{-1/2}: the one Gaussian mechanism a round of adaptive clipping is."""
    return (update_multiplier**-2 + (2 * indicator_std) ** -2) ** -0.5


def below_clip(norm: float, clip: float) -> float:
    """b_k = 1[‖Δ_k‖₂ ≤ C], what a client reports (as 1.0 or 0.0)."""
    return 1.0 if norm <= clip else 0.0


def noisy_fraction(bits: Sequence[float], expected: float, std: float, generator: torch.Generator) -> float:
    """b̃ = 1/2 + (Σ_k (b_k − 1/2) + N(0, std²)) / m: the noised share of unclipped updates."""
    if not expected > 0:
        raise ValueError(f"`expected` (the expected number of clients) must be > 0, got {expected}")
    if bad := [b for b in bits if b not in (0.0, 1.0)]:
        raise ValueError(f"indicator bits must be 0 or 1, got {bad[:3]}")
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * std
    return 0.5 + (sum(b - 0.5 for b in bits) + noise) / expected


def next_clip(clip: float, fraction: float, target_quantile: float, lr: float) -> float:
    """C · exp(−η_C (b̃ − γ)): shrinks C when more than γ of the updates were unclipped, grows it when fewer."""
    return clip * math.exp(-lr * (fraction - target_quantile))


@dataclass
class AdaptiveClip:
    """The server's clip C across rounds; `state_dict` goes into every checkpoint."""

    clip: float  # C_t, sent to the round's clients
    target_quantile: float = 0.5  # γ
    lr: float = 0.2  # η_C
    indicator_std: float = 1.0  # σ_b

    def step(self, bits: Sequence[float], expected: float, generator: torch.Generator) -> float:
        """Move C by one round's bits; returns the noised fraction b̃ (a public figure to record)."""
        fraction = noisy_fraction(bits, expected, self.indicator_std, generator)
        self.clip = next_clip(self.clip, fraction, self.target_quantile, self.lr)
        return fraction

    def state_dict(self) -> dict[str, float]:
        return {"clip": self.clip}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        clip = float(state["clip"])
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"an adaptive clip must be finite and > 0, got {clip}")
        self.clip = clip
