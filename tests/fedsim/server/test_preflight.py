"""`fedsim.server.preflight` on what only loading shows: the data read whole and partitioned, the
model loaded, the fleet's files; every problem names its key and file."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.server import preflight as pf

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File loaders write Arrow caches: keep them out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_the_tiny_scenario_passes() -> None:
    pf.preflight(load_scenario(TINY), "tiny.toml")


def test_a_partitioning_that_leaves_a_client_empty_is_refused_with_the_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # flwr-datasets' partitioners refuse most such splits themselves; this is the guard behind them.
    monkeypatch.setattr(pf, "partition_sizes", lambda data, num_clients, seed: [30, 0, 12, 0])
    scenario = load_scenario(TINY, ["data.partitioner='pathological'"])
    assert pf.data_problems(scenario) == [
        "`data.partitioner` = 'pathological' leaves 2 of 4 clients without examples (clients 1, 3; 42 examples "
        "partitioned, 30 at most per client): add examples, use fewer clients, or another partitioner"
    ]


def test_data_and_model_problems_are_reported_together(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(50)))
    scenario = load_scenario(TINY, [f"data.task='{data}'", f"model.name='{tmp_path}'"])
    with pytest.raises(ScenarioError) as info:
        pf.preflight(scenario, "tiny.toml")
    model, data_problem = info.value.problems
    assert model.startswith(f"`model.name`: model '{tmp_path}': cannot load a causal LM and tokenizer")
    assert data_problem.startswith(f"`data.task`: {data}: no prompt field")
    assert data_problem.endswith("columns found: question, answer")


def test_a_fleet_file_problem_names_the_key_and_the_file(tmp_path: Path) -> None:
    profiles = tmp_path / "p.toml"
    profiles.write_text("[board]\ntrain_tflops = 1.0\nmemory_gb = 4.0\nuplink_mbps = 0.0\ndownlink_mbps = 10.0\n")
    scenario = load_scenario(TINY, [f"fleet.profiles_file='{profiles}'"])
    with pytest.raises(ScenarioError) as info:
        pf.preflight(scenario, "tiny.toml")
    assert info.value.problems == [
        f"`fleet.profiles_file`: {profiles}: `board.uplink_mbps` must be greater than 0, got 0.0"
    ]
