"""HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", arXiv:2401.06432).

Client k of rank r_k takes the first r_k ranks of the global adapter and trains with rank
self-pruning, a penalty on its tail ranks added to the loss:

    L_k + λ ‖B_k[:, t:r_k] A_k[t:r_k, :]‖_F,   t = ⌊γ r_k⌋     (`strategy.rank_gamma`, `rank_lambda`)

The server zero-pads every client to r_max and averages with sparsity weights, per layer:

    p_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F,
    A ← Σ_k p_k pad(A_k),   B ← Σ_k p_k (s_k / s_g) pad(B_k)

so clients whose update carries more signal count more (the paper's rule; it ignores n_k).
Pruned clients: p_k from what each trained, then each coordinate averaged over those that kept it.
fedsim applies the penalty but keeps each client's assigned rank: the paper's further step of a
client shrinking r_k when its tail norm falls is left to the rank controller.
"""

from __future__ import annotations

from typing import Any

from fedsim.adapter import AdapterState
from fedsim.pruning.slicing import fill_uncovered
from strategies.lora_math import fedit, hetlora_weights, layer_pairs
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class HetLoRA(LoraStrategy):
    def __init__(self, rank: int, alpha: float, seed: int = 0, gamma: float = 0.99, lam: float = 0.01) -> None:
        super().__init__(rank, alpha, seed)
        self.gamma, self.lam = gamma, lam

    def instructions(self, rank: int) -> dict[str, Any]:
        return {**super().instructions(rank), "rank-penalty-gamma": self.gamma, "rank-penalty-lambda": self.lam}

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        """Per layer: p_k from the clients' own (padded, folded: s_g B'_k A'_k = s_k B_k A_k)
        factors, then their p-weighted mean, pruned-away coordinates filled first (pruning)."""
        s_g, states = self.scale(self.r_max), [self.padded(c) for c in clients]
        masks, ones, out = [self.padded_mask(c) for c in clients], [1.0] * len(clients), {}
        for a_key, b_key in layer_pairs(states[0]).values():
            keys = (a_key, b_key)
            As, Bs = [s[a_key] for s in states], [s[b_key] for s in states]
            p = hetlora_weights(As, Bs, [s_g] * len(clients), ones)
            layer = fill_uncovered([{k: s[k] for k in keys} for s in states], [m and {k: m[k] for k in keys} for m in masks], p, {k: self.current[k] for k in keys})
            out[a_key], out[b_key] = fedit([s[a_key] for s in layer], [s[b_key] for s in layer], [s_g] * len(clients), p, self.r_max, s_g=s_g)
        return out
