"""Clipping a client's update into an L2 ball: the sensitivity bound of DP-FedAvg.

McMahan et al. (2018), "Learning Differentially Private Recurrent Language Models",
arXiv:1710.06963. A client's update Δ, a dict of named tensors read as one flat vector, becomes

    clip(Δ, C) = Δ · min(1, C / ‖Δ‖₂),    ‖Δ‖₂ = (Σ_t Σ_i Δ_{t,i}²)^{1/2},

so that adding or removing one client moves the round's sum by at most C. `clip` guarantees
‖clip(Δ, C)‖₂ ≤ C after rounding to the tensors' dtype (it shrinks once more when a rounding
lands above C), and leaves an update already inside the ball (the zero update included) as it is.

The update space (`fedsim.privacy`): what the strategy sums, so LoRA B factors folded to the
global scaling s_g. `folded(Δ, s_k, s_g)` multiplies every `lora_B` tensor by s_k / s_g (B'_k =
(s_k / s_g) B_k, `strategies.lora_strategy`), and `folded(Δ, s_g, s_k)` undoes it. Zero padding to
r_max and scattering a pruned client back to the unpruned shape add only zeros, so the norm of
the client's own tensors is the norm of the update as aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

Update = dict[str, torch.Tensor]

_SHRINK_TRIES = 4  # rounding can leave the norm above C by a few ulps; each try shrinks by one eps more


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """‖Δ‖₂ over every tensor of `update`, accumulated in float64 (0.0 for no tensors); ValueError
    for a non-floating or non-finite tensor."""
    total = 0.0
    for name, t in update.items():
        if not t.is_floating_point():
            raise ValueError(f"`{name}`: an update holds floating-point tensors, got {t.dtype}")
        total += float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
    if not math.isfinite(total):
        raise ValueError("the update holds non-finite values: it cannot be clipped")
    return math.sqrt(total)


def clip(update: Mapping[str, torch.Tensor], bound: float) -> tuple[Update, float]:
    """(Δ · min(1, C / ‖Δ‖₂), ‖Δ‖₂): new tensors of the same dtypes whose L2 norm is at most C = `bound`,
    and the norm before clipping (what adaptive clipping's indicator reads)."""
    if not bound > 0:
        raise ValueError(f"`bound` must be > 0, got {bound}")
    norm = l2_norm(update)
    if norm <= bound:
        return {name: t.detach().clone() for name, t in update.items()}, norm
    eps = max(torch.finfo(t.dtype).eps for t in update.values())
    scale = bound / norm
    for _ in range(_SHRINK_TRIES):
        out = {name: t.detach() * scale for name, t in update.items()}
        got = l2_norm(out)
        if got <= bound:
            return out, norm
        scale *= bound / got * (1 - eps)
    raise AssertionError(f"clip did not reach the bound {bound} after {_SHRINK_TRIES} shrinks (last norm {got})")


def folded(update: Mapping[str, torch.Tensor], s_k: float, s_g: float) -> Update:
    """`update` with every `lora_B` tensor times s_k / s_g: a rank-r_k client's update as the strategy
    aggregates it (B'_k = (s_k / s_g) B_k); `folded(·, s_g, s_k)` is the inverse."""
    factor = s_k / s_g
    return {name: t * factor if ".lora_B." in name else t for name, t in update.items()}
