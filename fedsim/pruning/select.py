"""Choose which structures to remove: importance scores and a target ratio in, a `Keep` out.

Removing a set R of structures (KV groups and MLP channels, see `structure`) costs Σ_{s∈R} S_s of
importance and saves Σ_{s∈R} n_s prunable parameters. Both kinds are ranked together by
importance per parameter saved,

    S̃_s = S_s / n_s,   n_s = d·h·(2G + 2) for a KV group, 3·d for an MLP channel,

the greedy rule of a knapsack (value per weight), so a 294,912-weight SmolLM2 KV group and a
1,728-weight channel compete on one scale. No per-layer or per-kind standardisation: scores that
sum over fewer of a structure's weights (`activation` reads o/down_proj only) are compared as
they are.

Budget: remove ρ·P of the P prunable parameters (ρ = `ratio`), P per layer in `per_layer` mode,
over the model in `global` mode. Walking the structures in ascending S̃, each is removed when that
brings the removed count closer to the budget (2·(ρP − removed) > n_s) and the layer still has
another structure of its kind (each layer keeps ≥ 1 KV group and ≥ 1 channel). Hence the
achieved count is within n_max / 2 of ρ·P: a structure left in place would otherwise have been
removed, unless the keep-one limit blocked every one, which happens only at the maximum, and a
budget beyond the maximum is refused with the limit named.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.config.names import MAX_RATIO
from fedsim.pruning.structure import Keep, LayerGeometry, Scores

MODES = ("per_layer", "global")


def select_keep(
    scores: Scores, geometry: Sequence[LayerGeometry], ratio: float, mode: str = "per_layer", within: Keep | None = None
) -> Keep:
    """The structures to keep so that ~`ratio` of the prunable parameters go (module docstring);
    with `within`, a subset of it (progressive pruning)."""
    _check(scores, geometry, ratio, mode)
    gone = _removed_by(within, geometry)
    held = (
        within.removed_per_layer(geometry) if within is not None else [0] * len(geometry)
    )  # what `within` already removed
    per_layer = [_candidates(scores, geometry, i, gone) for i in range(len(geometry))]
    if mode == "per_layer":
        dropped: set[tuple[int, int, int]] = set()
        for i, layer in enumerate(geometry):
            dropped |= _greedy(per_layer[i], geometry, max(_budget(ratio, [layer], f"layer {i}", mode), held[i]))
    else:
        everything = sorted(c for layer in per_layer for c in layer)
        dropped = _greedy(everything, geometry, max(_budget(ratio, geometry, "the model", mode), sum(held)))
    kept = [
        [[j for j in range(n) if (i, kind, j) not in dropped] for kind, n in enumerate((g.groups, g.channels))]
        for i, g in enumerate(geometry)
    ]
    return Keep(
        groups=tuple(tuple(k[0]) for k in kept),
        channels=tuple(tuple(k[1]) for k in kept),
        num_groups=tuple(g.groups for g in geometry),
        num_channels=tuple(g.channels for g in geometry),
        group_size=geometry[0].group_size,
        head_dim=geometry[0].head_dim,
    )


def check_request(ratio: float, mode: str) -> list[str]:
    """Problems with a requested ratio and mode (empty if none)."""
    problems = []
    if not 0.0 <= ratio <= MAX_RATIO:
        problems.append(f"`ratio` must be in [0, {MAX_RATIO}], got {ratio}")
    if mode not in MODES:
        problems.append(f"`mode` must be one of {MODES}, got {mode!r}")
    return problems


def budget_problems(ratio: float, geometry: Sequence[LayerGeometry], mode: str) -> list[str]:
    """Why `ratio` cannot be reached on a model of this geometry (empty if it can), naming the
    first layer (per_layer) or the model (global) and the largest ratio it allows."""
    scopes = (
        [([g], f"layer {i}") for i, g in enumerate(geometry)]
        if mode == "per_layer"
        else [(list(geometry), "the model")]
    )
    for layers, where in scopes:
        try:
            _budget(ratio, layers, where, mode)
        except ValueError as err:
            return [str(err)]
    return []


def _check(scores: Scores, geometry: Sequence[LayerGeometry], ratio: float, mode: str) -> None:
    problems = check_request(ratio, mode)
    if len(scores.groups) != len(geometry) or len(scores.channels) != len(geometry):
        problems.append(f"scores cover {len(scores.groups)} layers, the model has {len(geometry)}")
    else:
        for i, (g, c, layer) in enumerate(zip(scores.groups, scores.channels, geometry)):
            if tuple(g.shape) != (layer.groups,) or tuple(c.shape) != (layer.channels,):
                problems.append(
                    f"layer {i}: scores of shape {tuple(g.shape)} / {tuple(c.shape)}, expected "
                    f"({layer.groups},) KV groups / ({layer.channels},) channels"
                )
            elif not (torch.isfinite(g).all() and torch.isfinite(c).all()):
                problems.append(f"layer {i}: scores must be finite")
    if len({(g.group_size, g.head_dim) for g in geometry}) > 1:
        problems.append("layers differ in head_dim or query heads per KV head")
    if problems:
        raise ValueError("; ".join(problems))


Candidate = tuple[
    bool, float, int, int, int, int
]  # (kept before, S / n, n, layer, kind: 0 KV group / 1 channel, index)


def _candidates(
    scores: Scores, geometry: Sequence[LayerGeometry], i: int, gone: set[tuple[int, int, int]]
) -> list[Candidate]:
    """Layer i's structures, those already removed (`gone`) first, then in ascending score per
    parameter (ties: smaller first, then by index)."""
    layer, out = geometry[i], []
    for kind, (s, n) in enumerate(((scores.groups[i], layer.group_params), (scores.channels[i], layer.channel_params))):
        out += [((i, kind, j) not in gone, v / n, n, i, kind, j) for j, v in enumerate(s.double().tolist())]
    return sorted(out)


def _removed_by(within: Keep | None, geometry: Sequence[LayerGeometry]) -> set[tuple[int, int, int]]:
    """(layer, kind, index) of each structure `within` removed; it must be a keep of this model."""
    if within is None:
        return set()
    if within.num_groups != tuple(g.groups for g in geometry) or within.num_channels != tuple(
        g.channels for g in geometry
    ):
        raise ValueError("`within` is a keep of another model (its layers' KV groups or channels differ)")
    return {
        (i, kind, j)
        for i, g in enumerate(geometry)
        for kind, (kept, n) in enumerate(((within.groups[i], g.groups), (within.channels[i], g.channels)))
        for j in sorted(set(range(n)) - set(kept))
    }


def _budget(ratio: float, layers: Sequence[LayerGeometry], where: str, mode: str) -> float:
    budget, most = ratio * sum(g.params for g in layers), sum(g.max_removable for g in layers)
    if budget > most:
        total = sum(g.params for g in layers)
        raise ValueError(
            f"ratio {ratio} ({mode}) would remove {budget:.0f} of the {total} prunable parameters of {where}, "
            f"but each layer keeps at least 1 KV group and 1 MLP channel: at most {most} "
            f"(ratio <= {most / total:.4f})"
        )
    return budget


def _greedy(
    candidates: Sequence[Candidate], geometry: Sequence[LayerGeometry], budget: float
) -> set[tuple[int, int, int]]:
    left = {(i, kind): n for i, g in enumerate(geometry) for kind, n in enumerate((g.groups, g.channels))}
    removed, dropped = 0, set()
    for _, _, size, i, kind, j in candidates:
        if left[i, kind] > 1 and 2 * (budget - removed) > size:
            dropped.add((i, kind, j))
            removed += size
            left[i, kind] -= 1
    return dropped
