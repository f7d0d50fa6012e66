"""FedSpeed end to end on the tiny model (in-process grid): each client trains by FedSpeed's local
rule and keeps its correction term ĝ on its node from one round to the next."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests_support.inprocess import InProcessGrid
from tests_support.scenarios import QUICK

from clients.app import CORRECTION_KEY
from fedsim.config.scenario import load_scenario
from fedsim.results.rundir import RunDir, read_metrics
from fedsim.server.federation import run_federation

TINY = Path(__file__).resolve().parents[2] / "scenarios" / "tiny.toml"
SMALL = ["rounds=2", "strategy.name=fedspeed", "clients.per_round=4", *QUICK]

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(tmp: Path, overrides: list[str]) -> tuple[InProcessGrid, Path]:
    scenario = load_scenario(TINY, [*SMALL, *overrides])
    run_dir, grid = RunDir.create(tmp, scenario), InProcessGrid(scenario)
    run_federation(grid, scenario, run_dir)  # type: ignore[arg-type]
    return grid, run_dir.path


def test_each_client_keeps_its_correction_term_and_the_run_trains(tmp_path: Path) -> None:
    grid, run = _run(tmp_path, [])
    held = [c.state.array_records[CORRECTION_KEY].to_torch_state_dict() for c in grid.contexts.values()]
    assert len(held) == 4 and all(any(float(v.abs().sum()) > 0 for v in h.values()) for h in held)
    metrics = read_metrics(run)
    train = metrics[metrics["kind"] == "train"]
    assert (train["status"] == "ok").all() and len(train) == 8
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["loss"]
    assert all(math.isfinite(v) for v in central) and central[2] < central[0]


def test_fedspeeds_rule_changes_the_update_so_it_is_not_fedits(tmp_path: Path) -> None:
    _, fedspeed = _run(tmp_path / "a", [])
    _, fedit = _run(tmp_path / "b", ["strategy.name=fedit"])
    a, b = (read_metrics(r).query("kind == 'train'")["update_norm"].to_numpy() for r in (fedspeed, fedit))
    assert not torch.allclose(torch.tensor(a), torch.tensor(b))
