"""fedsim.server.export: a pruned device's model with the adapter merged and its layers widened to one
shape gives the pruned model's outputs, saves as a plain transformers model, and is the keep of
the right client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests_support.pruning import ALL, TINY_KEEP
from transformers import AutoModelForCausalLM

from fedsim.config.scenario import Scenario, validate_scenario
from fedsim.fleet.keeps import PruneBook
from fedsim.model.adapter import AdapterState, attach_lora, get_state, set_state
from fedsim.model.loader import load_model
from fedsim.pruning import Keep, apply_keep, geometry
from fedsim.pruning.structure import decoder_layers
from fedsim.server.export import Exported, _widen, export_clients, merged, shipped_keep

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


def pruned_merged(scenario: Scenario, adapter: AdapterState, keep: Keep | None) -> Exported:
    base, tokenizer = load_model("tiny-llama")
    model = attach_lora(base, scenario.lora, seed=0)
    set_state(model, adapter)
    return merged(model, tokenizer, keep)


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


# --- which keep a device ships ------------------------------------------------------------------


def _book(
    scenario: Scenario, steps: list[int], keeps: dict[int, Keep], targets: list[float] | None = None
) -> PruneBook:
    book = PruneBook(scenario, geometry(load_model("tiny-llama")[0]), np.array(targets or [0.5] * len(steps)))
    for cid, n in enumerate(steps):
        book.record(cid, keeps.get(cid), n)
    restored = PruneBook(scenario, book.layers, np.zeros(len(steps)))
    restored.load(book.to_json())  # as `fedsim export` reads keeps.json
    return restored


DEVICES = ["phone", "laptop", "phone", "phone", "laptop"]
CUT = Keep(((0,), (0,)), (tuple(range(10)), tuple(range(10))), (2, 2), (176, 176), 2, 16)  # stands for the server's cut


def _shipped(book: PruneBook, profile: str, ids: list[int], ratios: dict[str, float] | None = None) -> Keep | None:
    asked: list[float] = []
    keep = shipped_keep(book, profile, ids, ratios or {}, lambda rho: (asked.append(rho), CUT)[1])
    assert asked in ([], [0.25]) and (keep is CUT) == bool(asked)  # the server cuts only when it ships the cut
    return keep


PHONES = [0, 2, 3]


def test_without_deploy_ratios_a_profile_ships_its_most_trained_clients_keep(scenario: Scenario) -> None:
    book = _book(scenario, [8, 16, 24, 16, 40], {0: UNIFORM, 2: NON_UNIFORM, 3: UNIFORM})
    assert _shipped(book, "phone", PHONES) == NON_UNIFORM  # client 2 trained 24 steps
    assert _shipped(book, "laptop", [1, 4]) is None  # no laptop client holds a keep
    assert _shipped(book, "phone", [3]) == UNIFORM  # --client 3: its own
    ties = _book(scenario, [16, 0, 8, 16, 0], {0: UNIFORM, 2: NON_UNIFORM, 3: NON_UNIFORM})
    assert _shipped(ties, "phone", PHONES) == UNIFORM  # ties: the lowest id
    unpruned_most = _book(scenario, [8, 0, 100, 0, 0], {0: NON_UNIFORM})  # client 2 trained most, unpruned
    assert _shipped(unpruned_most, "phone", PHONES) == NON_UNIFORM


@pytest.fixture(scope="module")
def deploying() -> Scenario:
    """Reached after one step (one prune event), so `steps` alone says who trained at its target."""
    return validate_scenario(
        {
            "model": {"name": "tiny-llama"},
            "lora": {"rank": 4, "target_modules": ALL},
            "pruning": {"ratio": 0.25, "events": 1},
        }
    )


def test_with_deploy_ratios_a_device_ships_the_keep_it_trained_at_its_profiles_ratio(deploying: Scenario) -> None:
    ratios = {"phone": 0.25}
    # client 2 trained most but toward 0.5; client 3 at 0.25; client 0 at 0.25 but has not trained since
    book = _book(
        deploying,
        [0, 4, 40, 8, 0],
        {0: UNIFORM, 2: NON_UNIFORM, 3: UNIFORM, 4: NON_UNIFORM},
        [0.25, 0.0, 0.5, 0.25, 0.25],
    )
    assert _shipped(book, "phone", PHONES, ratios) == UNIFORM  # client 3's: the only keep trained at 0.25
    assert _shipped(book, "phone", [3], ratios) == UNIFORM
    assert _shipped(book, "phone", [2], ratios) is CUT  # trained at another ratio: the server's cut to 0.25
    assert _shipped(book, "phone", [0], ratios) is CUT  # holds a keep at 0.25 it never trained on
    assert _shipped(book, "laptop", [4], ratios) is None  # its profile deploys whole, whatever it trained
    assert _shipped(_book(deploying, [0] * 5, {}), "phone", PHONES, ratios) is CUT  # nobody pruned: cut, not unpruned


def test_export_clients_names_what_is_wrong() -> None:
    assert export_clients(DEVICES, profile="phone") == ("phone", PHONES)
    assert export_clients(DEVICES, client=4) == ("laptop", [4])
    with pytest.raises(ValueError, match=r"no client of the run has device profile 'tablet'; profiles: laptop, phone"):
        export_clients(DEVICES, profile="tablet")
    with pytest.raises(ValueError, match=r"client 5: the run has clients 0-4"):
        export_clients(DEVICES, client=5)
    with pytest.raises(ValueError, match="not both"):
        export_clients(DEVICES, profile="phone", client=0)
