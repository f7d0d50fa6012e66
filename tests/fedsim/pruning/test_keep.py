"""fedsim.pruning.structure.Keep's composition and serialisation, Scores.scatter, and progressive
selection (`select_keep(..., within=)`), against direct set computations."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tests_support.pruning import small_llama

from fedsim.pruning import Keep, Scores, apply_keep, geometry, prunable_params, select_keep
from fedsim.pruning.select import budget_problems
from fedsim.pruning.structure import LayerGeometry

GROUP, CHANNEL = 3072, 192
LAYERS = [LayerGeometry(hidden=64, head_dim=8, group_size=2, groups=4, channels=96)] * 3


def _model(seed: int = 0) -> torch.nn.Module:
    return small_llama(seed)


def _keep(groups: tuple[tuple[int, ...], ...], channels: tuple[tuple[int, ...], ...], layers: int = 3) -> Keep:
    return Keep(groups, channels, (4,) * layers, (96,) * layers, group_size=2, head_dim=8)


def _random_keep(seed: int, groups: int = 4, channels: int = 96, layers: int = 3, within: Keep | None = None) -> Keep:
    """A random keep of the unpruned model, a subset of `within` if given."""
    rng = random.Random(seed)

    def pick(pool: list[int]) -> tuple[int, ...]:
        return tuple(sorted(rng.sample(pool, rng.randint(1, len(pool)))))

    held_g = within.groups if within else [list(range(groups))] * layers
    held_c = within.channels if within else [list(range(channels))] * layers
    return Keep(
        tuple(pick(list(g)) for g in held_g),
        tuple(pick(list(c)) for c in held_c),
        (groups,) * layers,
        (channels,) * layers,
        group_size=2,
        head_dim=8,
    )


def _scores(seed: int, layers: list[LayerGeometry] = LAYERS) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores(
        tuple(torch.rand(layer.groups, generator=g) * layer.group_params for layer in layers),
        tuple(torch.rand(layer.channels, generator=g) * layer.channel_params for layer in layers),
    )


def _removed(keep: Keep, layers: list[LayerGeometry] = LAYERS) -> int:
    """Directly: the parameters of every group and channel not in the keep."""
    return sum(
        (layer.groups - len(g)) * layer.group_params + (layer.channels - len(c)) * layer.channel_params
        for layer, g, c in zip(layers, keep.groups, keep.channels)
    )


def _subset(inner: Keep, outer: Keep) -> bool:
    return all(set(a) <= set(b) for a, b in zip(inner.groups + inner.channels, outer.groups + outer.channels))


# --- JSON ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_json_round_trip_gives_back_the_keep(seed: int) -> None:
    keep = _random_keep(seed)
    text = keep.to_json()
    assert Keep.from_json(text) == keep
    assert Keep.from_json(Keep.from_json(text).to_json()) == keep


def test_json_round_trip_keeps_first_and_last_indices_and_odd_sizes() -> None:
    keep = Keep(((0, 4),), ((0, 1, 6),), (5,), (7,), group_size=1, head_dim=2)  # not multiples of 4
    assert Keep.from_json(keep.to_json()) == keep


def test_json_is_a_bit_mask_not_a_list_of_indices() -> None:
    keep = _random_keep(0, channels=1536, layers=2)
    assert len(keep.to_json()) < len(json.dumps([list(c) for c in keep.channels]))


def test_json_of_a_smollm2_sized_keep_is_small() -> None:
    # SmolLM2-135M: 30 layers, 3 KV groups of 3 heads, head_dim 64, 1536 channels; keep about half
    rng = random.Random(0)
    keep = Keep(
        groups=tuple(tuple(sorted(rng.sample(range(3), 2))) for _ in range(30)),
        channels=tuple(tuple(sorted(rng.sample(range(1536), 768))) for _ in range(30)),
        num_groups=(3,) * 30,
        num_channels=(1536,) * 30,
        group_size=3,
        head_dim=64,
    )
    text = keep.to_json()
    assert Keep.from_json(text) == keep
    size = len(text.encode())
    assert size < 8 * 1024, f"to_json of a SmolLM2 keep is {size} bytes"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "Expecting value"),
        ("[1, 2]", "TypeError"),
        ("null", "TypeError"),
        ('{"groups": ["0{"], "channels": ["0R"], "num_groups": [2], "num_channels": [4], "group_size": 1}', "head_dim"),
        (
            '{"groups": ["0{"], "channels": ["0R"], "num_groups": [2], "num_channels": [4], "group_size": 1, '
            '"head_dim": "x"}',
            "x",
        ),
        (
            '{"groups": ["~~~~~"], "channels": ["0R"], "num_groups": [2], "num_channels": [4], "group_size": 1, '
            '"head_dim": 2}',
            "overflow",
        ),
        (
            '{"groups": ["4*"], "channels": ["0R"], "num_groups": [2], "num_channels": [4], "group_size": 1, '
            '"head_dim": 2}',
            "beyond 2",
        ),
        (
            '{"groups": ["0"], "channels": ["0R"], "num_groups": [2], "num_channels": [4], "group_size": 1, '
            '"head_dim": 2}',
            "keeps none",
        ),
        (
            '{"groups": ["1", "1"], "channels": ["0R"], "num_groups": [2], "num_channels": [4], "group_size": 1, '
            '"head_dim": 2}',
            "zip",
        ),
        (
            '{"groups": [3], "channels": ["0R"], "num_groups": [2], "num_channels": [4], "group_size": 1, '
            '"head_dim": 2}',
            "int",
        ),
    ],
)
def test_from_json_on_garbage_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="not a pruning keep document") as err:
        Keep.from_json(text)
    assert problem in str(err.value)


# --- then / within -------------------------------------------------------------------------


def test_then_maps_the_inner_indices_through_the_outer_keep() -> None:
    outer = _keep(((0, 2, 3),) * 3, ((1, 5, 7, 9),) * 3)
    inner = Keep(((1, 2),) * 3, ((0, 3),) * 3, (3,) * 3, (4,) * 3, group_size=2, head_dim=8)
    both = outer.then(inner)
    assert both.groups == ((2, 3),) * 3 and both.channels == ((1, 9),) * 3
    assert (both.num_groups, both.num_channels) == ((4,) * 3, (96,) * 3)


def test_then_equals_pruning_twice() -> None:
    outer, ids = _random_keep(1), torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    inner = _random_keep(2, within=outer).within(outer)
    twice, once = _model(), _model()
    apply_keep(twice, outer)
    apply_keep(twice, inner)
    apply_keep(once, outer.then(inner))
    with torch.no_grad():
        assert torch.equal(twice(input_ids=ids).logits, once(input_ids=ids).logits)


@pytest.mark.parametrize("seed", range(5))
def test_within_is_the_inverse_of_then(seed: int) -> None:
    outer = _random_keep(seed)
    keep = _random_keep(seed + 100, within=outer)
    relative = keep.within(outer)
    assert relative.num_groups == tuple(map(len, outer.groups))
    assert relative.num_channels == tuple(map(len, outer.channels))
    assert outer.then(relative) == keep
    assert keep.within(keep) == Keep(
        tuple(tuple(range(len(g))) for g in keep.groups),
        tuple(tuple(range(len(c))) for c in keep.channels),
        tuple(map(len, keep.groups)),
        tuple(map(len, keep.channels)),
        group_size=2,
        head_dim=8,
    )


def test_within_refuses_a_keep_that_brings_back_removed_structures() -> None:
    outer = _keep(((0, 1),) * 3, ((1, 2, 3),) * 3)
    back = _keep(((0, 1), (0, 3), (0,)), ((1, 2, 3),) * 3)  # layer 1 brings back KV group 3
    with pytest.raises(ValueError, match="layer 1 KV groups: the keep brings back structures the outer keep removed"):
        back.within(outer)
    back = _keep(((0,),) * 3, ((1,), (2,), (0, 3)))  # layer 2 brings back channel 0
    with pytest.raises(ValueError, match="layer 2 channels: the keep brings back"):
        back.within(outer)


def test_then_refuses_an_inner_keep_for_another_model() -> None:
    outer = _keep(((0, 1),) * 3, ((1, 2, 3),) * 3)
    with pytest.raises(ValueError, match="not for the model this keep leaves"):
        outer.then(_keep(((0,),) * 3, ((0,),) * 3))  # made for 4 groups / 96 channels, not 2 / 3


# --- everything, removed_params, Scores.scatter --------------------------------------------


def test_everything_keeps_every_structure_and_removes_nothing() -> None:
    layers = geometry(_model())
    keep = Keep.everything(layers)
    assert keep.groups == (tuple(range(4)),) * 3 and keep.channels == (tuple(range(96)),) * 3
    assert (keep.group_size, keep.head_dim) == (2, 8)
    assert keep.removed_params(layers) == 0
    model, ids = _model(), torch.arange(3, 9)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_keep(model, keep)
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("seed", range(3))
def test_removed_params_counts_what_the_pruned_model_lost(seed: int) -> None:
    keep, model = _random_keep(seed), _model()
    layers, before = geometry(model), prunable_params(model)
    apply_keep(model, keep)
    assert keep.removed_params(layers) == before - prunable_params(model) == _removed(keep)


def test_removed_params_by_hand() -> None:
    keep = _keep(((0,), (0, 1, 2, 3), (1, 3)), ((5,), tuple(range(96)), tuple(range(90))))
    assert keep.removed_params(LAYERS) == 3 * GROUP + 95 * CHANNEL + 0 + 2 * GROUP + 6 * CHANNEL


def test_scatter_places_scores_at_the_unpruned_indices_and_fills_the_rest() -> None:
    keep = Keep(((1, 3),), ((0, 2, 5),), (4,), (6,), group_size=1, head_dim=1)
    pruned = Scores((torch.tensor([10.0, 30.0]),), (torch.tensor([1.0, 2.0, 3.0]),))
    full = pruned.scatter(keep, fill=-1.0)
    assert torch.equal(full.groups[0], torch.tensor([-1.0, 10.0, -1.0, 30.0]))
    assert torch.equal(full.channels[0], torch.tensor([1.0, -1.0, 2.0, -1.0, -1.0, 3.0]))
    back = full.select(keep)
    assert all(torch.equal(a, b) for a, b in zip(back.groups + back.channels, pruned.groups + pruned.channels))


def test_scatter_keeps_the_dtype() -> None:
    keep = Keep(((0,),), ((1,),), (2,), (2,), group_size=1, head_dim=1)
    full = Scores((torch.tensor([1.0], dtype=torch.float64),), (torch.tensor([2.0], dtype=torch.float64),)).scatter(
        keep, 0.0
    )
    assert full.groups[0].dtype == full.channels[0].dtype == torch.float64


# --- select_keep(..., within=) -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["per_layer", "global"])
@pytest.mark.parametrize("seed", range(4))
def test_select_within_a_previous_keep_returns_a_subset_of_it(mode: str, seed: int) -> None:
    prev = select_keep(_scores(seed), LAYERS, 0.3, mode)
    keep = select_keep(_scores(seed + 50), LAYERS, 0.6, mode, within=prev)  # other scores: would pick others
    assert _subset(keep, prev)
    assert _removed(keep) >= _removed(prev)


@pytest.mark.parametrize("mode", ["per_layer", "global"])
@pytest.mark.parametrize("seed", range(3))
def test_growing_ratios_give_nested_keeps_within_one_structure_of_the_target(mode: str, seed: int) -> None:
    total = sum(layer.params for layer in LAYERS)
    held, keeps = None, []
    for step, ratio in enumerate((0.1, 0.3, 0.5, 0.7, 0.8)):
        held = select_keep(_scores(seed * 10 + step), LAYERS, ratio, mode, within=held)  # fresh scores each event
        keeps.append(held)
        if mode == "global":
            assert abs(_removed(held) - ratio * total) <= GROUP, (ratio, _removed(held))
        else:
            for layer, g, c in zip(LAYERS, held.groups, held.channels):
                removed = layer.params - len(g) * GROUP - len(c) * CHANNEL
                assert abs(removed - ratio * layer.params) <= GROUP, (ratio, removed)
    assert all(_subset(b, a) for a, b in zip(keeps, keeps[1:]))


def test_within_the_same_ratio_changes_nothing() -> None:
    prev = select_keep(_scores(0), LAYERS, 0.4, "global")
    assert select_keep(_scores(1), LAYERS, 0.4, "global", within=prev) == prev


def test_within_a_lower_target_keeps_what_was_removed() -> None:
    prev = select_keep(_scores(0), LAYERS, 0.6, "per_layer")
    assert select_keep(_scores(1), LAYERS, 0.2, "per_layer", within=prev) == prev  # a ratio never shrinks


def test_within_removes_the_lowest_scores_among_what_is_left() -> None:
    groups = tuple(torch.full((4,), 1000.0 * GROUP) for _ in range(3))  # far above any channel
    channels = tuple(
        torch.arange(96, dtype=torch.float32) * CHANNEL + CHANNEL for _ in range(3)
    )  # channel j: j + 1 per weight
    prev = _keep(((0, 1, 2, 3),) * 3, (tuple(range(10, 96)),) * 3)  # channels 0..9 gone
    keep = select_keep(Scores(groups, channels), LAYERS, 20 * CHANNEL / LAYERS[0].params, "per_layer", within=prev)
    assert keep.channels == (tuple(range(20, 96)),) * 3 and keep.groups == prev.groups


def test_within_a_keep_of_another_model_is_refused() -> None:
    other = Keep(((0,),) * 3, ((0,),) * 3, (4,) * 3, (50,) * 3, group_size=2, head_dim=8)
    with pytest.raises(ValueError, match="`within` is a keep of another model"):
        select_keep(_scores(0), LAYERS, 0.3, within=other)


@pytest.mark.parametrize(("mode", "where"), [("per_layer", "layer 0"), ("global", "the model")])
def test_budget_problems_name_the_layer_and_the_limit(mode: str, where: str) -> None:
    # a layer is 30720 weights; keeping 1 group and 1 channel allows 30720 − 3072 − 192 = 27456: ratio 0.8938
    assert budget_problems(0.85, LAYERS, mode) == []
    (problem,) = budget_problems(0.9, LAYERS, mode)
    assert where in problem and "at least 1 KV group and 1 MLP channel" in problem and "ratio <= 0.8938" in problem
    assert f"at most {27456 * (3 if mode == 'global' else 1)}" in problem


def test_budget_problems_name_the_first_layer_that_cannot_reach_the_ratio() -> None:
    layers = [LAYERS[0], LayerGeometry(64, 8, 2, groups=1, channels=96), LAYERS[0]]  # layer 1: a single group
    (problem,) = budget_problems(0.86, layers, "per_layer")  # layer 1 can lose its 95 channels of 96 only
    limit = 95 * CHANNEL / (GROUP + 96 * CHANNEL)  # 0.8482
    assert "of layer 1" in problem and f"at most {95 * CHANNEL}" in problem and f"ratio <= {limit:.4f}" in problem
    assert budget_problems(0.86, layers, "global") == []  # the other layers make up for it
