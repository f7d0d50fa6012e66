"""The `privacy` section: defaults, every problem reported at once by its dotted path, the
cross-section refusals with their reasons, and a torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest

from fedsim.config.controller import ControllerConfig
from fedsim.config.errors import describe
from fedsim.config.names import STRATEGIES
from fedsim.config.privacy import DP_REFUSED, PrivacyConfig, privacy_problems
from fedsim.config.scenario import FleetConfig, PruningConfig, Scenario, StrategyConfig

ROOT = Path(__file__).resolve().parents[3]


class Holder(pydantic.BaseModel):
    """The section as the scenario will hold it, so errors carry the `privacy.` prefix."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    privacy: PrivacyConfig = PrivacyConfig()


def problems(raw: dict) -> list[str]:
    try:
        Holder.model_validate({"privacy": raw})
    except pydantic.ValidationError as exc:
        return [line for err in exc.errors() for line in describe(err)]
    return []


def test_defaults_are_off_and_toml_integers_are_accepted():
    cfg = PrivacyConfig()
    assert (cfg.mode, cfg.enabled, cfg.clip, cfg.noise_multiplier, cfg.delta, cfg.adaptive) == (
        "off", False, None, None, None, False,
    )  # fmt: skip
    on = Holder.model_validate({"privacy": {"mode": "central", "clip": 1, "noise_multiplier": 2}}).privacy
    assert (on.clip, on.noise_multiplier, on.enabled) == (1.0, 2.0, True)
    with pytest.raises(pydantic.ValidationError):
        on.clip = 3.0  # frozen


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            {"mode": "central", "noise_multiplier": 1.0},
            "`privacy.clip` is required with privacy.mode = 'central': the L2 bound of every update",
        ),
        ({"mode": "local", "clip": -1, "noise_multiplier": 1.0}, "`privacy.clip` must be greater than 0, got -1"),
        (
            {"mode": "central", "clip": 1.0, "noise_multiplier": 0},
            "`privacy.noise_multiplier` must be greater than 0, got 0",
        ),
        ({"delta": 1}, "`privacy.delta` must be less than 1, got 1"),
        ({"delta": 0.0}, "`privacy.delta` must be greater than 0, got 0.0"),
        (
            {"mode": "central", "clip": 1.0},
            "`privacy.noise_multiplier`: privacy.mode = 'central' needs noise: give noise_multiplier or target_epsilon",
        ),
        (
            {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0},
            "`privacy.target_epsilon` = 2.0 and `privacy.noise_multiplier` = 1.0 both set the noise: give one",
        ),
        (
            {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0, "adaptive": True},
            "`privacy.adaptive` needs privacy.mode = 'central': the count of unclipped updates is noised on the "
            "server, which local mode does not trust",
        ),
        ({"indicator_noise": -1.0}, "`privacy.indicator_noise` must be > 0 or 'auto', got -1.0"),
        ({"target_quantile": 1.0}, "`privacy.target_quantile` must be less than 1, got 1.0"),
        ({"mode": "on"}, "`privacy.mode` must be 'off', 'central' or 'local', got 'on'"),
        ({"noise": 1.0}, "`privacy.noise` is not a known key"),
    ],
)
def test_each_problem_names_its_dotted_path(raw, problem):
    assert problems(raw) == [problem]


def test_every_problem_is_reported_at_once():
    found = problems({"mode": "local", "noise_multiplier": 1.0, "target_epsilon": 1.0, "adaptive": True})

    assert [p.split(" ")[0] for p in found] == ["`privacy.clip`", "`privacy.target_epsilon`", "`privacy.adaptive`"]


def test_switching_privacy_off_keeps_the_other_settings_valid():
    assert problems({"mode": "off", "noise_multiplier": 1.0, "target_epsilon": 2.0}) == []


def test_the_refused_strategies_are_strategies_and_the_allowed_ones_sum_client_updates():
    assert set(DP_REFUSED) < set(STRATEGIES)
    allowed = [s for s in STRATEGIES if s not in DP_REFUSED]
    assert allowed == ["fedit", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "ffa_lora", "fedsa_lora"]


def sections(**changes) -> SimpleNamespace:
    base = {
        "privacy": PrivacyConfig(mode="central", clip=1.0, noise_multiplier=1.0),
        "strategy": StrategyConfig(),
        "fleet": FleetConfig(),
        "pruning": PruningConfig(),
        "controller": None,
    }
    return SimpleNamespace(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "start"),
    [
        ({"strategy": StrategyConfig(name="hetlora")}, "`strategy.name` = 'hetlora' cannot run with privacy.mode = "),
        ({"strategy": StrategyConfig(name="flora")}, "`strategy.name` = 'flora' cannot run with privacy.mode = "),
        ({"fleet": FleetConfig(overcommit=0.5)}, "`fleet.overcommit` = 0.5 must be 0 with privacy.mode = 'central'"),
        ({"fleet": FleetConfig(clock="measured")}, "`privacy.secure_noise` must be true on real devices"),
        ({"controller": ControllerConfig()}, "`controller` cannot run with privacy on"),
        ({"pruning": PruningConfig(ratio=0.3)}, "`pruning.where` = 'client' cannot run with privacy on"),
    ],
)
def test_cross_section_refusals_name_the_field_and_the_reason(changes, start):
    found = privacy_problems(sections(**changes))

    assert len(found) == 1 and found[0].startswith(start)


def test_a_refused_strategy_is_told_why_and_what_to_use():
    (problem,) = privacy_problems(sections(strategy=StrategyConfig(name="flexlora")))

    assert DP_REFUSED["flexlora"] in problem and "use fedit, fedprox," in problem


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"strategy": StrategyConfig(name="ffa_lora")},
        {"pruning": PruningConfig(ratio=0.3, where="server")},
        {
            "fleet": FleetConfig(clock="measured"),
            "privacy": PrivacyConfig(mode="local", clip=1.0, target_epsilon=8.0, secure_noise=True),
        },
        {"fleet": FleetConfig(overcommit=0.5), "privacy": PrivacyConfig(mode="local", clip=1.0, noise_multiplier=1.0)},
        {"strategy": StrategyConfig(name="hetlora"), "privacy": PrivacyConfig(mode="off")},
    ],
)
def test_allowed_combinations_raise_nothing(changes):
    assert privacy_problems(sections(**changes)) == []


def test_a_scenario_without_a_privacy_section_has_no_privacy_problems():
    assert privacy_problems(Scenario()) == []


def test_importing_the_section_loads_neither_torch_nor_dp_accounting():
    code = (
        "import sys; import fedsim.config.privacy; "
        "print(sorted(m for m in ('torch', 'dp_accounting', 'strategies', 'transformers', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_the_scenario_reports_privacy_problems_with_the_others_by_their_paths():
    from fedsim.config.scenario import ScenarioError, validate_scenario

    raw = {
        "train": {"lr": -1},
        "strategy": {"name": "flora"},
        "privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0},
    }
    with pytest.raises(ScenarioError) as info:
        validate_scenario(raw)

    paths = [p.split(" ")[0] for p in info.value.problems]
    assert paths == ["`train.lr`", "`strategy.name`"]  # the cross-section check ran on the sections that were valid


def test_a_default_privacy_section_does_not_travel_to_clients():
    off, on = Scenario(), Scenario(privacy=PrivacyConfig(mode="central", clip=1.0, noise_multiplier=1.0))

    assert "privacy" not in off.to_json() and Scenario.from_json(off.to_json()) == off
    assert Scenario.from_json(on.to_json()).privacy == on.privacy
