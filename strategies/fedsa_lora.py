"""FedSA-LoRA (Guo et al., 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", arXiv:2410.01463).

A learns what is general and is shared; B learns what is client-specific and never leaves the
client. Per layer:

    A ← Σ_k p_k pad(A_k),   p_k = n_k / Σ_j n_j;   client k keeps its own B_k

The paper assumes one rank for all; with mixed ranks each row of A is averaged over the clients
that hold it (`padding` "holders", the default; "zeros" pads with zero rows).

Clients download and upload A alone and keep B_k in their node state across rounds (zero until
they first train). There is no single global model: the server's adapter holds the shared A with
B = 0, so the figure that counts is accuracy on the clients' own test splits (federated
evaluation, each client with its own B); fedsim requires `clients.eval_per_round` >= 1.
"""

from __future__ import annotations

import torch

from fedsim.model.adapter import AdapterState, split_state
from fedsim.pruning.slicing import fill_uncovered
from strategies.lora_math import fedsa_lora, layer_pairs
from strategies.lora_strategy import ClientAdapter, LoraStrategy


class FedSALoRA(LoraStrategy):
    downloads = "A"
    uploads = "A"

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        adapter, _ = split_state(self.current)
        weights = [c.weight for c in clients]
        a_keys = [a_key for a_key, _ in layer_pairs(adapter).values()]
        states = [{k: self._pad_rows(c.state[k]) for k in a_keys} for c in clients]
        masks = [m and {k: m[k] for k in a_keys} for m in map(self.padded_mask, clients)]
        filled = fill_uncovered(states, masks, weights, {k: adapter[k] for k in a_keys})
        return {**adapter, **{k: fedsa_lora([s[k] for s in filled], weights) for k in a_keys}}

    def _pad_rows(self, A: torch.Tensor) -> torch.Tensor:
        return torch.cat([A, A.new_zeros(self.r_max - A.shape[0], A.shape[1])])
