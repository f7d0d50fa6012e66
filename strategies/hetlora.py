"""HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", arXiv:2401.06432).

Client k of rank r_k takes the first r_k ranks of the global adapter and trains with rank
self-pruning, a penalty on its tail ranks added to the loss:

    L_k + λ ‖B_k[:, t:r_k] A_k[t:r_k, :]‖_F,   t = ⌊γ r_k⌋     (`strategy.rank_gamma`, `rank_lambda`)

The server zero-pads every client to r_max and averages with sparsity weights, per layer:

    p_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F,
    A ← Σ_k p_k pad(A_k),   B ← Σ_k p_k (s_k / s_g) pad(B_k)

so clients whose update carries more signal count more (the paper's rule; it ignores n_k).
fedsim applies the penalty but keeps each client's assigned rank: the paper's further step of a
client shrinking r_k when its tail norm falls is left to the rank controller.
"""

from __future__ import annotations

from typing import Any

from fedsim.adapter import AdapterState
from strategies.lora_math import apply_per_layer, hetlora
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class HetLoRA(LoraStrategy):
    def __init__(self, rank: int, alpha: float, seed: int = 0, gamma: float = 0.99, lam: float = 0.01) -> None:
        super().__init__(rank, alpha, seed)
        self.gamma, self.lam = gamma, lam

    def instructions(self, rank: int) -> dict[str, Any]:
        return {**super().instructions(rank), "rank-penalty-gamma": self.gamma, "rank-penalty-lambda": self.lam}

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        scales, ones = [c.scale for c in clients], [1.0] * len(clients)
        return apply_per_layer(
            [c.state for c in clients], lambda As, Bs: hetlora(As, Bs, scales, ones, self.r_max, s_g=self.scale(self.r_max))
        )
