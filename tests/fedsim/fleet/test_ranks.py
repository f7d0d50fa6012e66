"""Per-client LoRA ranks: where they come from, and the inputs that are refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from clients.app import _rank_penalty
from fedsim.config.scenario import LoraConfig, ScenarioError, validate_scenario
from fedsim.fleet.fleet import build_fleet
from fedsim.fleet.ranks import ClientRanks, client_ranks
from fedsim.model.adapter import attach_lora, get_state, set_state, set_trainable, use_rank
from fedsim.model.loader import load_model
from fedsim.server.preflight import preflight
from strategies.lora_math import hetlora_rank_penalty

GROUPS = [
    {"profile": "phone-midrange", "count": 2},
    {"profile": "jetson-tx2", "count": 1},
    {"profile": "laptop-cpu", "count": 1},
]


def scenario(**sections: Any) -> Any:
    raw = {"model": {"name": "tiny-llama"}, "clients": {"num_clients": 4}, "fleet": {"groups": GROUPS}, **sections}
    return validate_scenario(raw)


def test_rank_per_client_then_per_profile_then_global() -> None:
    s = scenario(lora={"rank": 8, "profile_ranks": {"phone-midrange": 2, "jetson-tx2": 4}, "client_ranks": {"1": 6}})
    assert client_ranks(s, build_fleet(s)).tolist() == [2, 6, 4, 8]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"lora": {"rank": 4, "profile_ranks": {"phone-midrange": 8}}},
            "`lora.profile_ranks.phone-midrange` = 8 must be in [1, lora.rank = 4]",
        ),
        ({"lora": {"client_ranks": {"7": 2}}}, "`lora.client_ranks.7`: client 7 does not exist (clients 0..3)"),
        ({"lora": {"client_ranks": {"first": 2}}}, "`lora.client_ranks` keys are client ids, got 'first'"),
        ({"lora": {"profile_ranks": {"toaster": 2}}}, "`lora.profile_ranks.toaster`: unknown device profile; known:"),
        (
            {"lora": {"rank": 8, "profile_ranks": {"phone-midrange": 2}}, "compression": {"downlink": True}},
            "`compression.downlink` needs one rank for every client",
        ),
        (
            {"strategy": {"name": "flora"}, "compression": {"downlink": True}},
            "`compression.downlink` cannot carry 'flora'",
        ),
        (
            {"strategy": {"name": "fedsa_lora"}, "clients": {"num_clients": 4, "eval_per_round": 0}},
            "`clients.eval_per_round` must be >= 1",
        ),
    ],
)
def test_bad_ranks_are_refused_with_what_is_wrong(sections: dict[str, Any], expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario(**sections)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_a_rank_a_layer_cannot_hold_is_refused_naming_the_layer_and_limit() -> None:
    # tiny-llama: hidden 64, 2 key/value heads of 16 → v_proj is 64→32
    s = scenario(lora={"rank": 48, "profile_ranks": {"phone-midrange": 40}})
    with pytest.raises(ScenarioError) as info:
        preflight(s, "tiny")
    assert info.value.problems == [
        "LoRA rank 40 is larger than layer 0 v_proj (64→32) allows: the rank must be <= min(in, out) = 32",
        "LoRA rank 48 is larger than layer 0 v_proj (64→32) allows: the rank must be <= min(in, out) = 32",
    ]
    preflight(scenario(lora={"rank": 32}), "tiny")  # at the limit: fine


def test_one_model_holds_an_adapter_per_rank_and_trains_only_the_active_one() -> None:
    lora = LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    model = attach_lora(load_model("tiny-llama")[0], lora, seed=0)
    use_rank(model, lora, 2)
    small = get_state(model)
    assert {v.shape[0] for k, v in small.items() if "lora_A" in k} == {2}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".rank-2." in n for n in trainable)
    set_trainable(model, freeze="A")  # FFA-LoRA
    assert all("lora_B" in n for n, p in model.named_parameters() if p.requires_grad)
    use_rank(model, lora, 8)
    assert {v.shape[0] for k, v in get_state(model).items() if "lora_A" in k} == {8}
    set_state(model, {k: torch.zeros_like(v) for k, v in get_state(model).items()})


def test_the_hetlora_penalty_sums_every_layers_tail_norm() -> None:
    lora = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model = attach_lora(load_model("tiny-llama")[0], lora, seed=0)
    state = {k: torch.randn_like(v) for k, v in get_state(model).items()}
    set_state(model, state)
    penalty = _rank_penalty(model, 4, {"rank-penalty-lambda": 0.5, "rank-penalty-gamma": 0.5})
    pairs = [(state[k.replace("lora_A", "lora_B")], state[k]) for k in state if "lora_A" in k]
    expected = sum(hetlora_rank_penalty(B, A, 4, 0.5, 0.5) for B, A in pairs)
    torch.testing.assert_close(penalty(), expected)
    assert _rank_penalty(model, 4, {}) is None  # other strategies: no penalty


def test_a_self_pruned_rank_caps_the_client_and_a_later_arm_cannot_raise_it() -> None:
    ranks = ClientRanks(np.array([8, 4, 16]))
    ranks.keep(0, 6)
    assert [ranks.of(c) for c in range(3)] == [6, 4, 16]
    ranks.assigned[:] = [16, 2, 16]  # the controller's next arms, written in place
    assert [ranks.of(c) for c in range(3)] == [6, 2, 16]
    assert ranks.of_many(np.array([2, 0, 1])).tolist() == [16, 6, 2]  # the vectorised form agrees
