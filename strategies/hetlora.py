"""HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", arXiv:2401.06432).

Client k of rank r_k takes the first r_k ranks of the global adapter and trains with a penalty
on its tail ranks added to the loss:

    L_k + λ ‖B_k[:, t:r_k] A_k[t:r_k, :]‖_F,   t = ⌊γ r_k⌋     (`strategy.rank_gamma`, `rank_lambda`)

Rank self-pruning (the paper's method, its local-training step): after local training the client
compares its tail's norm with the tail's norm of the module it received at the start of the
round, and drops the tail when the norm fell:

    ‖B'_k[:, t:r_k] A'_k[t:r_k, :]‖ < ‖B_k[:, t:r_k] A_k[t:r_k, :]‖   ⇒   r_k ← max(1, ⌊γ r_k⌋)

(B'_k, A'_k after local training, B_k, A_k as received; the max(1, ·) is fedsim's: a client keeps
at least one rank). The paper writes the test for client k's module as one product B_k A_k; a
fedsim client adapts several layers at one rank, so both norms are taken over every layer
together, the root of the sum of the per-layer squares (`tail_norm`). A client that pruned sends
its adapter, and its update, at the kept rank (`drop_tail`) and names that rank in its reply
(`fedsim.protocol.RANK_RECORD`); the server gives that client at most the kept rank from then on,
so its rank never grows back (`fedsim.server.rounds.RoundEnv.rank`). `HetLoRA.instructions` tells the
client γ, λ and to self-prune (`fedsim.protocol`: PENALTY_GAMMA, PENALTY_LAMBDA, SELF_PRUNE).

The server zero-pads every client to r_max and averages with sparsity weights, per layer:

    p_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F,
    A ← Σ_k p_k pad(A_k),   B ← Σ_k p_k (s_k / s_g) pad(B_k)

so clients whose update carries more signal count more (the paper's rule; it ignores n_k). The
zero padding is the paper's: a rank-r_k client pulls the ranks it does not hold toward zero
(`padding` "zeros", the default); "holders" averages each rank over the clients that hold it.
Pruned clients: p_k from what each trained, then each coordinate averaged over those that kept it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedsim.model.adapter import AdapterState
from fedsim.protocol import PENALTY_GAMMA, PENALTY_LAMBDA, SELF_PRUNE
from fedsim.pruning.slicing import fill_uncovered
from strategies.lora_math import fedit, hetlora_rank_penalty, hetlora_weights, layer_pairs, truncate
from strategies.lora_strategy import ClientAdapter, LoraStrategy


def tail_norm(pairs: Sequence[tuple[Tensor, Tensor]], r_k: int, gamma: float) -> float:
    """A client's tail norm over its layers' (A, B) pairs: √(Σ_l ‖B_l[:, t:r_k] A_l[t:r_k, :]‖_F²),
    t = ⌊γ r_k⌋ (0 when t = r_k)."""
    return math.sqrt(math.fsum(hetlora_rank_penalty(B, A, r_k, gamma).item() ** 2 for A, B in pairs))


def self_pruned_rank(
    received: Sequence[tuple[Tensor, Tensor]], trained: Sequence[tuple[Tensor, Tensor]], r_k: int, gamma: float
) -> int:
    """The rank a rank-r_k client keeps after local training: max(1, ⌊γ r_k⌋) when the tail norm of
    its trained (A, B) pairs is below that of the pairs it received, else r_k (module docstring)."""
    if len(received) != len(trained):
        raise ValueError(
            f"`received` has {len(received)} layer pairs, `trained` {len(trained)}: they must be the same layers"
        )
    if tail_norm(trained, r_k, gamma) < tail_norm(received, r_k, gamma):
        return max(1, math.floor(gamma * r_k))
    return r_k


def drop_tail(state: Mapping[str, Tensor], rank: int) -> AdapterState:
    """`state` with each LoRA pair (A (r, in), B (out, r)) cut to its first `rank` ≤ r ranks, B
    refolded for PEFT's scaling s_r = α / r (other tensors as they are):

        A' = A[:rank, :],   B' = (s_r / s_rank) B[:, :rank] = (rank / r) B[:, :rank],

    so that s_rank B' A' = s_r B[:, :rank] A[:rank, :]: the kept ranks carry the same update."""
    out = dict(state)
    for a_key, b_key in layer_pairs(state).values():
        A, B = truncate(state[a_key], state[b_key], rank)
        out[a_key], out[b_key] = A, B * (rank / state[a_key].shape[0])
    return out


class HetLoRA(LoraStrategy):
    paper_padding = "zeros"

    def __init__(
        self, rank: int, alpha: float, seed: int = 0, gamma: float = 0.99, lam: float = 0.01, padding: str | None = None
    ) -> None:
        super().__init__(rank, alpha, seed, padding)
        self.gamma, self.lam = gamma, lam

    def instructions(self, rank: int) -> dict[str, Any]:
        return {**super().instructions(rank), PENALTY_GAMMA: self.gamma, PENALTY_LAMBDA: self.lam, SELF_PRUNE: True}

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        """Per layer: p_k from the clients' own (padded, folded: s_g B'_k A'_k = s_k B_k A_k)
        factors, then their p-weighted mean, pruned-away coordinates filled first (pruning)."""
        s_g, states = self.scale(self.r_max), [self.padded(c) for c in clients]
        masks, ones, out = [self.padded_mask(c) for c in clients], [1.0] * len(clients), {}
        for a_key, b_key in layer_pairs(states[0]).values():
            keys = (a_key, b_key)
            As, Bs = [s[a_key] for s in states], [s[b_key] for s in states]
            p = hetlora_weights(As, Bs, [s_g] * len(clients), ones)
            layer = fill_uncovered(
                [{k: s[k] for k in keys} for s in states],
                [m and {k: m[k] for k in keys} for m in masks],
                p,
                {k: self.current[k] for k in keys},
            )
            out[a_key], out[b_key] = fedit(
                [s[a_key] for s in layer], [s[b_key] for s in layer], [s_g] * len(clients), p, self.r_max, s_g=s_g
            )
        return out
