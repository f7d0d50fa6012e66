"""fedsim.fleet.keeps: target ratios per client, the server's book of pruned models, its cost estimate
against the real pruned model, and server-side cuts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from tests_support.pruning import ALL, TINY_KEEP

from fedsim.config.scenario import LoraConfig, Scenario, validate_scenario
from fedsim.fleet.costs import ModelShape, train_memory, train_step_flops
from fedsim.fleet.fleet import build_fleet
from fedsim.fleet.keeps import PruneBook, client_ratios, plan_server_keeps, pruned_shape, ratio_problems
from fedsim.model.adapter import attach_lora
from fedsim.model.loader import load_model
from fedsim.pruning import Keep, Scores, apply_keep, geometry, select_keep
from fedsim.pruning.schedule import ratio_before_step

NON_UNIFORM = TINY_KEEP


def _scenario(**pruning: Any) -> Scenario:
    return validate_scenario(
        {
            "model": {"name": "tiny-llama"},
            "clients": {"num_clients": 5, "per_round": 2},
            "lora": {"rank": 4, "target_modules": list(ALL)},
            "fleet": {"groups": [{"profile": "jetson-tx2", "count": 2}, {"profile": "phone-midrange", "count": 3}]},
            "pruning": {"importance": "magnitude", **pruning},
        }
    )


@pytest.fixture(scope="module")
def layers() -> list:
    return geometry(load_model("tiny-llama")[0])


def _scores(seed: int, layers: list) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores(
        tuple(torch.rand(layer.groups, generator=g) * layer.group_params for layer in layers),
        tuple(torch.rand(layer.channels, generator=g) * layer.channel_params for layer in layers),
    )


# --- client_ratios -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pruning", "expected"),
    [
        ({}, [0, 0, 0, 0, 0]),
        ({"ratio": 0.2}, [0.2] * 5),
        ({"ratio": 0.2, "profile_ratios": {"jetson-tx2": 0.5}}, [0.5, 0.5, 0.2, 0.2, 0.2]),
        ({"profile_ratios": {"phone-midrange": 0.4}}, [0, 0, 0.4, 0.4, 0.4]),
        (
            {"ratio": 0.1, "profile_ratios": {"jetson-tx2": 0.5}, "client_ratios": {"1": 0.3, "4": 0.0}},
            [0.5, 0.3, 0.1, 0.1, 0.0],
        ),
        ({"ratio": 0.1, "client_ratios": {"2": 0.6}}, [0.1, 0.1, 0.6, 0.1, 0.1]),
    ],
)
def test_client_ratios_prefer_client_then_profile_then_ratio(pruning: dict[str, Any], expected: list[float]) -> None:
    scenario = _scenario(**pruning)
    ratios = client_ratios(scenario, build_fleet(scenario))
    assert ratios.dtype == float and ratios.shape == (5,)
    np.testing.assert_array_equal(ratios, np.array(expected, dtype=float))


# --- pruned_shape: the server's estimate of a pruned model --------------------------------


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("which", ["non_uniform", "uniform", "everything"])
def test_pruned_shape_is_the_shape_of_the_model_apply_keep_builds(which: str, lora: bool) -> None:
    base = load_model("tiny-llama")[0]
    shape = ModelShape.from_model(base)
    keep = {
        "non_uniform": NON_UNIFORM,
        "uniform": Keep(((0,), (1,)), ((1, 7), (0, 9)), (2, 2), (176, 176), 2, 16),
        "everything": Keep.everything(geometry(base)),
    }[which]
    model = attach_lora(base, LoraConfig(rank=4, target_modules=ALL), seed=0) if lora else base
    apply_keep(model, keep)
    assert pruned_shape(shape, keep) == ModelShape.from_model(model)
    assert pruned_shape(shape, None) is shape


def test_estimated_costs_of_a_pruned_client_equal_the_real_pruned_model() -> None:
    from fedsim.server.estimates import cost_model, estimates

    scenario = _scenario(ratio=0.3)
    base = load_model("tiny-llama")[0]
    shape = ModelShape.from_model(base)
    model = attach_lora(base, scenario.lora, seed=0)
    apply_keep(model, NON_UNIFORM)
    real = ModelShape.from_model(model)
    step = dict(batch=8, seq_len=64, rank=4, targets=ALL)
    assert train_step_flops(pruned_shape(shape, NON_UNIFORM), **step) == train_step_flops(real, **step)
    assert train_memory(pruned_shape(shape, NON_UNIFORM), **step) == train_memory(real, **step)
    estimate = cost_model(shape, scenario)
    for rank in (2, 4):
        assert estimate(rank, NON_UNIFORM) == estimates(real, scenario, rank)
        assert estimate(rank, None) == estimates(shape, scenario, rank)
        assert estimate(rank, NON_UNIFORM).flops < estimate(rank, None).flops
        assert estimate(rank, NON_UNIFORM).memory < estimate(rank, None).memory


# --- PruneBook -----------------------------------------------------------------------------


def test_a_fresh_book_holds_no_keep_and_orders_the_target(layers: list) -> None:
    scenario = _scenario(ratio=0.5, interval_steps=4, events=4)
    book = PruneBook(scenario, layers, np.array([0.5, 0.0]))
    assert book.held(0) is None and book.ratio(None) == 0.0
    assert book.order(0) == {"prune-keep": "", "prune-target": 0.5, "prune-steps": 0}
    assert book.order(1) == {"prune-keep": "", "prune-target": 0.0, "prune-steps": 0}
    assert json.loads(book.to_json()) == {"steps": [0, 0], "targets": [0.5, 0.0], "cut_for": [0.0, 0.0], "keeps": {}}


def test_a_book_round_trips_through_json(layers: list) -> None:
    scenario = _scenario(ratio=0.5, interval_steps=4, events=4)
    book = PruneBook(scenario, layers, np.array([0.5, 0.25]))
    book.record(0, TINY_KEEP, 8)
    book.cut_for[1] = 0.2
    other = PruneBook(scenario, layers, np.zeros(2))
    other.load(book.to_json())
    assert other.held(0) == TINY_KEEP and other.held(1) is None
    assert (
        other.steps.tolist() == [8, 0]
        and other.targets.tolist() == [0.5, 0.25]
        and other.cut_for.tolist() == [0.0, 0.2]
    )


def test_record_moves_the_client_along_its_schedule(layers: list) -> None:
    scenario = _scenario(ratio=0.5, interval_steps=4, events=4)
    book = PruneBook(scenario, layers, np.array([0.5, 0.2]))
    expected = [ratio_before_step(s, 0.5, 4, 4) for s in (0, 6, 12, 18)]
    got = [book.scheduled(0)]
    for _ in range(3):
        book.record(0, None, 6)
        got.append(book.scheduled(0))
    assert got == pytest.approx(expected) and got[-1] == pytest.approx(0.5)
    assert book.steps.tolist() == [18, 0] and book.held(0) is None  # no keep in the reply: nothing held
    assert book.scheduled(1) == pytest.approx(0.2 * (1 - 0.75**3))


def test_reached_once_a_step_trained_at_the_target(layers: list) -> None:
    """Events at steps 0, 4, 8 and 12 (0.289, 0.438, 0.492, 0.5): the 13th step is the first at 0.5."""
    book = PruneBook(_scenario(ratio=0.5, interval_steps=4, events=4), layers, np.array([0.5, 0.0]))
    got = []
    for steps in (0, 12, 1):
        book.record(0, None, steps)
        got.append(book.reached(0))
    assert got == [False, False, True]
    assert not book.reached(1)  # never trained


def test_record_keeps_the_last_keep_and_order_sends_it(layers: list) -> None:
    book = PruneBook(_scenario(ratio=0.5), layers, np.array([0.5, 0.5]))
    book.record(1, NON_UNIFORM, 8)
    other = Keep.everything(layers)
    book.record(1, other, 8)
    book.record(1, None, 8)  # a reply without a keep leaves the last one
    assert book.held(1) == other and book.held(0) is None
    order = book.order(1)
    assert Keep.from_json(str(order["prune-keep"])) == other
    assert (order["prune-target"], order["prune-steps"]) == (0.5, 24)
    assert isinstance(order["prune-steps"], int) and isinstance(order["prune-target"], float)
    saved = json.loads(book.to_json())
    assert saved["steps"] == [0, 24] and Keep.from_json(saved["keeps"]["1"]) == other


def test_ratio_is_the_share_of_prunable_parameters_removed(layers: list) -> None:
    book = PruneBook(_scenario(ratio=0.5), layers, np.array([0.5]))
    # layer 0 loses 1 group (6144) and 173 channels (173 × 192), layer 1 loses 88 channels
    removed = 6144 + 173 * 192 + 88 * 192
    assert book.ratio(NON_UNIFORM) == pytest.approx(removed / (2 * 46080))
    assert book.ratio(Keep.everything(layers)) == 0.0


# --- plan_server_keeps ----------------------------------------------------------------------


class CountingScores:
    def __init__(self, scores: Scores) -> None:
        self.scores, self.calls = scores, 0

    def __call__(self) -> Scores:
        self.calls += 1
        return self.scores


def test_server_cuts_only_clients_whose_schedule_grew_and_scores_once(layers: list) -> None:
    scenario = _scenario(ratio=0.5, where="server", interval_steps=4, events=4, client_ratios={"0": 0.0})
    book = PruneBook(scenario, layers, np.array([0.0, 0.5, 0.5, 0.5, 0.3]))
    scores = CountingScores(_scores(0, layers))
    ahead = select_keep(_scores(9, layers), layers, 0.6, "per_layer")  # client 3 already holds more than its schedule
    book.keeps[3] = ahead
    plan_server_keeps(book, [0, 1, 2, 3, 4], scores)
    assert scores.calls == 1
    assert book.held(0) is None and book.held(3) == ahead  # ratio 0; already past its scheduled ratio
    for cid in (1, 2, 4):
        expected = select_keep(scores.scores, layers, book.scheduled(cid), "per_layer")
        assert book.held(cid) == expected
    assert book.held(1) == book.held(2)  # same ratio, same scores


def test_server_cuts_within_what_the_client_holds(layers: list) -> None:
    scenario = _scenario(ratio=0.5, where="server", interval_steps=4, events=4)
    book = PruneBook(scenario, layers, np.array([0.5]))
    first = CountingScores(_scores(0, layers))
    plan_server_keeps(book, [0], first)
    held = book.held(0)
    book.record(0, held, 4)  # one interval on: the schedule grew
    second = CountingScores(_scores(1, layers))  # other scores would pick other structures
    plan_server_keeps(book, [0], second)
    assert second.calls == 1
    new = book.held(0)
    assert new == select_keep(second.scores, layers, book.scheduled(0), "per_layer", within=held)
    assert all(set(a) <= set(b) for a, b in zip(new.groups + new.channels, held.groups + held.channels))
    assert book.ratio(new) > book.ratio(held)


def test_no_score_is_computed_when_nobody_needs_a_cut(layers: list) -> None:
    scenario = _scenario(ratio=0.5, where="server", interval_steps=4, events=4)
    book = PruneBook(scenario, layers, np.array([0.0, 0.0]))
    scores = CountingScores(_scores(0, layers))
    plan_server_keeps(book, [0, 1], scores)
    plan_server_keeps(book, [], scores)
    assert scores.calls == 0 and book.keeps == {}


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_a_client_whose_schedule_did_not_grow_is_not_cut_again(layers: list, mode: str) -> None:
    # interval 20, rounds of 8 steps: the client's second round is still before its second event
    scenario = _scenario(ratio=0.5, where="server", interval_steps=20, events=4, mode=mode)
    book = PruneBook(scenario, layers, np.array([0.5]))
    first = CountingScores(_scores(0, layers))
    plan_server_keeps(book, [0], first)
    held = book.held(0)
    book.record(0, held, 8)
    assert book.scheduled(0) == ratio_before_step(0, 0.5, 20, 4)  # the same ratio as the first round
    again = CountingScores(_scores(1, layers))
    plan_server_keeps(book, [0], again)
    assert book.held(0) == held
    assert again.calls == 0, (
        f"scores recomputed for a client whose scheduled ratio {book.scheduled(0):.4f} did not grow "
        f"(it holds {book.ratio(held):.4f}: the cut undershot by less than a structure)"
    )


# --- ratio_problems -------------------------------------------------------------------------


def test_ratio_problems_name_each_unreachable_ratio_once(layers: list) -> None:
    # a layer keeps at least 1 group (6144) and 1 channel (192): at most 39744 of 46080, ratio 0.8625
    scenario = _scenario(ratio=0.5)
    assert ratio_problems(layers, scenario, [0.0, 0.5, 0.86]) == []
    problems = ratio_problems(layers, scenario, [0.9, 0.5, 0.9, 0.0, 0.95])
    assert len(problems) == 2
    assert problems[0].startswith("pruning ratio 0.9: ") and problems[1].startswith("pruning ratio 0.95: ")
    assert all("layer 0" in p and "at most 39744" in p and "ratio <= 0.8625" in p for p in problems)
    problems = ratio_problems(layers, _scenario(ratio=0.5, mode="global"), [0.9])
    assert len(problems) == 1 and "the model" in problems[0] and "at most 79488" in problems[0]
