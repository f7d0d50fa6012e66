"""`clip` keeps every update inside the L2 ball, whatever its tensors, and leaves the ones already
inside untouched; `l2_norm` is the norm of the flattened vector; `folded` is B's scaling fold."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedsim.privacy import clip, folded, l2_norm

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def flat_norm(update: dict[str, torch.Tensor]) -> float:
    """Reference: the norm of every tensor concatenated into one float64 vector."""
    if not update:
        return 0.0
    return float(torch.cat([t.double().flatten() for t in update.values()]).norm())


tensors = arrays(
    "float32",
    array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    elements=st.floats(-1e6, 1e6, width=32) | st.just(0.0),
)
updates = st.dictionaries(st.sampled_from(["a.lora_A.weight", "a.lora_B.weight", "b", "c"]), tensors, max_size=4).map(
    lambda d: {k: torch.from_numpy(v.copy()) for k, v in d.items()}
)


@PROPERTY
@given(update=updates, bound=st.floats(1e-3, 1e6))
def test_the_clipped_norm_never_exceeds_the_bound_and_the_direction_is_kept(update, bound):
    before = {k: v.clone() for k, v in update.items()}

    clipped, norm = clip(update, bound)

    assert l2_norm(clipped) <= bound
    assert norm == pytest.approx(flat_norm(update), rel=1e-12)
    assert all(torch.equal(update[k], before[k]) for k in update)  # not mutated
    assert {k: (v.shape, v.dtype) for k, v in clipped.items()} == {k: (v.shape, v.dtype) for k, v in update.items()}
    if norm <= bound:
        assert all(torch.equal(clipped[k], update[k]) for k in update)
    else:
        assert l2_norm(clipped) == pytest.approx(bound, rel=1e-5)
        scale = bound / norm
        for k in update:
            torch.testing.assert_close(clipped[k], update[k] * scale, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_bound_holds_after_rounding_to_a_narrow_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        update = {
            "x": (torch.randn(37, generator=g) * (trial + 1)).to(dtype),
            "y": torch.randn(3, 5, generator=g).to(dtype),
        }
        bound = 0.1 + trial / 7

        clipped, _ = clip(update, bound)

        assert l2_norm(clipped) <= bound


def test_the_zero_update_and_the_empty_update_stay_as_they_are():
    zero = {"a": torch.zeros(4, 3), "b": torch.zeros(0)}

    clipped, norm = clip(zero, 0.5)

    assert norm == 0.0 and all(torch.equal(clipped[k], zero[k]) for k in zero)
    assert clip({}, 1.0) == ({}, 0.0)


def test_an_update_on_the_bound_is_not_scaled():
    update = {"a": torch.tensor([3.0, 4.0])}

    clipped, norm = clip(update, 5.0)

    assert norm == 5.0 and torch.equal(clipped["a"], update["a"])


@pytest.mark.parametrize(
    ("update", "bound", "message"),
    [
        ({"a": torch.ones(2)}, 0.0, "`bound` must be > 0"),
        ({"a": torch.tensor([1.0, float("nan")])}, 1.0, "non-finite"),
        ({"a": torch.tensor([1.0, float("inf")])}, 1.0, "non-finite"),
        ({"a": torch.ones(2, dtype=torch.int64)}, 1.0, "floating-point"),
    ],
)
def test_bad_inputs_are_refused(update, bound, message):
    with pytest.raises(ValueError, match=message):
        clip(update, bound)


def test_folding_scales_only_b_and_unfolding_inverts_it():
    g = torch.Generator().manual_seed(1)
    update = {"m.lora_A.weight": torch.randn(2, 6, generator=g), "m.lora_B.weight": torch.randn(5, 2, generator=g)}
    s_k, s_g = 16 / 2, 16 / 8  # rank-2 client, global rank 8

    out = folded(update, s_k, s_g)

    assert torch.equal(out["m.lora_A.weight"], update["m.lora_A.weight"])
    torch.testing.assert_close(out["m.lora_B.weight"], update["m.lora_B.weight"] * 4.0)
    back = folded(out, s_g, s_k)
    torch.testing.assert_close(back["m.lora_B.weight"], update["m.lora_B.weight"])


def padded(update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A rank-2 update zero-padded to r_max = 8 ranks."""
    return {
        "m.lora_A.weight": torch.cat([update["m.lora_A.weight"], torch.zeros(6, 6)]),
        "m.lora_B.weight": torch.cat([update["m.lora_B.weight"], torch.zeros(5, 6)], dim=1),
    }


def test_clipping_in_the_folded_space_bounds_the_update_the_strategy_sums():
    g = torch.Generator().manual_seed(2)
    raw = {"m.lora_A.weight": torch.randn(2, 6, generator=g), "m.lora_B.weight": torch.randn(5, 2, generator=g) * 3}
    s_k, s_g, bound = 8.0, 2.0, 1.0

    sent = folded(clip(folded(raw, s_k, s_g), bound)[0], s_g, s_k)  # what the client sends, in its own scaling

    assert l2_norm(padded(folded(sent, s_k, s_g))) <= bound * (1 + 1e-6)
    assert l2_norm(raw) < l2_norm(folded(raw, s_k, s_g))  # clipping raw B would have let the fold exceed C
    assert math.isclose(l2_norm(padded(raw)), l2_norm(raw))
