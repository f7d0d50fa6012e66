"""`compress` against a direct torch computation of ComPEFT's rule (arXiv:2311.13171), the
baselines' semantics, the config's checks and error feedback."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
import torch

from fedsim.compression import CodecConfig, compress, residual

DENSITIES = [1.0, 0.5, 0.1, 0.013]


# --- the paper's rule, written out independently -------------------------------------------


def reference_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Top ⌈d·n⌉ of |x| by a stable descending sort (ties → lower index), zeros dropped."""
    flat = x.reshape(-1)
    k = math.ceil(Decimal(density) * flat.numel())
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return (mask & (flat != 0)).reshape(x.shape)


def reference_compeft(update: dict[str, torch.Tensor], density: float, alpha: float, per_tensor: bool) -> dict:
    """sign(x)·γ on the top-k mask, γ = α·std(x) (torch's sample std), rounded to float32 once."""
    if per_tensor:
        return {n: reference_compeft({n: t}, density, alpha, False)[n] for n, t in update.items()}
    flat = torch.cat([t.reshape(-1) for t in update.values()])
    gamma = np.float32(alpha * float(flat.std())) if flat.numel() > 1 else np.float32(0)
    mask = reference_mask(flat, density)
    out = torch.where(mask, torch.sign(flat) * float(gamma), torch.zeros(()))
    sizes = [t.numel() for t in update.values()]
    return {n: o.reshape(t.shape) for (n, t), o in zip(update.items(), out.split(sizes), strict=True)}


def tiny_updates() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {"w": torch.randn(1, generator=g)},
        {"w": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)},
        {"scalar": torch.tensor(0.5), "v": torch.randn(5, generator=g)},
    ]


def kept(compressed: dict[str, torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(t)) for t in compressed.values())


# --- ComPEFT -------------------------------------------------------------------------------


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("density", DENSITIES)
def test_compeft_matches_the_papers_rule_on_a_lora_update(lora_update, density, per_tensor):
    update = lora_update(seed=1)
    config = CodecConfig(density=density, alpha=1.7, per_tensor=per_tensor)

    out = compress(update, config)

    expected = reference_compeft(update, density, 1.7, per_tensor)
    assert list(out) == list(update)
    for name in update:
        assert out[name].dtype == torch.float32 and out[name].shape == update[name].shape
        assert torch.equal(out[name], expected[name]), name


@pytest.mark.parametrize("density", DENSITIES)
def test_compeft_keeps_exactly_ceil_dn_entries(lora_update, density):
    update = lora_update(seed=2)
    n = sum(t.numel() for t in update.values())

    out = compress(update, CodecConfig(density=density))

    assert kept(out) == math.ceil(Decimal(density) * n)


@pytest.mark.parametrize("density", DENSITIES)
def test_per_tensor_compeft_keeps_ceil_dn_of_each_tensor(lora_update, density):
    update = lora_update(seed=2)

    out = compress(update, CodecConfig(density=density, per_tensor=True))

    for name, tensor in update.items():
        assert int(torch.count_nonzero(out[name])) == math.ceil(Decimal(density) * tensor.numel()), name


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("index", range(3))
def test_compeft_on_tiny_updates(index, density, per_tensor):
    update = tiny_updates()[index]

    out = compress(update, CodecConfig(density=density, per_tensor=per_tensor))

    expected = reference_compeft(update, density, 1.0, per_tensor)
    assert all(torch.equal(out[n], expected[n]) for n in update)


def test_k_is_the_exact_ceiling_not_the_float_product():
    update = {"w": torch.arange(1.0, 11.0)}  # n = 10; the float 0.7 * 10 is 7.000000000000001

    out = compress(update, CodecConfig(method="topk", density=0.7))

    assert torch.equal(out["w"], torch.tensor([0, 0, 0, 4, 5, 6, 7, 8, 9, 10.0]))


def test_ties_go_to_the_lower_index_across_tensors():
    update = {"a": torch.tensor([0.5, -2.0, 1.0]), "b": torch.tensor([-1.0, 2.0, 1.0])}  # n = 6

    out = compress(update, CodecConfig(method="topk", density=0.5))  # k = 3: both 2.0s, then the first 1.0

    assert torch.equal(out["a"], torch.tensor([0.0, -2.0, 1.0]))
    assert torch.equal(out["b"], torch.tensor([0.0, 2.0, 0.0]))


def test_zeros_are_never_kept():
    update = {"w": torch.tensor([0.0, 3.0, 0.0, -1.0, 0.0, 0.0])}

    out = compress(update, CodecConfig(density=1.0, alpha=2.0))

    gamma = 2.0 * float(update["w"].std())
    assert torch.equal(out["w"], torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0]) * np.float32(gamma))


def test_sigma_is_the_sample_standard_deviation(lora_update):
    update = lora_update(seed=4)
    values = np.concatenate([t.numpy().ravel() for t in update.values()]).astype(np.float64)

    out = compress(update, CodecConfig(density=0.1))

    gamma = max(float(t.abs().max()) for t in out.values())
    assert gamma == pytest.approx(np.std(values, ddof=1), rel=1e-6)


def test_a_constant_update_has_zero_sigma_and_compresses_to_zeros():
    out = compress({"w": torch.full((4,), 3.0)}, CodecConfig(density=0.5))

    assert torch.equal(out["w"], torch.zeros(4))


def test_compress_does_not_touch_its_input(lora_update):
    update = lora_update(seed=5)
    before = {n: t.clone() for n, t in update.items()}

    for method in ("none", "topk", "compeft"):
        out = compress(update, CodecConfig(method=method))
        next(iter(out.values())).fill_(7.0)

    assert all(torch.equal(update[n], before[n]) for n in update)


# --- baselines -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_topk_keeps_the_values_cast_to_dtype(lora_update, dtype):
    update = lora_update(seed=6)

    out = compress(update, CodecConfig(method="topk", density=0.1, dtype=dtype))

    flat = torch.cat([t.reshape(-1) for t in update.values()])
    mask = reference_mask(flat, 0.1).split([t.numel() for t in update.values()])
    for (name, tensor), m in zip(update.items(), mask, strict=True):
        expected = torch.where(m.reshape(tensor.shape), tensor, 0.0).to(getattr(torch, dtype))
        assert out[name].dtype == getattr(torch, dtype) and torch.equal(out[name], expected), name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_none_is_the_update_cast_to_dtype(lora_update, dtype):
    update = lora_update(seed=7)

    out = compress(update, CodecConfig(method="none", dtype=dtype))

    assert all(torch.equal(out[n], update[n].to(getattr(torch, dtype))) for n in update)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "qsgd"),
        ("density", 0.0),
        ("density", 1.5),
        ("density", float("nan")),
        ("density", True),
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("alpha", float("inf")),
        ("dtype", "int8"),
        ("per_tensor", 1),
    ],
)
def test_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        CodecConfig(**{field: value})


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError, match=r"(?s)`density`.*`alpha`.*`dtype`"):
        CodecConfig(density=2.0, alpha=-1.0, dtype="int4")


@pytest.mark.parametrize("method", ["topk", "compeft"])
def test_non_finite_values_cannot_be_ranked(method):
    update = {"ok": torch.ones(3), "bad": torch.tensor([1.0, float("nan")])}

    with pytest.raises(ValueError, match=r"non-finite.*'bad'"):
        compress(update, CodecConfig(method=method))


def test_a_cast_that_overflows_is_refused():
    with pytest.raises(ValueError, match=r"update\['w'\] has values beyond float16's range"):
        compress({"w": torch.tensor([1e6, 1.0])}, CodecConfig(method="none", dtype="float16"))


def test_update_problems_are_named():
    update = {"ints": torch.ones(3, dtype=torch.int64), "fine": torch.ones(2), "\udc80": torch.ones(1)}

    with pytest.raises(ValueError, match=r"(?s)update\['ints'\] must be a floating-point.*a name must be a str"):
        compress(update, CodecConfig())


# --- error feedback ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        CodecConfig(),
        CodecConfig(per_tensor=True, alpha=3.0),
        CodecConfig(method="topk", dtype="bfloat16"),
        CodecConfig(method="none", dtype="float16"),
    ],
    ids=["compeft", "compeft-per-tensor", "topk-bf16", "none-fp16"],
)
def test_sent_plus_residual_is_the_update_exactly(lora_update, config):
    update = lora_update(seed=8)
    sent = compress(update, config)

    e = residual(update, sent)

    for name in update:
        assert e[name].dtype == torch.float64
        assert torch.equal(sent[name].double() + e[name], update[name].double()), name


def test_float32_subtraction_would_not_be_exact(lora_update):
    """Why `residual` is float64: with γ = σ, kept entries of 2σ..4σ lose bits in float32."""
    update = lora_update(seed=8, hidden=256)
    sent = compress(update, CodecConfig())

    inexact = sum(int((sent[n] + (update[n] - sent[n]) != update[n]).sum()) for n in update)

    assert inexact > 0


def test_residual_needs_matching_tensors():
    with pytest.raises(ValueError, match="different tensors"):
        residual({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="differ in shape"):
        residual({"a": torch.ones(2)}, {"a": torch.ones(3)})
