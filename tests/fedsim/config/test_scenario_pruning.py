"""The scenario's [pruning] section: each problem named by its field, and the preflight refusing
a ratio that would empty a layer of the model."""

from __future__ import annotations

from typing import Any, get_args

import pytest

from fedsim.config.scenario import ImportanceScore, ScenarioError, validate_scenario
from fedsim.pruning.importance import SCORES
from fedsim.server.preflight import preflight


def _raw(pruning: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "model": {"name": "tiny-llama"},
        "clients": {"num_clients": 4, "per_round": 2},
        "lora": {"target_modules": ["q_proj", "v_proj", "up_proj"]},
        "fleet": {"groups": [{"profile": "jetson-tx2", "count": 2}, {"profile": "laptop-cpu", "count": 2}]},
        "pruning": pruning,
        **sections,
    }


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ScenarioError) as err:
        validate_scenario(raw)
    return err.value.problems


def test_a_valid_pruning_section() -> None:
    s = validate_scenario(
        _raw(
            {
                "ratio": 0.3,
                "profile_ratios": {"jetson-tx2": 0.5},
                "client_ratios": {"3": 0.0},
                "mode": "global",
                "where": "server",
            }
        )
    )
    assert s.pruning.enabled and s.pruning.profile_ratios == {"jetson-tx2": 0.5}
    assert not validate_scenario(_raw({})).pruning.enabled
    assert not validate_scenario(_raw({"ratio": 0.0, "client_ratios": {"1": 0.0}})).pruning.enabled
    assert validate_scenario(_raw({"client_ratios": {"1": 0.2}})).pruning.enabled


@pytest.mark.parametrize("ratio", [-0.1, 0.96, 1.0])
def test_a_ratio_outside_the_range_names_the_field(ratio: float) -> None:
    (problem,) = _problems(_raw({"ratio": ratio}))
    assert problem.startswith("`pruning.ratio`") and str(ratio) in problem
    assert ("0.95" in problem) if ratio > 0 else ("0" in problem)


@pytest.mark.parametrize("field", ["profile_ratios", "client_ratios"])
@pytest.mark.parametrize("ratio", [-0.2, 0.99])
def test_a_per_profile_or_per_client_ratio_outside_the_range_names_its_key(field: str, ratio: float) -> None:
    key = "jetson-tx2" if field == "profile_ratios" else "1"
    problems = _problems(_raw({field: {key: ratio}}))
    assert f"`pruning.{field}.{key}` = {ratio} must be in [0, 0.95]" in problems


def test_the_boundaries_are_allowed() -> None:
    validate_scenario(_raw({"ratio": 0.95, "importance": "magnitude"}))
    validate_scenario(_raw({"ratio": 0.0, "client_ratios": {"0": 0.95}, "importance": "magnitude"}))


def test_an_unknown_profile_in_profile_ratios_names_the_known_ones() -> None:
    problems = _problems(_raw({"ratio": 0.2, "profile_ratios": {"tablet": 0.5}}))
    (problem,) = [p for p in problems if "tablet" in p]
    assert problem.startswith("`pruning.profile_ratios.tablet`: unknown device profile; known: ")
    assert "jetson-tx2" in problem and "laptop-cpu" in problem


def test_a_custom_profile_may_be_given_a_ratio() -> None:
    profile = {"train_tflops": 1.0, "memory_gb": 4.0, "uplink_mbps": 10.0, "downlink_mbps": 50.0}
    raw = _raw(
        {"profile_ratios": {"mine": 0.4}},
        fleet={"profiles": {"mine": profile}, "groups": [{"profile": "mine", "count": 4}]},
    )
    assert validate_scenario(raw).pruning.profile_ratios == {"mine": 0.4}


@pytest.mark.parametrize(
    ("key", "expected"),
    [("4", "client 4 does not exist (clients 0..3)"), ("17", "client 17 does not exist (clients 0..3)")],
)
def test_a_client_id_out_of_range_is_named(key: str, expected: str) -> None:
    problems = _problems(_raw({"client_ratios": {key: 0.3}}))
    assert f"`pruning.client_ratios.{key}`: {expected}" in problems


def test_a_client_key_that_is_not_an_id_is_named() -> None:
    problems = _problems(_raw({"client_ratios": {"phone": 0.3}}))
    assert any("`pruning.client_ratios` keys are client ids, got 'phone'" in p for p in problems)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj", "o_proj"]])
def test_lora_grad_without_an_mlp_target_says_what_to_add(targets: list[str]) -> None:
    raw = _raw({"ratio": 0.3, "importance": "lora_grad"}, lora={"target_modules": targets})
    (problem,) = _problems(raw)
    assert problem.startswith("`pruning.importance` = 'lora_grad'")
    assert "MLP projection" in problem and "add one (e.g. gate_proj)" in problem
    assert "magnitude, activation or first_order" in problem
    assert str(targets) in problem
    for importance in ("magnitude", "activation", "first_order"):  # the alternatives it offers work
        validate_scenario(_raw({"ratio": 0.3, "importance": importance}, lora={"target_modules": targets}))


def test_lora_grad_without_an_attention_target_is_named_too() -> None:
    (problem,) = _problems(
        _raw({"ratio": 0.3, "importance": "lora_grad"}, lora={"target_modules": ["up_proj", "down_proj"]})
    )
    assert "attention projection" in problem and "MLP projection" not in problem


def test_lora_grad_is_not_checked_while_pruning_is_off() -> None:
    validate_scenario(_raw({"ratio": 0.0, "importance": "lora_grad"}, lora={"target_modules": ["q_proj"]}))


def test_compression_downlink_with_pruning_is_refused() -> None:
    raw = _raw({"ratio": 0.3}, compression={"method": "topk", "downlink": True})
    (problem,) = _problems(raw)
    assert problem.startswith("`compression.downlink`") and "pruned clients" in problem
    validate_scenario(_raw({"ratio": 0.0}, compression={"method": "topk", "downlink": True}))  # no pruning: fine


def test_every_pruning_problem_is_reported_at_once() -> None:
    raw = _raw(
        {"ratio": 0.3, "importance": "lora_grad", "profile_ratios": {"tablet": 0.2}, "client_ratios": {"9": 0.1}},
        lora={"target_modules": ["q_proj"]},
        compression={"downlink": True},
        strategy={"name": "flora"},
    )
    problems = _problems(raw)
    for fragment in (
        "`pruning.client_ratios.9`",
        "`pruning.profile_ratios.tablet`",
        "`strategy.name` = 'flora'",
        "`pruning.importance`",
        "`compression.downlink`",
    ):
        assert any(fragment in p for p in problems), (fragment, problems)


# --- preflight: what only the model can tell -----------------------------------------------


def test_preflight_accepts_reachable_ratios() -> None:
    preflight(validate_scenario(_raw({"ratio": 0.5, "importance": "magnitude"})), "<test>")
    preflight(validate_scenario(_raw({"ratio": 0.86, "importance": "magnitude", "mode": "global"})), "<test>")


@pytest.mark.parametrize(
    ("mode", "where", "limit"), [("per_layer", "layer 0", "39744"), ("global", "the model", "79488")]
)
def test_preflight_refuses_a_ratio_that_would_empty_a_layer(mode: str, where: str, limit: str) -> None:
    # tiny-llama: a layer is 2 KV groups of 6144 weights and 176 channels of 192 (46080); keeping 1 of
    # each leaves 39744 removable: ratio <= 0.8625
    scenario = validate_scenario(
        _raw({"ratio": 0.3, "client_ratios": {"2": 0.9}, "importance": "magnitude", "mode": mode})
    )
    with pytest.raises(ScenarioError) as err:
        preflight(scenario, "<test>")
    (problem,) = err.value.problems
    assert problem.startswith("`pruning`: pruning ratio 0.9: ")
    assert where in problem and f"at most {limit}" in problem and "ratio <= 0.8625" in problem
    assert "at least 1 KV group and 1 MLP channel" in problem


def test_preflight_names_each_unreachable_ratio() -> None:
    raw = _raw({"ratio": 0.9, "profile_ratios": {"laptop-cpu": 0.95}, "importance": "magnitude"})
    with pytest.raises(ScenarioError) as err:
        preflight(validate_scenario(raw), "<test>")
    assert [p.split(":")[1].strip() for p in err.value.problems] == ["pruning ratio 0.9", "pruning ratio 0.95"]


def test_the_scenarios_importance_choices_are_the_scores_fedsim_computes() -> None:
    assert sorted(get_args(ImportanceScore)) == sorted(SCORES)
