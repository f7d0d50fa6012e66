"""FedSpeed (Sun et al., ICLR 2023, "FedSpeed: Larger Local Interval, Less Communication Round, and
Higher Generalization Accuracy", arXiv:2302.10429) on the LoRA factors.

Each client k runs FedSpeed's local rule (`fedsim.model.fedspeed`: merged gradient with an extra
ascent step, prox term and its correction ĝ_k) and sends x̂_k = x_K,k − λ ĝ_k. The server averages
them (Algorithm 1, x^{t+1} = mean of x̂_k), per adapted layer on the aligned factors as FedIT does:

    A ← Σ_k p_k pad(Â_k),   B ← Σ_k p_k (s_k / s_g) pad(B̂_k),   p_k = n_k / Σ_j n_j

The paper weighs the |P| sampled clients equally: p_k with equal n_k. It assumes one rank for all;
with mixed ranks the default `padding` is "holders" (each rank averaged over the clients that hold it).

What the client must do: train with `train_fedspeed` and the ρ, α, λ of the message's config
(`instructions`), and keep ĝ_k in its node state between rounds (zeros before it first trains or
after its rank changed), so a simulation needs a node per client. The authors' code
(github.com/woodenchild95/FL-Simulator, `server/FedSpeed.py`) instead adds the mean over every
client of −λ ĝ_i, stale ones included, to the mean of the x_K,k, which needs the server to hold each
client's term; with full participation both are the same.
"""

from __future__ import annotations

from typing import Any

from fedsim.model.adapter import AdapterState, split_state
from fedsim.model.fedspeed import (
    ALPHA,
    FEDSPEED_ALPHA,
    FEDSPEED_LAMBDA,
    FEDSPEED_RHO,
    LAMBDA,
    RHO,
    check_hyperparameters,
)
from strategies.lora_math import layer_pairs
from strategies.lora_strategy import ClientAdapter, LoraStrategy

PRUNING_REFUSED = (
    "each client keeps its prox-correction term at the shape of the adapter it trained, and a pruned client's "
    "adapter changes shape within and across rounds"
)


class FedSpeed(LoraStrategy):
    """FedAvg of the clients' prox-corrected x̂_k (aligned, scale-folded), clients told ρ, α, λ."""

    pruning_refused = PRUNING_REFUSED

    def __init__(
        self,
        rank: int,
        alpha: float,
        seed: int = 0,
        padding: str | None = None,
        *,
        rho: float = RHO,
        merge: float = ALPHA,
        lam: float = LAMBDA,
    ) -> None:
        """`alpha` is LoRA's; FedSpeed's α (the merge coefficient) is `merge`."""
        super().__init__(rank, alpha, seed, padding)
        check_hyperparameters(rho, merge, lam)
        self.rho, self.merge, self.lam = rho, merge, lam

    def instructions(self, rank: int) -> dict[str, Any]:
        return {
            **super().instructions(rank),
            FEDSPEED_RHO: self.rho,
            FEDSPEED_ALPHA: self.merge,
            FEDSPEED_LAMBDA: self.lam,
        }

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        means = self.mean_factors(clients)
        out: AdapterState = {}
        for prefix, (a_key, b_key) in layer_pairs(split_state(self.current)[0]).items():
            out[a_key], out[b_key] = means[prefix]
        return out
