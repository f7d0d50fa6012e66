"""`to_global`: a client's update in the global adapter's coordinates (B folded, ranks zero-padded,
a pruned slice scattered back), its norm the folded update's; checked against a direct padding."""

from __future__ import annotations

import pytest
import torch

from fedsim.privacy import folded, l2_norm, to_global, update_rank
from fedsim.pruning.slicing import slice_adapter
from fedsim.pruning.structure import Keep

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
LIKE = {A: torch.zeros(8, 8), B: torch.zeros(8, 8)}  # r_max = 8, hidden 8 (two heads of 4)


def update(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, 8, generator=g), B: torch.randn(8, rank, generator=g)}


def test_a_low_rank_update_is_folded_and_zero_padded_and_keeps_its_folded_norm():
    u, s_k, s_g = update(2), 16 / 2, 16 / 8

    out = to_global(u, s_k, s_g, LIKE)

    expected_b = torch.zeros(8, 8)
    expected_b[:, :2] = u[B] * (s_k / s_g)
    expected_a = torch.zeros(8, 8)
    expected_a[:2] = u[A]
    torch.testing.assert_close(out[A], expected_a)
    torch.testing.assert_close(out[B], expected_b)
    assert l2_norm(out) == pytest.approx(l2_norm(folded(u, s_k, s_g)), rel=1e-6)
    assert update_rank(u) == 2 and update_rank({B: u[B]}) == 2


def test_a_pruned_update_is_scattered_back_with_zeros_where_the_client_kept_nothing():
    keep = Keep(((0,),), ((0, 1),), (2,), (4,), 2, 2)  # layer 0 keeps head group 0 of 2
    full = update(8, seed=1)
    sliced = slice_adapter(full, keep)
    assert sliced[B].shape[0] < 8  # q_proj's B lost the rows of the other group

    out = to_global(sliced, 2.0, 2.0, LIKE, keep)

    kept_rows = sliced[B].shape[0]
    torch.testing.assert_close(out[B][:kept_rows], full[B][:kept_rows])
    assert torch.count_nonzero(out[B][kept_rows:]) == 0
    assert l2_norm(out) == pytest.approx(l2_norm(sliced), rel=1e-6)


def test_an_update_of_other_tensors_is_refused():
    with pytest.raises(ValueError, match="names other tensors"):
        to_global({A: torch.zeros(8, 8)}, 2.0, 2.0, LIKE)
    with pytest.raises(ValueError, match="no LoRA factor"):
        update_rank({"bias": torch.zeros(3)})
