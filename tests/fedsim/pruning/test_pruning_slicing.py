"""fedsim.pruning.slicing: slice ↔ scatter round trip, and masked_mean against a direct loop."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests_support.pruning import ALL, TINY_KEEP

from fedsim.config.scenario import LoraConfig
from fedsim.model.adapter import attach_lora, get_state
from fedsim.model.loader import load_model
from fedsim.pruning import masked_mean, scatter_adapter, slice_adapter

KEEP = TINY_KEEP
PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    model = attach_lora(load_model("tiny-llama")[0], LoraConfig(rank=4, target_modules=ALL), seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return {k: torch.randn_like(v) for k, v in get_state(model).items()}


def test_slice_cuts_the_pruned_axis_only(state: dict[str, torch.Tensor]) -> None:
    sliced = slice_adapter(state, KEEP)
    shapes = {k.removeprefix(PREFIX + "."): tuple(v.shape) for k, v in sliced.items()}
    assert shapes["0.self_attn.q_proj.lora_B.weight"] == (32, 4)  # 1 group x 2 heads x 16
    assert shapes["0.self_attn.q_proj.lora_A.weight"] == (4, 64)
    assert shapes["0.self_attn.k_proj.lora_B.weight"] == (16, 4)
    assert shapes["0.self_attn.o_proj.lora_A.weight"] == (4, 32)
    assert shapes["0.self_attn.o_proj.lora_B.weight"] == (64, 4)
    assert shapes["0.mlp.up_proj.lora_B.weight"] == (3, 4)
    assert shapes["0.mlp.down_proj.lora_A.weight"] == (4, 3)
    assert shapes["1.mlp.gate_proj.lora_B.weight"] == (88, 4)
    # group 1 of layer 0 is query rows 32..63 and key rows 16..31
    q_b = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(sliced[q_b], state[q_b][32:64])
    k_b = f"{PREFIX}.0.self_attn.k_proj.lora_B.weight"
    assert torch.equal(sliced[k_b], state[k_b][16:32])
    down_a = f"{PREFIX}.0.mlp.down_proj.lora_A.weight"
    assert torch.equal(sliced[down_a], state[down_a][:, [3, 50, 175]])


def test_slice_modify_scatter_puts_every_value_back_where_it_came_from(state: dict[str, torch.Tensor]) -> None:
    sliced = slice_adapter(state, KEEP)
    trained = {k: v + 1.0 for k, v in sliced.items()}  # the client's update
    fulls, masks = scatter_adapter(trained, KEEP, {k: v.shape for k, v in state.items()})
    assert fulls.keys() == masks.keys() == state.keys()
    for key, full in fulls.items():
        mask = masks[key]
        assert mask.dtype == torch.bool and int(mask.sum()) == sliced[key].numel()
        assert torch.equal(full[mask], state[key][mask] + 1.0)
        assert torch.equal(full[~mask], torch.zeros(int((~mask).sum())))
    q_b = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
    expected = torch.zeros(64, 4, dtype=torch.bool)
    expected[32:64] = True
    assert torch.equal(masks[q_b], expected)
    assert torch.equal(slice_adapter(fulls, KEEP)[q_b], trained[q_b])


def test_scatter_refuses_a_tensor_of_the_wrong_shape(state: dict[str, torch.Tensor]) -> None:
    sliced = slice_adapter(state, KEEP)
    key = f"{PREFIX}.1.mlp.down_proj.lora_A.weight"
    sliced[key] = sliced[key][:, :-1]
    with pytest.raises(ValueError, match=r"down_proj.lora_A.weight` has shape \(4, 87\), expected \(4, 88\)"):
        scatter_adapter(sliced, KEEP, {k: v.shape for k, v in state.items()})
    del sliced[key]
    with pytest.raises(ValueError, match="missing"):
        scatter_adapter(sliced, KEEP, {k: v.shape for k, v in state.items()})


def test_slice_refuses_an_adapter_of_another_shape(state: dict[str, torch.Tensor]) -> None:
    key = f"{PREFIX}.0.mlp.gate_proj.lora_B.weight"
    with pytest.raises(ValueError, match="has 100 entries along axis 0, the unpruned layer 0 gate_proj has 176"):
        slice_adapter({key: torch.zeros(100, 4)}, KEEP)


def test_masked_mean_equals_a_direct_loop() -> None:
    g = torch.Generator().manual_seed(0)
    shape, weights = (4, 3), [1.0, 2.0, 0.5]
    fulls = [{"x": torch.randn(shape, generator=g)} for _ in weights]
    masks = [{"x": torch.rand(shape, generator=g) < 0.5} for _ in weights]
    for m in masks:
        m["x"][0, 0] = False  # nobody covers (0, 0)
    masks[2]["x"][3, 2], masks[0]["x"][3, 2], masks[1]["x"][3, 2] = True, False, False  # only client 2
    previous = {"x": torch.randn(shape, generator=g)}
    got = masked_mean(fulls, masks, weights, previous)["x"]
    for i, j in itertools.product(range(shape[0]), range(shape[1])):
        num = sum(w * f["x"][i, j] for f, m, w in zip(fulls, masks, weights) if m["x"][i, j])
        den = sum(w for m, w in zip(masks, weights) if m["x"][i, j])
        expected = num / den if den > 0 else previous["x"][i, j]
        torch.testing.assert_close(got[i, j], torch.as_tensor(expected, dtype=torch.float32))
    assert got[0, 0] == previous["x"][0, 0]
    torch.testing.assert_close(got[3, 2], fulls[2]["x"][3, 2])


def test_masked_mean_of_full_masks_is_the_weighted_mean() -> None:
    fulls = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([3.0, 6.0])}]
    masks = [{"a": torch.ones(2, dtype=torch.bool)}] * 2
    got = masked_mean(fulls, masks, [3.0, 1.0], {"a": torch.zeros(2)})
    torch.testing.assert_close(got["a"], torch.tensor([1.5, 3.0]))


def test_masked_mean_refuses_bad_inputs() -> None:
    full, mask = {"a": torch.zeros(2)}, {"a": torch.ones(2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"`weights` must be finite and >= 0, got \[-1.0\]"):
        masked_mean([full], [mask], [-1.0], {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="client 0 `a`: shapes \\(2,\\)"):
        masked_mean([full], [mask], [1.0], {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="one adapter, mask and weight per client"):
        masked_mean([full], [mask, mask], [1.0], {"a": torch.zeros(2)})
