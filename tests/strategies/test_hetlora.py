"""HetLoRA's rank self-pruning (`strategies.hetlora`): the test a client runs after local training,
and the cut of its adapter to the kept rank, checked against direct torch computations."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.protocol import PENALTY_GAMMA, PENALTY_LAMBDA, SELF_PRUNE
from strategies.hetlora import HetLoRA, drop_tail, self_pruned_rank, tail_norm

LAYERS = [(12, 10), (9, 12)]  # (in, out) of each adapted layer


def pairs(r: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, i, generator=g, dtype=torch.float64), torch.randn(o, r, generator=g, dtype=torch.float64))
        for i, o in LAYERS
    ]


def scaled_tail(
    layers: list[tuple[torch.Tensor, torch.Tensor]], t: int, factors: list[float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer with its tail columns of B (ranks t..) times its factor: its tail product scales by it."""
    out = []
    for (A, B), f in zip(layers, factors):
        B = B.clone()
        B[:, t:] *= f
        out.append((A.clone(), B))
    return out


def with_tail_norms(
    layers: list[tuple[torch.Tensor, torch.Tensor]], t: int, norms: list[float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer rescaled so that ‖B[:, t:] A[t:, :]‖_F is its entry of `norms`."""
    return scaled_tail(
        layers, t, [n / torch.linalg.matrix_norm(B[:, t:] @ A[t:, :]).item() for (A, B), n in zip(layers, norms)]
    )


def test_tail_norm_is_the_norm_of_every_layers_tail_product_together() -> None:
    layers, r, gamma = pairs(8, 0), 8, 0.7  # t = 5
    direct = torch.cat([(B[:, 5:8] @ A[5:8, :]).flatten() for A, B in layers]).norm()
    assert tail_norm(layers, r, gamma) == pytest.approx(direct.item(), rel=1e-12)
    assert tail_norm(with_tail_norms(layers, 5, [3.0, 4.0]), r, gamma) == pytest.approx(5.0, rel=1e-12)
    assert tail_norm(layers, r, 1.0) == 0.0  # t = r: no tail


@pytest.mark.parametrize(
    ("r", "gamma", "received", "factors", "expected"),
    [
        (8, 0.75, [1.0, 1.0], [0.5, 0.5], 6),  # the tail shrank: r ← ⌊0.75·8⌋
        (8, 0.99, [1.0, 1.0], [0.9, 0.9], 7),  # the paper's γ: one rank at a time at r = 8
        (8, 0.75, [1.0, 1.0], [2.0, 2.0], 8),  # the tail grew: kept
        (8, 0.75, [1.0, 1.0], [1.0, 1.0], 8),  # unchanged: kept (only a smaller norm prunes)
        (8, 0.75, [1.0, 0.1], [0.5, 2.0], 6),  # layer 1 grew, the layers together fell: √(0.25 + 0.04) < √1.01
        (8, 0.75, [0.1, 1.0], [0.5, 1.2], 8),  # layer 0 fell, the layers together grew: √(0.0025 + 1.44) > √1.01
        (3, 0.2, [1.0, 1.0], [0.5, 0.5], 1),  # ⌊0.6⌋ = 0: at least rank 1
        (1, 0.99, [1.0, 1.0], [0.5, 0.5], 1),  # rank 1 cannot shrink
    ],
)
def test_a_client_drops_its_tail_only_when_its_tail_norm_fell(
    r: int, gamma: float, received: list[float], factors: list[float], expected: int
) -> None:
    t = math.floor(gamma * r)
    start = with_tail_norms(pairs(r, 1), t, received)
    assert self_pruned_rank(start, scaled_tail(start, t, factors), r, gamma) == expected


def test_only_the_tail_counts_not_the_leading_ranks() -> None:
    received, r, gamma = pairs(8, 2), 8, 0.75
    head_grew = scaled_tail(received, 6, [0.5, 0.5])
    for _, B in head_grew:
        B[:, :6] *= 100.0  # the leading ranks grew a hundredfold
    assert self_pruned_rank(received, head_grew, r, gamma) == 6
    head_fell = scaled_tail(received, 6, [1.5, 1.5])
    for _, B in head_fell:
        B[:, :6] *= 0.01
    assert self_pruned_rank(received, head_fell, r, gamma) == 8


def test_the_test_needs_the_same_layers_before_and_after() -> None:
    with pytest.raises(ValueError, match="`received` has 2 layer pairs, `trained` 1: they must be the same layers"):
        self_pruned_rank(pairs(4, 0), pairs(4, 0)[:1], 4, 0.5)


def test_drop_tail_keeps_the_kept_ranks_update_under_the_new_scaling() -> None:
    alpha, r, kept = 16.0, 8, 5
    state = {
        "m.q_proj.lora_A.weight": torch.randn(r, 12, dtype=torch.float64),
        "m.q_proj.lora_B.weight": torch.randn(10, r, dtype=torch.float64),
        "m.q_proj.base_delta": torch.ones(10, 12),
    }
    before = {k: v.clone() for k, v in state.items()}
    cut = drop_tail(state, kept)
    A, B = cut["m.q_proj.lora_A.weight"], cut["m.q_proj.lora_B.weight"]
    assert A.shape == (kept, 12) and B.shape == (10, kept)
    A0, B0 = state["m.q_proj.lora_A.weight"], state["m.q_proj.lora_B.weight"]
    torch.testing.assert_close(
        alpha / kept * B @ A, alpha / r * B0[:, :kept] @ A0[:kept]
    )  # PEFT's s = α / r on both sides
    assert torch.equal(cut["m.q_proj.base_delta"], state["m.q_proj.base_delta"])
    assert all(torch.equal(state[k], v) for k, v in before.items())  # inputs untouched
    with pytest.raises(ValueError, match="exceeds the factors' rank 8"):
        drop_tail(state, 9)


def test_hetlora_asks_its_clients_for_the_penalty_and_the_self_pruning_test() -> None:
    config = HetLoRA(8, 16.0, gamma=0.9, lam=0.05).instructions(4)
    assert (config["lora-rank"], config[PENALTY_GAMMA], config[PENALTY_LAMBDA], config[SELF_PRUNE]) == (
        4,
        0.9,
        0.05,
        True,
    )
