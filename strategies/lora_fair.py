"""LoRA-FAIR (Bian et al., 2024, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", arXiv:2411.14961).

FedIT's averages Ā, B̄ (zero-padded, scale-folded; p_k = n_k / Σ_j n_j), then a correction of B
that brings the product back toward the ideal update, per layer:

    ΔW* = Σ_k p_k s_k B_k A_k
    ΔB  = argmin_ΔB  (1 − cos(ΔW*, s_g (B̄ + ΔB) Ā)) + λ ‖ΔB‖_F      (λ = `strategy.fair_lambda`, 0.01 in the paper)

and every client starts the next round from (Ā, B̄ + ΔB). The minimisation is the deterministic
descent of `strategies.lora_math.lora_fair_refine`. The paper assumes one rank for all; with mixed
ranks the default `padding` is "holders" (Ā, B̄ averaged per rank over the clients that hold it,
ΔW* the global product moved by the clients' mean change: see `strategies.lora_math`); "zeros"
zero-pads and takes ΔW* = Σ_k p_k s_k B_k A_k.
"""

from __future__ import annotations

from fedsim.config.names import PRUNING_REFUSED
from fedsim.model.adapter import AdapterState, split_state
from strategies.lora_math import layer_pairs, lora_fair_refine
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class LoRAFAIR(LoraStrategy):
    pruning_refused = PRUNING_REFUSED["lora_fair"]

    def __init__(self, rank: int, alpha: float, seed: int = 0, lam: float = 0.01, padding: str | None = None) -> None:
        super().__init__(rank, alpha, seed, padding)
        self.lam = lam

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        means = self.mean_factors(clients)
        out: AdapterState = {}
        for prefix, (a_key, b_key) in layer_pairs(split_state(self.current)[0]).items():
            A, B = means[prefix]
            out[a_key], out[b_key] = A, lora_fair_refine(A, B, *self.update_stack(clients, a_key, b_key), lam=self.lam)
        return out
