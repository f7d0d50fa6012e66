"""Base deltas (FLoRA, FedEx-LoRA) on a half-precision model: applied at float32 precision."""

from __future__ import annotations

import pytest
import torch

from fedsim.config.scenario import LoraConfig
from fedsim.model.adapter import attach_lora, get_state, set_state, split_state
from fedsim.model.loader import load_model

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def lora_model(dtype: str) -> torch.nn.Module:
    return attach_lora(
        load_model("tiny-llama", dtype)[0], LoraConfig(rank=4, alpha=8, target_modules=["q_proj"]), seed=0
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_small_base_delta_is_applied_with_float32_error_in_a_half_precision_model(dtype: str) -> None:
    model = lora_model(dtype)
    layer = model.get_submodule(PREFIX).base_layer
    original = layer.weight.detach().float().clone()
    delta = (
        torch.full(original.shape, 1e-5)
        * torch.randn(original.shape, generator=torch.Generator().manual_seed(0)).sign()
    )
    set_state(model, {**split_state(get_state(model))[0], f"{PREFIX}.base_delta": delta})
    applied = layer.weight.detach().float() - original
    # added in the model's own dtype, much of a 1e-5 step is rounded away (mean relative error > 10 %)
    half = (original + delta).to(getattr(torch, dtype)).float() - original
    assert ((half - delta).abs() / delta.abs()).mean() > 0.1
    assert ((applied - delta).abs() / delta.abs()).max() < 1e-3  # float32-level error


def test_the_layer_computes_with_its_delta_and_returns_to_its_dtype_without_one() -> None:
    model = lora_model("bfloat16")
    layer = model.get_submodule(PREFIX).base_layer
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = layer(x)
    delta = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(2)) * 1e-2
    adapter = split_state(get_state(model))[0]
    set_state(model, {**adapter, f"{PREFIX}.base_delta": delta})
    with_delta = layer(x)
    assert with_delta.dtype == torch.bfloat16  # the rest of the model sees its own dtype
    expected = x.float() @ (layer.weight.float()).T
    torch.testing.assert_close(with_delta.float(), expected, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(with_delta, before)
    set_state(model, adapter)  # no delta: the original weight, dtype and computation
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer(x), before)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits  # the whole model still runs
    assert logits.dtype == torch.bfloat16


def test_a_float32_model_gets_the_delta_in_place() -> None:
    model = lora_model("float32")
    layer = model.get_submodule(PREFIX).base_layer
    weight, original = layer.weight, layer.weight.detach().clone()
    delta = torch.randn(original.shape, generator=torch.Generator().manual_seed(3)) * 1e-6
    set_state(model, {**split_state(get_state(model))[0], f"{PREFIX}.base_delta": delta})
    assert layer.weight is weight and torch.equal(layer.weight.detach(), original + delta)
