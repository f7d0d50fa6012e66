"""fedsim.pruning.surgery.pruned_copy: the original is untouched, the copy equals in-place pruning
of a deep copy, frozen tensors are shared and LoRA factors are not."""

from __future__ import annotations

import copy

import pytest
import torch
from tests_support.pruning import ALL, DIMS
from transformers import LlamaConfig, LlamaForCausalLM

from fedsim.config.scenario import LoraConfig
from fedsim.model.adapter import attach_lora, get_state
from fedsim.pruning import Keep, apply_keep
from fedsim.pruning.surgery import pruned_copy

# layer 1 keeps every KV group (its attention linears stay whole), layer 2 every channel
KEEP = Keep(
    groups=((1, 3), (0, 1, 2, 3), (2,)),
    channels=((0, 5, 17, 95), tuple(range(0, 96, 3)), tuple(range(96))),
    num_groups=(4, 4, 4),
    num_channels=(96, 96, 96),
    group_size=2,
    head_dim=8,
)
UNIFORM = Keep(((0, 2),) * 3, (tuple(range(40)),) * 3, (4,) * 3, (96,) * 3, group_size=2, head_dim=8)


def _peft(seed: int = 0, targets: tuple[str, ...] = ALL) -> torch.nn.Module:
    """Tiny Llama with LoRA r4 whose B is random too (PEFT's B = 0 would hide slicing mistakes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
        peft_model = attach_lora(model, LoraConfig(rank=4, alpha=8, target_modules=targets), seed)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    return peft_model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = _batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("keep", [KEEP, UNIFORM], ids=["per_layer", "uniform"])
def test_the_original_model_is_left_as_it_was(keep: Keep) -> None:
    model = _peft()
    before, logits, config = _snapshot(model), _logits(model), model.get_base_model().config.to_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    pruned = pruned_copy(model, keep)
    assert pruned is not model
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.get_base_model().config.to_dict() == config
    assert torch.equal(_logits(model), logits)
    layer = model.get_base_model().model.layers[0]
    assert layer.mlp.gate_proj.base_layer.weight.shape == (96, 64) and layer.mlp.intermediate_size == 96


@pytest.mark.parametrize("keep", [KEEP, UNIFORM], ids=["per_layer", "uniform"])
def test_the_copy_equals_apply_keep_on_a_deep_copy(keep: Keep) -> None:
    model = _peft()
    reference = copy.deepcopy(model)
    apply_keep(reference, keep)
    pruned = pruned_copy(model, keep)
    torch.testing.assert_close(_logits(pruned), _logits(reference), rtol=0, atol=0)
    assert get_state(pruned).keys() == get_state(reference).keys()
    for key, tensor in get_state(reference).items():
        assert torch.equal(get_state(pruned)[key], tensor), key
    assert _logits(pruned).shape == _logits(model).shape
    assert not torch.allclose(_logits(pruned), _logits(model))  # the pruning did something


def test_the_copy_shares_unsliced_frozen_tensors() -> None:
    model = _peft()
    pruned = pruned_copy(model, KEEP)
    ptr = {n: p.data_ptr() for n, p in model.named_parameters()}
    shared = {n for n, p in pruned.named_parameters() if ptr.get(n) == p.data_ptr()}
    prefix = "base_model.model.model."
    assert f"{prefix}embed_tokens.weight" in shared and f"{prefix}norm.weight" in shared
    assert f"{prefix}layers.1.self_attn.q_proj.base_layer.weight" in shared  # layer 1 keeps every group
    assert f"{prefix}layers.2.mlp.down_proj.base_layer.weight" in shared  # layer 2 keeps every channel
    assert f"{prefix}layers.0.input_layernorm.weight" in shared
    assert f"{prefix}layers.0.self_attn.q_proj.base_layer.weight" not in shared  # sliced: its own smaller copy
    assert f"{prefix}layers.1.mlp.up_proj.base_layer.weight" not in shared
    frozen = {n for n, p in model.named_parameters() if "lora_" not in n}
    sliced = {n for n in frozen if dict(pruned.named_parameters())[n].shape != dict(model.named_parameters())[n].shape}
    assert shared == frozen - sliced


def test_the_copy_does_not_share_lora_factors() -> None:
    model = _peft()
    pruned = pruned_copy(model, KEEP)
    ptrs = {p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}
    lora = {n: p for n, p in pruned.named_parameters() if "lora_" in n}
    assert lora and not any(p.data_ptr() in ptrs for p in lora.values())
    assert all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in pruned.named_parameters() if "lora_" not in n)
    before = _snapshot(model)
    with torch.no_grad():  # training the copy's adapter leaves the original's alone
        for p in lora.values():
            p.add_(1.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_pruned_copy_of_a_bare_model() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
    reference = copy.deepcopy(model)
    apply_keep(reference, UNIFORM)
    logits = _logits(model)
    pruned = pruned_copy(model, UNIFORM)
    assert torch.equal(_logits(pruned), _logits(reference))
    assert torch.equal(_logits(model), logits)
    assert pruned.config.num_key_value_heads == 2 and model.config.num_key_value_heads == 4
    assert pruned.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # tied embeddings stay tied
