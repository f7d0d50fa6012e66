"""LoRA-FAIR (Bian et al., 2024, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", arXiv:2411.14961).

FedIT's averages Ā, B̄ (zero-padded, scale-folded; p_k = n_k / Σ_j n_j), then a correction of B
that brings the product back toward the ideal update, per layer:

    ΔW* = Σ_k p_k s_k B_k A_k
    ΔB  = argmin_ΔB  (1 − cos(ΔW*, s_g (B̄ + ΔB) Ā)) + λ ‖ΔB‖_F      (λ = `strategy.fair_lambda`, 0.01 in the paper)

and every client starts the next round from (Ā, B̄ + ΔB). The minimisation is the deterministic
descent of `strategies.lora_math.lora_fair`.
"""

from __future__ import annotations

from fedsim.adapter import AdapterState
from strategies.lora_math import apply_per_layer, lora_fair
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class LoRAFAIR(LoraStrategy):
    pruning_refused = "its residual correction needs every client's full product s_k B_k A_k"

    def __init__(self, rank: int, alpha: float, seed: int = 0, lam: float = 0.01) -> None:
        super().__init__(rank, alpha, seed)
        self.lam = lam

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        scales, weights = [c.scale for c in clients], [c.weight for c in clients]
        s_g = self.scale(self.r_max)
        return apply_per_layer(
            [c.state for c in clients], lambda As, Bs: lora_fair(As, Bs, scales, weights, lam=self.lam, r_max=self.r_max, s_g=s_g)
        )
