"""The controller config: defaults, TOML-shaped input, and errors that name the field, the value
and what is allowed, all reported at once."""

from __future__ import annotations

import pydantic
import pytest

from fedsim.controllers import CONTROLLERS, ControllerConfig, ControllerConfigError, RewardConfig, validate_controller


def test_defaults():
    cfg = ControllerConfig()
    assert (cfg.name, cfg.ranks, cfg.ratios) == ("sucb", (4, 8, 16, 32), (0.0, 0.2, 0.4, 0.6))
    assert cfg.reward == RewardConfig() and cfg.fixed_arm is None and cfg.profile_arms == {}
    assert (cfg.pool, cfg.pool_pulls) == ("none", 10.0)


def test_toml_lists_are_accepted_and_the_config_is_frozen():
    cfg = validate_controller(
        {
            "name": "fixed",
            "ranks": [4, 8],
            "ratios": [0, 0.5],
            "fixed_arm": [8, 0.5],
            "profile_arms": {"phone": [4, 0]},
            "reward": {"floor": 0.1},
        }
    )
    assert (
        cfg.ratios == (0.0, 0.5)
        and cfg.fixed_arm == (8, 0.5)
        and cfg.profile_arms == {"phone": (4, 0.0)}
        and cfg.reward.floor == 0.1
    )
    with pytest.raises(pydantic.ValidationError):
        cfg.name = "ucb1"


KNOWN = ", ".join(sorted(CONTROLLERS))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"name": "bogus"}, f"`name`: unknown controller 'bogus'; known: {KNOWN}"),
        ({"ratios": [0.0, 0.99]}, "`ratios`: values must be in [0, 0.95], got 0.99"),
        ({"ratios": [0.2, 0.2]}, "`ratios`: duplicate value 0.2"),
        ({"ranks": [0, 8]}, "`ranks`: values must be >= 1, got 0"),
        ({"ranks": []}, "`ranks` Tuple should have at least 1 item after validation, not 0, got ()"),
        (
            {"fixed_arm": [12, 0.2]},
            "`fixed_arm`: (12, 0.2) is off the grid: rank 12 is not one of ranks [4, 8, 16, 32]",
        ),
        (
            {"profile_arms": {"phone": [4, 0.3]}},
            "`profile_arms`: phone = (4, 0.3) is off the grid: ratio 0.3 is not one of ratios [0.0, 0.2, 0.4, 0.6]",
        ),
        ({"exp3_gamma": 0}, "`exp3_gamma`: must be in (0, 1] or 'auto', got 0.0"),
        ({"discount": 1.5}, "`discount` must be less than or equal to 1, got 1.5"),
        ({"sucb_depth": 11}, "`sucb_depth` must be less than or equal to 10, got 11"),
        ({"screen_slack": 0.9}, "`screen_slack` must be greater than or equal to 1, got 0.9"),
        ({"reward": {"floor": -1}}, "`reward.floor` must be greater than or equal to 0, got -1"),
        (
            {"reward": {"normalise": "median"}},
            "`reward.normalise` must be 'round_max', 'round_mean', 'baseline' or 'none', got 'median'",
        ),
        (
            {"reward": {"contribution_weight": 0, "loss_weight": 0, "prune_weight": 0, "norm_weight": 0}},
            "`reward`: at least one of contribution_weight, loss_weight, "
            "prune_weight, norm_weight must be > 0, got all 0",
        ),
        (
            {"reward": {"infeasible_penalty": 0.5}},
            "`reward`: infeasible_penalty must be <= floor (0.01) so "
            "that a feasible arm always beats an infeasible one, got 0.5",
        ),
        ({"ucb": 1}, "`ucb` is not a known key"),
        (
            {"pool_weight": 3.0},
            "`pool_weight` is not a known key: replaced by `pool_pulls`, the most pulls' worth of evidence a device "
            "borrows from its peers (10; `fedsim.controllers.base`)",
        ),
    ],
)
def test_each_error_names_the_field_the_value_and_what_is_allowed(raw, problem):
    with pytest.raises(ControllerConfigError) as err:
        validate_controller(raw, "scenario.toml")
    assert err.value.problems == [problem]


def test_every_problem_is_reported_at_once():
    with pytest.raises(ControllerConfigError) as err:
        validate_controller({"name": "bogus", "ratios": [1.0], "window": 0, "reward": {"straggler_alpha": -1}})
    assert [p.split(" ")[0].rstrip(":") for p in err.value.problems] == [
        "`name`",
        "`ratios`",
        "`window`",
        "`reward.straggler_alpha`",
    ]
    assert str(err.value).startswith("controller config <dict> has 4 problem(s):")


def test_an_arm_is_not_checked_against_a_grid_that_is_itself_invalid():
    with pytest.raises(ControllerConfigError) as err:
        validate_controller({"ranks": [0], "fixed_arm": [12, 0.2]})
    assert err.value.problems == ["`ranks`: values must be >= 1, got 0"]
