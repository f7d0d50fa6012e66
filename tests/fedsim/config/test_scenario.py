"""Scenario loading: every problem reported at once, by dotted path; overrides; round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config.scenario import Scenario, ScenarioError, load_scenario, parse_overrides, scenario_toml

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["tiny", "quickstart"])
def test_shipped_scenarios_load(name: str) -> None:
    scenario = load_scenario(ROOT / "scenarios" / f"{name}.toml")
    assert scenario.name == name
    assert scenario.clients.per_round <= scenario.clients.num_clients


BAD_CASES = [
    ("unknown key", "[train]\nlearning_rate = 0.1\n", "`train.learning_rate` is not a known key"),
    ("unknown section", "[trian]\nlr = 0.1\n", "`trian` is not a known key"),
    ("wrong type", '[train]\nlocal_steps = "ten"\n', "`train.local_steps` must be a valid integer, got 'ten'"),
    ("out of range", "[train]\nlr = -5\n", "`train.lr` must be greater than 0, got -5"),
    (
        "bad choice",
        '[data]\npartitioner = "random"\n',
        "`data.partitioner` must be 'iid', 'dirichlet', 'pathological' or 'natural', got 'random'",
    ),
    ("missing file", '[data]\ntask = "no/such/file.jsonl"\n', "`data.task`: file not found"),
    ("unknown task", '[data]\ntask = "poetry"\n', "`data.task`: unknown task 'poetry'"),
    ("unknown model", '[model]\nname = "gpt-17"\n', "`model.name`: unknown model 'gpt-17'"),
    (
        "unknown strategy",
        '[strategy]\nname = "fedmagic"\n',
        "`strategy.name`: unknown strategy 'fedmagic'; known: afa_cd, afa_cs, fedadagrad, fedadam, fedavgm, "
        "fedex_lora, fedit, fedprox, fedsa_lora, fedspeed, fedyogi, ffa_lora, flexlora, flora, hetlora, lora_fair",
    ),
    ("density 0", "[compression]\ndensity = 0.0\n", "`compression.density` must be greater than 0, got 0.0"),
    ("density > 1", "[compression]\ndensity = 1.5\n", "`compression.density` must be less than or equal to 1, got 1.5"),
    ("alpha <= 0", "[compression]\nalpha = -1.0\n", "`compression.alpha` must be > 0 or 'auto', got -1.0"),
    (
        "auto alpha with fedadam",
        "[compression]\nmethod = 'compeft'\n[strategy]\nname = 'fedadam'\n",
        "`compression.alpha` = 'auto' cannot be used with the stateful server optimiser 'fedadam'",
    ),
    (
        "bad alpha grid",
        "[compression]\nalpha_grid = [1.0, -2.0]\n",
        "`compression.alpha_grid` values must be > 0, got -2.0",
    ),
    (
        "per_round > clients",
        "[clients]\nnum_clients = 2\nper_round = 3\n",
        "`clients.per_round` must be <= clients.num_clients (2), got 3",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_scenario_names_the_problem(tmp_path: Path, case: str, text: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = '[train]\nlr = 0\nbatch_size = 0\n[lora]\nrank = "eight"\n[model]\nname = "nope"\n'
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    joined = "\n".join(info.value.problems)
    for path in ("`train.lr`", "`train.batch_size`", "`lora.rank`", "`model.name`"):
        assert path in joined
    assert len(info.value.problems) == 4


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(write(tmp_path, "rounds = = 3"))
    with pytest.raises(ScenarioError, match="scenario file not found"):
        load_scenario(tmp_path / "absent.toml")


def test_overrides_and_seed(tmp_path: Path) -> None:
    path = write(tmp_path, "rounds = 2\n[model]\nname = 'tiny-llama'\n")
    scenario = load_scenario(path, ["train.lr=0.01", "data.task=units", "lora.target_modules=['q_proj']"], seed=7)
    assert (scenario.train.lr, scenario.data.task, scenario.seed) == (0.01, "units", 7)
    assert scenario.lora.target_modules == ("q_proj",)
    assert scenario.name == "s"
    with pytest.raises(ScenarioError, match="dotted.key=value"):
        parse_overrides(["no-equals-sign"])


def test_resolved_scenario_round_trips(tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "tiny.toml")
    again = load_scenario(write(tmp_path, scenario_toml(scenario)))
    assert again.model_dump(exclude={"name"}) == scenario.model_dump(exclude={"name"})
    assert Scenario.from_json(scenario.to_json()) == scenario


def test_data_file_is_found_next_to_the_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    path = write(tmp_path, '[data]\ntask = "mine.jsonl"\n[model]\nname = "tiny-llama"\n')
    monkeypatch.chdir(ROOT)  # elsewhere: only the scenario's folder holds the file
    scenario = load_scenario(path)
    assert scenario.data.task == str((tmp_path / "mine.jsonl").resolve())
