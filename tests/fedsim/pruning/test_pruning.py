"""fedsim.pruning on tiny models: against the unpruned model, against masking, against the formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tests_support.pruning import ALL, DIMS
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedsim.config.scenario import LoraConfig
from fedsim.fleet.costs import ModelShape
from fedsim.model.adapter import attach_lora, get_state, set_state
from fedsim.model.loader import load_model
from fedsim.pruning import (
    ImportanceEMA,
    Keep,
    Scores,
    apply_keep,
    geometry,
    importance_scores,
    lora_grad_scores,
    prunable_params,
    prune,
    select_keep,
    slice_adapter,
)
from fedsim.pruning.structure import ATTENTION, AXIS, MLP

FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DIMS)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DIMS)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DIMS)),  # q/k/v carry biases
}


def _model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FAMILIES[family]()
        for p in model.parameters():  # biases start at 0; make them matter
            if p.dim() == 1 and "norm" not in str(p.shape):
                p.data.normal_(0, 0.02)
    return model.eval()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    return ids, mask


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _lora(model: torch.nn.Module, targets: tuple[str, ...] = ALL, seed: int = 0) -> torch.nn.Module:
    """LoRA r4 with random B too (PEFT starts B at 0, which would hide slicing mistakes)."""
    peft_model = attach_lora(model, LoraConfig(rank=4, alpha=8, target_modules=targets), seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    return peft_model


def _removed(before: list, after: list) -> list[int]:
    return [b.params - a.params for b, a in zip(before, after)]


# --- physical pruning ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_ratio_zero_gives_the_same_logits(family: str, mode: str) -> None:
    model, ids = _model(family), _batch()
    expected = _logits(model, *ids)
    keep = prune(model, 0.0, mode=mode)
    assert all(len(g) == 4 for g in keep.groups) and all(len(c) == 96 for c in keep.channels)
    assert torch.equal(_logits(model, *ids), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_the_unpruned_one_with_the_removed_structures_masked(family: str) -> None:
    pruned, masked, ids = _model(family), _model(family), _batch()
    keep = prune(pruned, 0.5, mode="global")
    for i, layer in enumerate(masked.model.layers):  # zero o_proj / down_proj inputs of what was removed
        cols = torch.ones(layer.self_attn.o_proj.in_features, dtype=torch.bool)
        cols[keep.indices(i, "o_proj")] = False
        layer.self_attn.o_proj.weight.data[:, cols] = 0
        chans = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
        chans[keep.indices(i, "down_proj")] = False
        layer.mlp.down_proj.weight.data[:, chans] = 0
    torch.testing.assert_close(_logits(pruned, *ids), _logits(masked, *ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_achieved_ratio_is_within_one_structure_of_the_request(ratio: float, mode: str) -> None:
    model = _model()
    before, total = geometry(model), prunable_params(model)
    prune(model, ratio, mode=mode)
    after, granularity = geometry(model), before[0].group_params  # the largest structure
    removed = _removed(before, after)
    assert total - prunable_params(model) == sum(removed)
    if mode == "per_layer":
        for layer, r in zip(before, removed):
            assert abs(r - ratio * layer.params) <= granularity
    else:
        assert abs(sum(removed) - ratio * total) <= granularity


def test_linear_shapes_follow_grouped_query_attention() -> None:
    model = _model()  # 8 heads / 4 KV heads
    keep = Keep(
        groups=((1,), (0, 2, 3), (0, 1, 2, 3)),
        channels=((5, 6), tuple(range(96)), (0,)),
        num_groups=(4, 4, 4),
        num_channels=(96, 96, 96),
        group_size=2,
        head_dim=8,
    )
    apply_keep(model, keep)
    for layer, groups, channels in zip(model.model.layers, keep.groups, keep.channels):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (len(groups) * 2 * 8, 64)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (len(groups) * 8, 64)
        assert attn.o_proj.weight.shape == (64, attn.q_proj.out_features)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (len(channels), 64)
        assert mlp.down_proj.weight.shape == (64, len(channels))
    assert model.config.num_key_value_heads == 4  # layers differ: the config stays unpruned
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        assert _logits(model, *_batch()).shape == (2, 10, 100)


def test_uniform_pruning_updates_the_config() -> None:
    model = _model()
    keep = Keep(
        groups=((0, 3),) * 3,
        channels=(tuple(range(40)),) * 3,
        num_groups=(4,) * 3,
        num_channels=(96,) * 3,
        group_size=2,
        head_dim=8,
    )
    apply_keep(model, keep)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (4, 2, 40, 8)


def test_pruned_model_is_smaller_and_trains() -> None:
    model, ids = _model(), _batch()
    params = sum(p.numel() for p in model.parameters())
    prune(model, 0.5, mode="per_layer")
    peft_model = attach_lora(model, LoraConfig(rank=4, target_modules=("q_proj", "v_proj")), seed=0)
    loss = peft_model(input_ids=ids[0], attention_mask=ids[1], labels=ids[0]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters() if "lora" not in str(p)) < params
    removed = params - ModelShape.from_model(peft_model).num_params
    assert abs(removed - 0.5 * prunable_params(_model())) <= geometry(_model())[0].group_params * 3


def test_apply_keep_on_a_fresh_base_reproduces_the_pruned_model() -> None:
    pruned, ids = _model(), _batch()
    keep = prune(pruned, 0.4, mode="global")
    rebuilt = _model()
    assert Keep.from_json(keep.to_json()) == keep
    apply_keep(rebuilt, Keep.from_json(keep.to_json()))
    assert len({len(g) for g in keep.channels}) > 1  # a non-uniform keep
    assert torch.equal(_logits(rebuilt, *ids), _logits(pruned, *ids))


def test_pruning_a_lora_model_equals_pruning_the_base_then_loading_the_sliced_adapter() -> None:
    ids = _batch()
    wrapped = _lora(_model())
    full_state = get_state(wrapped)
    keep = prune(wrapped, 0.5, mode="global")
    assert set(get_state(wrapped)) == set(full_state)
    for key, tensor in slice_adapter(full_state, keep).items():
        assert torch.equal(get_state(wrapped)[key], tensor), key
    base = _model()
    apply_keep(base, keep)
    rebuilt = attach_lora(base, LoraConfig(rank=4, alpha=8, target_modules=ALL), seed=1)
    set_state(rebuilt, slice_adapter(full_state, keep))
    torch.testing.assert_close(_logits(rebuilt, *ids), _logits(wrapped, *ids), rtol=0, atol=0)
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)


def test_tiny_llama_prunes_and_generates() -> None:
    model, tokenizer = load_model("tiny-llama")
    prune(model, 0.3)
    batch = tokenizer(["hello"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 0.96, 1.0])
def test_ratio_outside_the_range_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"`ratio` must be in \[0, 0.95\]"):
        prune(_model(), ratio)


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_a_ratio_that_would_empty_a_layer_names_the_layer_and_the_limit(mode: str) -> None:
    # a layer is 30720 weights; keeping 1 group (3072) and 1 channel (192) allows 0.8938 at most
    where = "layer 0" if mode == "per_layer" else "the model"
    with pytest.raises(ValueError, match=rf"{where}.*at least 1 KV group and 1 MLP channel.*ratio <= 0.8938"):
        prune(_model(), 0.9, mode=mode)


def test_an_explicit_keep_that_empties_a_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="layer 1 KV groups: keeps none of 4; each layer must keep at least 1"):
        Keep(
            groups=((0,), (), (1,)),
            channels=((0,),) * 3,
            num_groups=(4,) * 3,
            num_channels=(96,) * 3,
            group_size=2,
            head_dim=8,
        )


def test_a_keep_for_another_model_is_refused() -> None:
    keep = prune(_model(), 0.3)
    with pytest.raises(ValueError, match="the keep is for 3 layers"):
        apply_keep(load_model("tiny-llama")[0], keep)


def test_an_unknown_family_is_named() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*llama, mistral, qwen2"):
        prune(model, 0.2)


def test_lora_grad_without_lora_on_the_mlp_names_the_missing_targets() -> None:
    model = _lora(_model(), targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="MLP channels from the LoRA on gate_proj, up_proj, down_proj.*layer 0"):
        importance_scores(model, "lora_grad", input_ids=_batch()[0], attention_mask=_batch()[1])


def test_scores_that_need_a_batch_say_so() -> None:
    with pytest.raises(ValueError, match="'activation' needs a calibration batch"):
        importance_scores(_model(), "activation")
    with pytest.raises(ValueError, match="unknown importance score 'taylor'; known: magnitude"):
        importance_scores(_model(), "taylor")


# --- importance ------------------------------------------------------------------------


def _zero(model: torch.nn.Module, layer: int, group: int, channel: int) -> None:
    """Zero KV group `group` and channel `channel` of `layer`: base weights and LoRA factors."""
    keep = Keep(
        groups=((group,),) * 3,
        channels=((channel,),) * 3,
        num_groups=(4,) * 3,
        num_channels=(96,) * 3,
        group_size=2,
        head_dim=8,
    )
    block = (
        model.get_base_model().model.layers[layer] if hasattr(model, "get_base_model") else model.model.layers[layer]
    )
    for name in ALL:
        module = getattr(block.self_attn if name in ATTENTION else block.mlp, name)
        idx, axis = keep.indices(layer, name), AXIS[name]
        for w in [getattr(module, "base_layer", module).weight] + (
            [module.lora_B["default"].weight]
            if axis == 0 and hasattr(module, "lora_B")
            else [module.lora_A["default"].weight]
            if hasattr(module, "lora_A")
            else []
        ):
            w.data.index_fill_(axis, idx, 0.0)


@pytest.mark.parametrize("score", ["magnitude", "activation", "first_order", "lora_grad"])
def test_each_score_has_the_right_shapes_and_ranks_a_zeroed_structure_lowest(score: str) -> None:
    model = _lora(_model()) if score == "lora_grad" else _model()
    _zero(model, layer=1, group=2, channel=17)
    scores = importance_scores(model, score, input_ids=_batch()[0], attention_mask=_batch()[1])
    assert [tuple(s.shape) for s in scores.groups] == [(4,)] * 3
    assert [tuple(s.shape) for s in scores.channels] == [(96,)] * 3
    assert scores.groups[1][2] == 0 and scores.channels[1][17] == 0
    others = torch.cat([scores.groups[1][[0, 1, 3]], scores.channels[1][:17], scores.channels[1][18:]])
    assert (others > 0).all()
    assert (torch.cat(scores.groups[::2] + scores.channels[::2]) > 0).all()


def _by_structure(per_weight: Callable[[int, str], torch.Tensor]) -> Scores:
    """Reference: sum a per-weight importance over each structure's slices, one structure at a time."""
    groups, channels = [], []
    keeps = [Keep(((g,),) * 3, ((0,),) * 3, (4,) * 3, (96,) * 3, 2, 8) for g in range(4)]
    for i in range(3):
        w = {n: per_weight(i, n) for n in ALL}
        groups.append(
            torch.stack([sum(w[n].index_select(AXIS[n], k.indices(i, n)).sum() for n in ATTENTION) for k in keeps])
        )
        channels.append(torch.stack([sum(w[n].select(AXIS[n], c).sum() for n in MLP) for c in range(96)]))
    return Scores(tuple(groups), tuple(channels))


def _weights(model: torch.nn.Module, i: int, name: str) -> torch.nn.Module:
    layer = model.model.layers[i]
    return getattr(layer.self_attn if name in ATTENTION else layer.mlp, name)


def test_magnitude_and_first_order_match_their_formulas() -> None:
    model, (ids, mask) = _model(), _batch()
    magnitude = _by_structure(lambda i, n: _weights(model, i, n).weight.detach().abs().double())
    model.requires_grad_(True)
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    first = _by_structure(
        lambda i, n: (_weights(model, i, n).weight * _weights(model, i, n).weight.grad).abs().double()
    )
    for name, reference in (("magnitude", magnitude), ("first_order", first)):
        scores = importance_scores(_model(), name, input_ids=ids, attention_mask=mask)
        for got, want in zip(scores.groups + scores.channels, reference.groups + reference.channels):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_activation_matches_flaps_fluctuation_metric() -> None:
    model, (ids, mask) = _model(), _batch()
    inputs = {}
    hooks = [
        _weights(model, i, n).register_forward_hook(
            lambda m, a, o, key=(i, n): inputs.__setitem__(key, a[0][mask.bool()].double())
        )
        for i in range(3)
        for n in ("o_proj", "down_proj")
    ]
    _logits(model, ids, mask)
    for h in hooks:
        h.remove()
    reference = _by_structure(
        lambda i, n: (
            _weights(model, i, n).weight.detach().double().pow(2) * inputs[i, n].var(dim=0)
            if n in ("o_proj", "down_proj")
            else torch.zeros_like(_weights(model, i, n).weight)
        )
    )
    scores = importance_scores(model, "activation", input_ids=ids, attention_mask=mask)
    for got, want in zip(scores.groups + scores.channels, reference.groups + reference.channels):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_lora_grad_matches_loraprunes_formula_and_restores_the_gradients() -> None:
    model, (ids, mask) = _lora(_model()), _batch()
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    base = model.get_base_model()

    def per_weight(i: int, name: str) -> torch.Tensor:
        m = _weights(base, i, name)
        A, B, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        g_hat = s * (B.grad @ A + B @ A.grad)
        return (g_hat * (m.base_layer.weight + s * B @ A)).abs().double().detach()

    reference = _by_structure(per_weight)
    scores = lora_grad_scores(model)
    for got, want in zip(scores.groups + scores.channels, reference.groups + reference.channels):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)
    importance_scores(model, "first_order", input_ids=ids, attention_mask=mask)  # must leave grads alone
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_importance_ema_averages_and_follows_a_keep() -> None:
    a = Scores((torch.tensor([1.0, 2.0]),), (torch.tensor([3.0, 4.0, 5.0]),))
    b = Scores((torch.tensor([3.0, 0.0]),), (torch.tensor([1.0, 0.0, 1.0]),))
    ema = ImportanceEMA(beta=0.75)
    assert ema.update(a) == a
    mixed = ema.update(b)
    torch.testing.assert_close(mixed.groups[0], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(mixed.channels[0], torch.tensor([2.5, 3.0, 4.0]))
    ema.select(Keep(((1,),), ((0, 2),), (2,), (3,), 1, 1))
    torch.testing.assert_close(ema.value.channels[0], torch.tensor([2.5, 4.0]))
    with pytest.raises(ValueError, match="changed shape"):
        ema.update(a)
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\)"):
        ImportanceEMA(beta=1.0)


# --- selection -------------------------------------------------------------------------


def test_select_removes_the_lowest_score_per_parameter_first() -> None:
    shape = geometry(_model())
    groups = tuple(torch.full((4,), 3072.0) for _ in range(3))  # 1 per weight
    channels = tuple(torch.full((96,), 192.0 * 2) for _ in range(3))  # 2 per weight
    groups[1][2] = 0.5 * 3072  # the cheapest structure of all
    keep = select_keep(Scores(groups, channels), shape, 1 / 30, mode="global")  # 3072 of 92160 weights
    assert keep.groups == ((0, 1, 2, 3), (0, 1, 3), (0, 1, 2, 3))
    keep = select_keep(Scores(groups, channels), shape, 0.3, mode="global")  # 27648: 9 groups, not channels
    assert [len(g) for g in keep.groups] == [1, 1, 1] and all(len(c) == 96 for c in keep.channels)


@pytest.mark.parametrize("seed", range(5))
def test_select_stays_within_half_a_structure_for_random_scores(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = geometry(_model())
    scores = Scores(
        tuple(torch.rand(4, generator=g) * 3072 for _ in range(3)),
        tuple(torch.rand(96, generator=g) * 192 for _ in range(3)),
    )
    ratio = float(torch.rand(1, generator=g)) * 0.85
    for mode in ("per_layer", "global"):
        keep = select_keep(scores, shape, ratio, mode)
        removed = [
            layer.params - len(k) * layer.group_params - len(c) * layer.channel_params
            for layer, k, c in zip(shape, keep.groups, keep.channels)
        ]
        errors = (
            [r - ratio * layer.params for r, layer in zip(removed, shape)]
            if mode == "per_layer"
            else [sum(removed) - ratio * sum(layer.params for layer in shape)]
        )
        assert all(abs(e) <= 3072 / 2 for e in errors), (mode, errors)
