"""A global LoRA adapter in the unpruned shape, sliced for pruned clients and aggregated back with masks.

The server keeps the adapter (PEFT state-dict names, ``…layers.{i}.self_attn.q_proj.lora_A.weight``)
in the unpruned model's shape. A client pruned with `keep` trains the slice of it that matches its
linears (`surgery`): for projection p of layer i with kept indices idx = `keep.indices(i, p)`,

    q,k,v,gate,up_proj (rows pruned):  B ← B[idx, :]  (and lora_B's bias[idx]),  A unchanged
    o,down_proj (columns pruned):      A ← A[:, idx],                              B unchanged

and everything else (other layers' names, biases of A) passes unchanged. `scatter_adapter` puts a
client's sliced tensors back at their unpruned coordinates, with a coverage mask m ∈ {0, 1} that is
1 exactly where the client had a value (0 elsewhere, where the value is a placeholder 0).

Mask-aware aggregation, per coordinate c, over clients k with weights w_k ≥ 0 (e.g. examples):

    x_c = Σ_k w_k m_kc x_kc / Σ_k w_k m_kc    where Σ_k w_k m_kc > 0,
    x_c = x_c^prev                             where no client (of positive weight) covered c,

so a pruned-away row keeps its previous global value instead of being pulled to 0 by the clients
that never had it. This averages each factor separately (FedIT's rule, restricted to coverage).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedsim.pruning.structure import AXIS, Keep

_KEY = re.compile(
    r"\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>[a-z]+_proj)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.(?P<kind>weight|bias)$"
)


def pruned_axis(key: str) -> tuple[int, str, int] | None:
    """(layer, projection, axis) of a LoRA tensor that pruning slices, None for one it leaves whole."""
    m = _KEY.search(key)
    if m is None or m["proj"] not in AXIS:
        return None
    axis = AXIS[m["proj"]]
    if axis == 0 and m["factor"] == "B":  # lora_B (out, r) and its bias (out,) lose output rows
        return int(m["layer"]), m["proj"], 0
    if axis == 1 and m["factor"] == "A" and m["kind"] == "weight":  # lora_A (r, in) loses input columns
        return int(m["layer"]), m["proj"], 1
    return None


def slice_adapter(state: Mapping[str, Tensor], keep: Keep) -> dict[str, Tensor]:
    """The adapter matching a model pruned with `keep` (module docstring); new tensors."""
    out = {}
    for key, tensor in state.items():
        where = _where(key, keep)
        if where is None:
            out[key] = tensor.clone()
            continue
        (layer, proj, axis), full = where, keep.full_length(where[0], where[1])
        if tensor.shape[axis] != full:
            raise ValueError(
                f"`{key}` has {tensor.shape[axis]} entries along axis {axis}, the unpruned layer {layer} "
                f"{proj} has {full}"
            )
        out[key] = tensor.index_select(axis, keep.indices(layer, proj))
    return out


def scatter_adapter(
    sliced: Mapping[str, Tensor], keep: Keep, full_shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(full-shape tensors, bool coverage masks) of a pruned client's adapter, keyed as `full_shapes`."""
    if set(sliced) != set(full_shapes):
        missing, extra = sorted(set(full_shapes) - set(sliced)), sorted(set(sliced) - set(full_shapes))
        raise ValueError(f"adapter keys do not match the global adapter: missing {missing[:3]}, unexpected {extra[:3]}")
    fulls, masks = {}, {}
    for key, shape in full_shapes.items():
        tensor, shape, where = sliced[key], tuple(shape), _where(key, keep)
        idx, axis = (keep.indices(where[0], where[1]), where[2]) if where else (None, 0)
        expected = shape if idx is None else (*shape[:axis], idx.numel(), *shape[axis + 1 :])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"`{key}` has shape {tuple(tensor.shape)}, expected {expected} for this keep")
        if idx is None:
            fulls[key], masks[key] = tensor.clone(), torch.ones(shape, dtype=torch.bool)
            continue
        fulls[key] = torch.zeros(shape, dtype=tensor.dtype).index_copy(axis, idx, tensor)
        masks[key] = torch.zeros(shape, dtype=torch.bool).index_fill(axis, idx, True)
    return fulls, masks


def masked_mean(
    fulls: Sequence[Mapping[str, Tensor]],
    masks: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    previous: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Per coordinate Σ w m x / Σ w m over clients; `previous` where nobody covered it (module docstring)."""
    _check_clients(fulls, masks, weights, previous)
    out = {}
    for key, prev in previous.items():
        num = torch.zeros(prev.shape, dtype=torch.float64)
        den = torch.zeros(prev.shape, dtype=torch.float64)
        for full, mask, w in zip(fulls, masks, weights):
            covered = mask[key].bool()
            num += torch.where(covered, w * full[key].double(), 0.0)
            den += w * covered
        mean = num / torch.where(den > 0, den, 1.0)
        out[key] = torch.where(den > 0, mean, prev.double()).to(prev.dtype)
    return out


def fill_uncovered(
    states: Sequence[Mapping[str, Tensor]],
    masks: Sequence[Mapping[str, Tensor] | None],
    weights: Sequence[float],
    previous: Mapping[str, Tensor],
) -> list[dict[str, Tensor]]:
    """Each state with the coordinates its mask leaves uncovered set to `masked_mean`'s value
    (over `previous`'s keys; a None mask covers everything).

    Any rule that then takes a `weights`-weighted mean of the clients' coordinates computes the
    mask-aware mean: Σ_cov w x + Σ_uncov w·m = m·Σ w when m = Σ_cov w x / Σ_cov w. This is how
    fedsim's factor-averaging strategies (and Flower's FedAvg and FedOpt behind FedIT) become
    mask-aware without a masked copy of each rule.
    """
    if all(m is None for m in masks):
        return [dict(s) for s in states]
    full_masks = [
        m if m is not None else {k: torch.ones(v.shape, dtype=torch.bool) for k, v in previous.items()} for m in masks
    ]
    mean = masked_mean(states, full_masks, weights, previous)
    return [
        {k: torch.where(m[k].bool(), s[k], mean[k]) if k in mean else v for k, v in s.items()}
        for s, m in zip(states, full_masks)
    ]


def _where(key: str, keep: Keep) -> tuple[int, str, int] | None:
    where = pruned_axis(key)
    if where is not None and where[0] >= len(keep.groups):
        raise ValueError(f"`{key}` is in layer {where[0]}, the keep has {len(keep.groups)} layers")
    return where


def _check_clients(
    fulls: Sequence[Mapping[str, Tensor]],
    masks: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    previous: Mapping[str, Tensor],
) -> None:
    problems = []
    if not len(fulls) == len(masks) == len(weights) or not fulls:
        problems.append(f"need one adapter, mask and weight per client, got {len(fulls)}, {len(masks)}, {len(weights)}")
    bad = [w for w in weights if not (w >= 0 and w < float("inf"))]
    if bad:
        problems.append(f"`weights` must be finite and >= 0, got {bad[:3]}")
    for k, (full, mask) in enumerate(zip(fulls, masks)):
        for key, prev in previous.items():
            if key not in full or key not in mask:
                problems.append(f"client {k} has no `{key}`")
            elif full[key].shape != prev.shape or mask[key].shape != prev.shape:
                problems.append(
                    f"client {k} `{key}`: shapes {tuple(full[key].shape)} / mask {tuple(mask[key].shape)}, "
                    f"expected {tuple(prev.shape)}"
                )
    if problems:
        raise ValueError("; ".join(problems[:5]))
