"""FedEx-LoRA (Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", arXiv:2410.09432).

FedIT's averages, plus the error they make folded into the frozen base, per layer:

    A ← Σ_k p_k pad(A_k),   B ← Σ_k p_k (s_k / s_g) pad(B_k),   p_k = n_k / Σ_j n_j
    base_delta ← base_delta + (ΔW* − s_g B A),   ΔW* = Σ_k p_k s_k B_k A_k

so base + base_delta + s_g B A moves by exactly ΔW* each round. The paper assumes one rank for
all; with mixed ranks the default `padding` is "holders" (each rank of A, B averaged over the
clients that hold it, and ΔW* the global product moved by the clients' mean change: see
`strategies.lora_math`), so a round in which every client returns what it was sent changes
nothing; "zeros" zero-pads and takes ΔW* = Σ_k p_k s_k B_k A_k. The residual travels to the
clients with the adapter, dense (out × in per adapted layer), and its bytes are on the clock.
"""

from __future__ import annotations

from fedsim.config.names import PRUNING_REFUSED
from fedsim.model.adapter import BASE_DELTA, AdapterState, split_state
from strategies.lora_math import fedex_residual, layer_pairs
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class FedExLoRA(LoraStrategy):
    pruning_refused = PRUNING_REFUSED["fedex_lora"]

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        adapter, deltas = split_state(self.current)
        means, s_g = self.mean_factors(clients), self.scale(self.r_max)
        out: AdapterState = {}
        for prefix, (a_key, b_key) in layer_pairs(adapter).items():
            A, B = means[prefix]
            residual = fedex_residual(A, B, s_g, *self.update_stack(clients, a_key, b_key))
            out[a_key], out[b_key] = A, B
            out[prefix + BASE_DELTA] = deltas[prefix] + residual if prefix in deltas else residual
        return out
