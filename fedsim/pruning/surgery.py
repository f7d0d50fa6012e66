"""Physical structured pruning: replace a model's linears with smaller ones that hold only what a `Keep` kept.

No masks: the pruned model is the smaller model it looks like, so `fedsim.fleet.costs.ModelShape` costs
it as such and a training step really does less work. Per decoder layer i and projection p, the
weight W_p (out, in) becomes W_p[idx, :] (q,k,v,gate,up: output rows) or W_p[:, idx] (o,down: input
columns) with idx = `keep.indices(i, p)`; a bias follows its output rows.

PEFT: a model with a LoRA adapter attached (peft 0.21, plain LoRA, no DoRA or other variants) is
pruned as it is: a wrapped `lora.Linear` has its base layer sliced as above and its factors
sliced to match, lora_B (out, r) by rows where the base loses rows and lora_A (r, in) by columns
where it loses columns, so y = x·W[idx]ᵀ + s·x·Aᵀ·B[idx]ᵀ is exactly the kept rows of the unpruned
output. The same slicing of a global adapter state dict is `slicing.slice_adapter`, so a client can
equally prune the bare base model, attach LoRA and load the sliced global adapter: both give the
same model. Either way, build the optimizer after pruning: the old parameters are gone.

Pruning works in place, like `peft.get_peft_model`: copying a 135M-parameter model to return a
new one would double its memory. `model.config` (num_attention_heads, num_key_value_heads,
intermediate_size) is updated when every layer kept the same counts; otherwise it keeps describing
the unpruned model, and the `Keep` (with `apply_keep` on a fresh base) is the record of the shape.
Forward hooks registered on replaced linears are dropped with them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from peft.tuners.lora import LoraLayer

from fedsim.pruning.importance import importance_scores
from fedsim.pruning.select import check_request, select_keep
from fedsim.pruning.structure import (
    ATTENTION,
    AXIS,
    MLP,
    Keep,
    LayerGeometry,
    base_model,
    decoder_layers,
    geometry,
    weight,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def prune(
    model: torch.nn.Module,
    ratio: float,
    *,
    mode: str = "per_layer",
    score: str = "magnitude",
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Keep:
    """Remove ~`ratio` of the prunable parameters, lowest `score` per parameter first; in place.

    `input_ids`/`attention_mask` are the calibration batch of the scores that need one.
    """
    problems = check_request(ratio, mode)
    if problems:  # before scoring, which may take a forward and backward pass
        raise ValueError("; ".join(problems))
    scores = importance_scores(model, score, input_ids=input_ids, attention_mask=attention_mask)
    keep = select_keep(scores, geometry(model), ratio, mode)
    apply_keep(model, keep)
    return keep


def pruned_copy(model: ModuleT, keep: Keep) -> ModuleT:
    """`model` (bare or PEFT-wrapped) pruned with `keep`, leaving `model` as it is.

    Every tensor but the LoRA factors is shared with `model` until `apply_keep` replaces it by its
    kept slice, so the copy costs the kept slices of the pruned linears, not a second model: the
    per-message model of a pruned client whose process caches one unpruned model for all.
    """
    memo: dict[int, object] = {id(t): t for n, t in model.named_parameters() if "lora_" not in n}
    memo |= {id(t): t for t in model.buffers()}
    pruned = copy.deepcopy(model, memo)
    apply_keep(pruned, keep)
    return pruned


def apply_keep(model: torch.nn.Module, keep: Keep) -> None:
    """Slice every decoder layer of `model` (bare or PEFT-wrapped) to `keep`, in place."""
    layers = decoder_layers(model)
    _check_fits(keep, geometry(model))
    for i, layer in enumerate(layers):
        for parent, names in ((layer.self_attn, ATTENTION), (layer.mlp, MLP)):
            for name in names:
                module, idx = getattr(parent, name), keep.indices(i, name)
                if idx.numel() < _size(module, AXIS[name]):
                    setattr(parent, name, _sliced(module, idx, AXIS[name], f"layer {i} {name}"))
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = len(keep.channels[i])
    _update_config(model, keep)


def _size(module: torch.nn.Module, axis: int) -> int:
    return weight(module).shape[axis]


def _check_fits(keep: Keep, layers: list[LayerGeometry]) -> None:
    found = (tuple(g.groups for g in layers), tuple(g.channels for g in layers))
    expected = (keep.num_groups, keep.num_channels)
    problems = []
    if found != expected:
        problems.append(
            f"the keep is for {len(keep.num_groups)} layers with KV groups {keep.num_groups} and "
            f"channels {keep.num_channels}, the model has {len(layers)} layers with {found[0]} and {found[1]}"
        )
    if any((g.group_size, g.head_dim) != (keep.group_size, keep.head_dim) for g in layers):
        problems.append(
            f"the keep is for {keep.group_size} query heads per KV head of head_dim {keep.head_dim}, "
            f"the model has {layers[0].group_size} of {layers[0].head_dim}"
        )
    if problems:
        raise ValueError("; ".join(problems))


def _sliced(module: torch.nn.Module, idx: torch.Tensor, axis: int, where: str) -> torch.nn.Module:
    if isinstance(module, LoraLayer):
        if module.lora_variant or getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{where}: pruning supports plain LoRA on nn.Linear, not DoRA or other LoRA variants")
        module.base_layer = _sliced_linear(module.base_layer, idx, axis, where)
        factors = module.lora_B if axis == 0 else module.lora_A
        for name in list(factors):
            factors[name] = _sliced_linear(factors[name], idx, axis, where)
        module.out_features, module.in_features = module.base_layer.weight.shape
        return module
    return _sliced_linear(module, idx, axis, where)


def _sliced_linear(linear: torch.nn.Module, idx: torch.Tensor, axis: int, where: str) -> torch.nn.Linear:
    """A new nn.Linear with rows (axis 0) or columns (axis 1) `idx` of `linear`; requires_grad kept."""
    if type(linear) is not torch.nn.Linear:
        raise ValueError(
            f"{where}: expected an nn.Linear (or a PEFT LoRA layer around one), got {type(linear).__name__}"
        )
    w, b = linear.weight, linear.bias
    w_new = w.detach().index_select(axis, idx.to(w.device))
    new = torch.nn.Linear(w_new.shape[1], w_new.shape[0], bias=b is not None, device="meta")
    new.weight = torch.nn.Parameter(w_new, requires_grad=w.requires_grad)
    if b is not None:
        b_new = b.detach().index_select(0, idx.to(b.device)) if axis == 0 else b.detach().clone()
        new.bias = torch.nn.Parameter(b_new, requires_grad=b.requires_grad)
    return new.train(linear.training)


def _update_config(model: torch.nn.Module, keep: Keep) -> None:
    groups, channels = {len(g) for g in keep.groups}, {len(c) for c in keep.channels}
    if len(groups) != 1 or len(channels) != 1:
        return
    # nn.Module.__getattr__ is typed Tensor | Module; a transformers model's config is a PretrainedConfig
    config = cast("PretrainedConfig", base_model(model).config)
    config.head_dim = keep.head_dim  # explicit, so it no longer follows hidden / heads
    config.num_key_value_heads = groups.pop()
    config.num_attention_heads = config.num_key_value_heads * keep.group_size
    config.intermediate_size = channels.pop()
