"""fedsim.export: a pruned device's model with the adapter merged and its layers widened to one
shape gives the pruned model's outputs, saves as a plain transformers model, and is the keep of
the right client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests_support.pruning import ALL, TINY_KEEP
from transformers import AutoModelForCausalLM

from fedsim.adapter import AdapterState, attach_lora, get_state, set_state
from fedsim.export import _widen, device_keep, pruned_merged
from fedsim.keeps import PruneBook
from fedsim.models import load_model
from fedsim.pruning import Keep, apply_keep, geometry
from fedsim.pruning.structure import decoder_layers
from fedsim.scenario import Scenario, validate_scenario

NON_UNIFORM = TINY_KEEP
UNIFORM = Keep(((0,), (1,)), (tuple(range(60)), tuple(range(100, 160))), (2, 2), (176, 176), 2, 16)


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return validate_scenario(
        {
            "model": {"name": "tiny-llama"},
            "lora": {"rank": 4, "alpha": 8.0, "target_modules": ALL},
            "pruning": {"ratio": 0.5},
        }
    )


@pytest.fixture(scope="module")
def adapter(scenario: Scenario) -> AdapterState:
    """A trained-looking global adapter in the unpruned shape (B random, not PEFT's zeros)."""
    model = attach_lora(load_model("tiny-llama")[0], scenario.lora, seed=0)
    g = torch.Generator().manual_seed(3)
    return {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in get_state(model).items()}


def _pruned_peft(scenario: Scenario, adapter: AdapterState, keep: Keep) -> torch.nn.Module:
    """Reference: base + LoRA with the adapter loaded, pruned, not merged."""
    model = attach_lora(load_model("tiny-llama")[0], scenario.lora, seed=0)
    set_state(model, adapter)
    apply_keep(model, keep)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 99, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("keep", [NON_UNIFORM, UNIFORM], ids=["non_uniform", "uniform"])
def test_the_merged_widened_model_gives_the_pruned_models_outputs(
    scenario: Scenario, adapter: AdapterState, keep: Keep
) -> None:
    exported = pruned_merged(scenario, adapter, keep)
    reference = _pruned_peft(scenario, adapter, keep)
    torch.testing.assert_close(_logits(exported.model.eval()), _logits(reference), rtol=0, atol=1e-5)
    assert not any("lora_" in n for n, _ in exported.model.named_parameters())  # merged
    layers = geometry(load_model("tiny-llama")[0])
    assert exported.ratio == pytest.approx(keep.removed_params(layers) / sum(g.params for g in layers))


def test_the_adapter_matters(scenario: Scenario, adapter: AdapterState) -> None:
    zero = {k: torch.zeros_like(v) for k, v in adapter.items()}
    with_adapter, without = pruned_merged(scenario, adapter, NON_UNIFORM), pruned_merged(scenario, zero, NON_UNIFORM)
    assert not torch.allclose(_logits(with_adapter.model), _logits(without.model), atol=1e-4)


def test_widening_pads_every_layer_to_the_widest_and_updates_the_config(
    scenario: Scenario, adapter: AdapterState
) -> None:
    exported = pruned_merged(scenario, adapter, NON_UNIFORM)
    config = exported.model.config
    assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim, config.intermediate_size) == (
        2,
        4,
        16,
        88,
    )
    for layer in decoder_layers(exported.model):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == attn.v_proj.weight.shape == (32, 64)
        assert attn.o_proj.weight.shape == (64, 64)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (88, 64) and mlp.down_proj.weight.shape == (
            64,
            88,
        )
    layer0 = decoder_layers(exported.model)[0]  # kept 1 group and 3 channels: the rest is zero padding
    assert not layer0.self_attn.q_proj.weight[32:].any() and not layer0.self_attn.o_proj.weight[:, 32:].any()
    assert not layer0.mlp.up_proj.weight[3:].any() and not layer0.mlp.down_proj.weight[:, 3:].any()
    # padding: layer 0's extra group (4·16·64 weights) and 85 channels (3·64 each), of the saved 2 · (2·6144 + 88·192)
    assert exported.padding == pytest.approx((6144 + 85 * 192) / (2 * (2 * 6144 + 88 * 192)))


def test_a_uniform_keep_needs_no_padding(scenario: Scenario, adapter: AdapterState) -> None:
    exported = pruned_merged(scenario, adapter, UNIFORM)
    assert exported.padding == 0.0
    c = exported.model.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.intermediate_size) == (1, 2, 60)


def test_no_keep_exports_the_merged_unpruned_model(scenario: Scenario, adapter: AdapterState) -> None:
    exported = pruned_merged(scenario, adapter, None)
    reference = attach_lora(load_model("tiny-llama")[0], scenario.lora, seed=0)
    set_state(reference, adapter)
    torch.testing.assert_close(_logits(exported.model), _logits(reference.eval()), rtol=0, atol=1e-5)
    assert (exported.ratio, exported.padding) == (0.0, 0.0)
    assert exported.model.config.intermediate_size == 176


def test_widen_on_a_bare_pruned_model_keeps_its_outputs() -> None:
    model = load_model("tiny-llama")[0]
    apply_keep(model, NON_UNIFORM)
    before = _logits(model)
    _widen(model, NON_UNIFORM)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [NON_UNIFORM, UNIFORM], ids=["non_uniform", "uniform"])
def test_saved_and_reloaded_with_transformers_alone_gives_the_same_outputs(
    scenario: Scenario, adapter: AdapterState, keep: Keep, tmp_path: Path
) -> None:
    exported = pruned_merged(scenario, adapter, keep)
    exported.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(exported.model), rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(loaded), _logits(_pruned_peft(scenario, adapter, keep)), rtol=0, atol=1e-5)
    assert loaded.config.num_key_value_heads == exported.model.config.num_key_value_heads
    assert loaded.config.intermediate_size == exported.model.config.intermediate_size


# --- device_keep ----------------------------------------------------------------------------


def _book(scenario: Scenario, steps: list[int], keeps: dict[int, Keep]) -> str:
    book = PruneBook(scenario, geometry(load_model("tiny-llama")[0]), np.full(len(steps), 0.5))
    for cid, n in enumerate(steps):
        book.record(cid, keeps.get(cid), n)
    return book.to_json()


DEVICES = ["phone", "laptop", "phone", "phone", "laptop"]


def test_device_keep_is_the_keep_of_the_most_trained_client_of_the_profile(scenario: Scenario) -> None:
    text = _book(scenario, [8, 16, 24, 16, 40], {0: UNIFORM, 2: NON_UNIFORM, 3: UNIFORM})
    assert device_keep(text, DEVICES, "phone") == NON_UNIFORM  # client 2 trained 24 steps
    assert device_keep(text, DEVICES, "laptop") is None  # no laptop client holds a keep


def test_device_keep_breaks_ties_by_the_lowest_client_id(scenario: Scenario) -> None:
    text = _book(scenario, [16, 0, 8, 16, 0], {0: UNIFORM, 2: NON_UNIFORM, 3: NON_UNIFORM})
    assert device_keep(text, DEVICES, "phone") == UNIFORM


def test_device_keep_skips_clients_that_hold_no_keep(scenario: Scenario) -> None:
    text = _book(scenario, [8, 0, 100, 0, 0], {0: NON_UNIFORM})  # client 2 trained most, unpruned
    assert device_keep(text, DEVICES, "phone") == NON_UNIFORM


def test_device_keep_of_a_run_without_pruning_is_none() -> None:
    assert device_keep("", DEVICES, "phone") is None


def test_device_keep_of_an_unknown_profile_names_the_known_ones(scenario: Scenario) -> None:
    text = _book(scenario, [8] * 5, {0: UNIFORM})
    with pytest.raises(ValueError, match=r"no client of the run has device profile 'tablet'; profiles: laptop, phone"):
        device_keep(text, DEVICES, "tablet")
    json.loads(text)  # the book is plain JSON
