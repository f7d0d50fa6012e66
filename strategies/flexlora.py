"""FlexLoRA (Bai et al., 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", arXiv:2402.11505).

The server averages the clients' full updates and hands each client the best approximation its
rank allows, per layer:

    ΔW* = Σ_k p_k s_k B_k A_k = U Σ Vᵀ,   p_k = n_k / Σ_j n_j
    global:  A = Σ_r^½ V_rᵀ / √s_g,  B = U_r Σ_r^½ / √s_g   with r = r_max

and since the singular values are sorted, the first r_k ranks that a rank-r_k client receives
(`LoraStrategy.client_state`) are its truncated SVD: s_k B_k A_k = U_{r_k} Σ_{r_k} V_{r_k}ᵀ, the
best rank-r_k approximation of ΔW* (Eckart–Young). What lies beyond r_max no client could hold,
so the global adapter keeps rank r_max.
"""

from __future__ import annotations

from fedsim.adapter import AdapterState
from strategies.lora_math import apply_per_layer, flexlora
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class FlexLoRA(LoraStrategy):
    pruning_refused = "it takes the SVD of the mean of the clients' full products s_k B_k A_k, and a masked mean of products is not implemented"

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        scales, weights = [c.scale for c in clients], [c.weight for c in clients]
        s_g = self.scale(self.r_max)
        return apply_per_layer([c.state for c in clients], lambda As, Bs: flexlora(As, Bs, scales, weights, [self.r_max], [s_g])[0])
