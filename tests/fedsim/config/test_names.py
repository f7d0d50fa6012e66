"""`fedsim.config.names` declares every name a scenario may use; each registry that implements
them holds exactly those names, so the torch-free scenario check and the code that runs agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedsim.config import names
from fedsim.config.scenario import load_scenario
from fedsim.controllers import CONTROLLERS
from fedsim.data.tasks import TASKS
from fedsim.model.loader import list_models
from fedsim.pruning.importance import SCORES
from fedsim.pruning.select import MAX_RATIO
from strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[3]


def test_every_registry_implements_exactly_the_declared_names() -> None:
    assert list(STRATEGIES) == list(names.STRATEGIES)
    assert sorted(CONTROLLERS) == sorted(names.CONTROLLERS)
    assert tuple(TASKS) == names.TASKS
    assert [m.name for m in list_models()] == list(names.MODELS)
    assert SCORES == names.IMPORTANCE_SCORES
    assert MAX_RATIO == names.MAX_RATIO


def test_a_strategy_refuses_pruned_clients_exactly_when_the_names_say_so_and_for_that_reason() -> None:
    scenario = load_scenario(ROOT / "scenarios/tiny.toml")
    refusals = {name: type(build(scenario)).pruning_refused for name, build in STRATEGIES.items()}
    assert {name: reason for name, reason in refusals.items() if reason} == names.PRUNING_REFUSED


def test_the_strategies_whose_clients_keep_state_are_those_that_keep_their_own_b_or_a_correction() -> None:
    from fedsim.protocol import FEDSPEED_LAMBDA

    scenario = load_scenario(ROOT / "scenarios/tiny.toml")
    built = {name: build(scenario) for name, build in STRATEGIES.items()}
    keep_b = {name for name, s in built.items() if "B" not in type(s).downloads}
    keep_correction = {name for name, s in built.items() if FEDSPEED_LAMBDA in s.instructions(4)}
    assert keep_b | keep_correction == set(names.CLIENT_STATE) == {"fedsa_lora", "fedspeed"}


def test_validating_a_scenario_loads_neither_torch_nor_the_strategies() -> None:
    code = (
        "import sys; from fedsim.config.scenario import load_scenario; load_scenario('scenarios/tiny.toml'); "
        "print(sorted(m for m in ('torch', 'strategies', 'transformers', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
