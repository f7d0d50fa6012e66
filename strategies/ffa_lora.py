"""FFA-LoRA (Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning",
arXiv:2403.12313).

A stays frozen at the shared random initialisation; clients train and upload only B, and since
the update is linear in B the average is exact, per layer:

    B ← Σ_k p_k (s_k / s_g) pad(B_k),   A unchanged,   s_g B A = Σ_k p_k s_k B_k A[:r_k] = ΔW*

(p_k = n_k / Σ_j n_j). A client of rank r_k uses A's first r_k rows. The paper assumes one rank
for all; with mixed ranks the default `padding` is "holders": column j of B is averaged over the
clients that hold it (exact per rank, and a client that returns what it was sent moves nothing);
"zeros" zero-pads, which is exact for ΔW* = Σ_k p_k s_k B_k A[:r_k]. Uplink is B alone; A still
travels down (fedsim's clients hold no state they could derive it from), which the clock counts.
"""

from __future__ import annotations

from fedsim.model.adapter import AdapterState, split_state
from strategies.lora_math import ffa_lora, layer_pairs
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class FFALoRA(LoraStrategy):
    uploads = "B"
    freeze = "A"

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        adapter, _ = split_state(self.current)
        weights, s_g = [c.weight for c in clients], self.scale(self.r_max)
        aligned = self.aligned(clients, weights)  # B padded and folded (s_k/s_g): fold once, here
        out: AdapterState = {}
        for a_key, b_key in layer_pairs(adapter).values():
            out[a_key] = adapter[a_key]
            out[b_key] = ffa_lora([a[b_key] for a in aligned], [s_g] * len(clients), weights, adapter[a_key], s_g=s_g)
        return out
