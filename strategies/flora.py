"""FLoRA (Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", arXiv:2409.05976).

Stacking: the clients' factors, each with its scaling and weight folded in, form one adapter
whose product is exactly the weighted mean of the clients' updates, whatever their ranks:

    A = [A_1; …; A_K]  (Σr_k, in),   B = [p_1 s_1 B_1, …, p_K s_K B_K]  (out, Σr_k),
    B A = Σ_k p_k s_k B_k A_k = ΔW*,   p_k = n_k / Σ_j n_j

The server merges it into the frozen base (the layer's `base_delta` grows by ΔW*) and the
adapter is re-initialised for the next round (A ~ PEFT's Kaiming-uniform init, drawn from the
scenario seed and the round; B = 0). The merged base delta travels to every client with the
adapter, dense (out × in per adapted layer): that is FLoRA's real downlink cost, on the clock.
Folding p_k s_k into B fixes the scaling pitfall of the public code (one α/Σr for the stack).
Mixed ranks need no padding, so `strategy.rank_padding` does not apply (the scenario refuses it).
"""

from __future__ import annotations

import math

import torch

from fedsim.config.names import PRUNING_REFUSED
from fedsim.model.adapter import BASE_DELTA, AdapterState, split_state
from fedsim.seeding import derive_seed
from strategies.lora_math import flora_stack, layer_pairs, merge_into_base
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class FLoRA(LoraStrategy):
    paper_padding = "stack"  # no padding: every client's factors enter the stack at their own rank
    pruning_refused = PRUNING_REFUSED["flora"]

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        adapter, deltas = split_state(self.current)
        scales, weights = [c.scale for c in clients], [c.weight for c in clients]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, server_round, "flora-init"))
        out: AdapterState = {}
        for prefix, (a_key, b_key) in sorted(layer_pairs(adapter).items()):
            A_stack, B_stack = flora_stack(
                [c.state[a_key] for c in clients], [c.state[b_key] for c in clients], scales, weights
            )
            merged = B_stack @ A_stack
            out[prefix + BASE_DELTA] = merge_into_base(deltas[prefix], merged) if prefix in deltas else merged
            A = torch.empty_like(adapter[a_key])
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # PEFT's lora_A init
            out[a_key], out[b_key] = A, torch.zeros_like(adapter[b_key])
        return out
