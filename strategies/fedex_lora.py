"""FedEx-LoRA (Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", arXiv:2410.09432).

FedIT's averages, plus the error they make folded into the frozen base, per layer:

    A ← Σ_k p_k pad(A_k),   B ← Σ_k p_k (s_k / s_g) pad(B_k),   p_k = n_k / Σ_j n_j
    base_delta ← base_delta + (ΔW* − s_g B A),   ΔW* = Σ_k p_k s_k B_k A_k

so base + base_delta + s_g B A moves by exactly ΔW* each round. The residual travels to the
clients with the adapter, dense (out × in per adapted layer), and its bytes are on the clock.
"""

from __future__ import annotations

from fedsim.adapter import BASE_DELTA, AdapterState, split_state
from strategies.lora_math import fedex_lora, layer_pairs
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class FedExLoRA(LoraStrategy):
    pruning_refused = "it merges the clients' dense residual into the frozen base weights, which a pruned client holds only in part"

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        adapter, deltas = split_state(self.current)
        scales, weights = [c.scale for c in clients], [c.weight for c in clients]
        out: AdapterState = {}
        for prefix, (a_key, b_key) in layer_pairs(adapter).items():
            As, Bs = [c.state[a_key] for c in clients], [c.state[b_key] for c in clients]
            out[a_key], out[b_key], residual = fedex_lora(As, Bs, scales, weights, self.r_max, s_g=self.scale(self.r_max))
            out[prefix + BASE_DELTA] = deltas[prefix] + residual if prefix in deltas else residual
        return out
