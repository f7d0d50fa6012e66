"""FlexLoRA (Bai et al., 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", arXiv:2402.11505).

The server averages the clients' full updates and hands each client the best approximation its
rank allows, per layer:

    ΔW* = Σ_k p_k s_k B_k A_k = U Σ Vᵀ,   p_k = n_k / Σ_j n_j
    global:  A = V_rᵀ,  B = U_r Σ_r / s_g   with r = r_max   (Σ in B, as the paper splits it)

and since the singular values are sorted, the first r_k ranks that a rank-r_k client receives
(`LoraStrategy.client_state`) are its truncated SVD: s_k B_k A_k = U_{r_k} Σ_{r_k} V_{r_k}ᵀ, the
best rank-r_k approximation of ΔW* (Eckart–Young). What lies beyond r_max no client could hold,
so the global adapter keeps rank r_max. A's rows are orthonormal, so a rank whose singular value
is near zero keeps training. The SVD comes from QRs of the stacked factors
(`lora_math.product_svd`), never from the dense out × in product.

Mixed ranks: the paper averages every client's full product, so a rank-r_k client pulls the ranks
it does not hold toward zero (`padding` "zeros", the default). "holders" instead moves the global
product by the clients' mean change from what each was sent (`strategies.lora_math`), so a round
in which every client returns what it was sent changes nothing.
"""

from __future__ import annotations

from fedsim.config.names import PRUNING_REFUSED
from fedsim.model.adapter import AdapterState, split_state
from strategies.lora_math import flexlora, layer_pairs
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class FlexLoRA(LoraStrategy):
    pruning_refused = PRUNING_REFUSED["flexlora"]

    paper_padding = "zeros"

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        scales, weights, s_g = [c.scale for c in clients], [c.weight for c in clients], self.scale(self.r_max)
        out: AdapterState = {}
        for a_key, b_key in layer_pairs(split_state(self.current)[0]).values():
            As, Bs = [c.state[a_key] for c in clients], [c.state[b_key] for c in clients]
            received = (self.current[a_key], self.current[b_key], s_g) if self.padding == "holders" else None
            out[a_key], out[b_key] = flexlora(As, Bs, scales, weights, [self.r_max], [s_g], received)[0]
        return out
