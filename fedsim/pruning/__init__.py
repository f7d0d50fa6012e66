"""Structured pruning of Llama-family models for heterogeneous clients.

A client too small for the full model trains a physically smaller one: whole KV groups (a key/value
head with its query heads) and MLP channels are removed from every decoder layer, ranked by an
importance score per parameter, and the LoRA adapter it trains is the matching slice of the global
one, which the server aggregates back with coverage masks.

- `structure`: the prunable structures, `Keep` (what a pruned model kept), `Scores`.
- `importance`: scores by name (magnitude, activation, first_order, lora_grad) and `ImportanceEMA`.
- `select`: scores + ratio → `Keep` (per_layer or global budget).
- `surgery`: `apply_keep` / `prune` replace the linears (bare or PEFT-wrapped model), in place.
- `slicing`: global adapter ↔ pruned client adapter, and `masked_mean` aggregation.
"""

from fedsim.pruning.importance import (
    SCORES,
    ImportanceEMA,
    activation_scores,
    first_order_scores,
    importance_scores,
    lora_grad_scores,
    magnitude_scores,
)
from fedsim.pruning.select import MAX_RATIO, MODES, select_keep
from fedsim.pruning.slicing import masked_mean, scatter_adapter, slice_adapter
from fedsim.pruning.structure import FAMILIES, Keep, LayerGeometry, Scores, geometry, prunable_params
from fedsim.pruning.surgery import apply_keep, prune

__all__ = [
    "FAMILIES",
    "MAX_RATIO",
    "MODES",
    "SCORES",
    "ImportanceEMA",
    "Keep",
    "LayerGeometry",
    "Scores",
    "activation_scores",
    "apply_keep",
    "first_order_scores",
    "geometry",
    "importance_scores",
    "lora_grad_scores",
    "magnitude_scores",
    "masked_mean",
    "prunable_params",
    "prune",
    "scatter_adapter",
    "select_keep",
    "slice_adapter",
]
