"""Anarchic participation on the asynchronous clock (`fedsim.server.asynchronous`), end to end on the
tiny model through an in-process grid: stale updates are recorded and bounded, devices run the
steps they chose, energy is billed, and the run is a function of its seed."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from tests_support.inprocess import InProcessGrid

from fedsim.config.devices import Battery
from fedsim.config.scenario import load_scenario
from fedsim.fleet.energy import Batteries, BatterySpec
from fedsim.protocol import CONFIG_RECORD, LOCAL_STEPS, SERVER_ROUND
from fedsim.results.rundir import RunDir, read_metrics
from fedsim.server.asynchronous import AsyncClock
from fedsim.server.federation import run_federation
from fedsim.server.resume import resume_point
from strategies import STRATEGIES

TINY = Path(__file__).resolve().parents[3] / "scenarios" / "tiny.toml"
ASYNC = [
    "rounds=4", "strategy.name=afa_cd", "clients.num_clients=6", "clients.per_round=2",
    "participation.concurrency=4", "participation.min_steps=1", "participation.max_steps=4",
    "data.central_test_size=8", "eval.max_new_tokens=2", "eval.client_examples=2", "clients.eval_per_round=0",
    "fleet.groups=[{profile='phone-midrange', count=3}, {profile='laptop-cpu', count=3}]",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(tmp: Path, overrides: list[str]) -> tuple[pd.DataFrame, InProcessGrid]:
    scenario = load_scenario(TINY, [*ASYNC, *overrides])
    run_dir, grid = RunDir.create(tmp, scenario), InProcessGrid(scenario)
    run_federation(grid, scenario, run_dir)  # type: ignore[arg-type]
    return read_metrics(run_dir.path), grid


def test_stale_updates_are_aggregated_with_their_version_steps_and_energy(tmp_path: Path) -> None:
    metrics, grid = _run(tmp_path, [])
    train = metrics[metrics["kind"] == "train"]
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")
    ok = train[train["status"] == "ok"]
    assert (ok.groupby("round").size() == 2).all()  # m = per_round updates a step
    assert ok["staleness"].max() >= 1  # 4 in flight, 2 taken a step: the others arrive a step later
    assert (ok["staleness"] == ok["round"] - ok["model_version"]).all()
    assert set(ok["local_steps"]) <= {1, 2, 3, 4} and ok["local_steps"].nunique() > 1
    chose = {  # (client, the step it started at) → the steps its message named
        (e.message.metadata.dst_node_id - 100, e.message.content[CONFIG_RECORD][SERVER_ROUND]): e.message.content[
            CONFIG_RECORD
        ][LOCAL_STEPS]
        for e in grid.train
    }
    assert [chose[(c, v)] for c, v in zip(ok["client_id"], ok["model_version"])] == ok["local_steps"].tolist()
    assert ok["flops"].corr(ok["local_steps"]) > 0.9  # and ran them: its FLOPs grow with them
    assert (ok["energy_j"] > 0).all()
    for r in range(1, 5):  # a step's energy is its arrivals'; the clock moves to its last arrival
        rows = train[train["round"] == r]
        assert central.loc[r, "energy_j"] == pytest.approx(rows["energy_j"].sum())
    assert central["sim_time_s"].is_monotonic_increasing and central.loc[4, "sim_time_s"] > 0
    assert math.isfinite(central.loc[4, "loss"]) and central.loc[4, "loss"] < central.loc[0, "loss"]


def test_same_seed_same_metrics_and_another_seed_differs(tmp_path: Path) -> None:
    a, _ = _run(tmp_path / "a", [])
    b, _ = _run(tmp_path / "b", [])
    c, _ = _run(tmp_path / "c", ["seed=1"])
    cols = ["round", "client_id", "status", "staleness", "local_steps", "loss", "sim_compute_s"]
    train = lambda m: m[m["kind"] == "train"][cols].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(train(a), train(b))
    loss = lambda m: m[m["kind"] == "eval_central"]["loss"].to_numpy()  # noqa: E731
    assert (loss(a) == loss(b)).all() and not (loss(a) == loss(c)).all()


def test_updates_staler_than_the_bound_are_dropped_not_aggregated(tmp_path: Path) -> None:
    metrics, _ = _run(tmp_path, ["participation.max_staleness=0", "strategy.name=afa_cs"])
    train = metrics[metrics["kind"] == "train"]
    stale = train[train["status"] == "stale"]
    assert len(stale) > 0 and (stale["staleness"] > 0).all()
    assert (train[train["status"] == "ok"]["staleness"] == 0).all()
    assert stale["reason"].str.contains("max_staleness").all()


def test_an_asynchronous_run_is_not_resumed_and_says_why(tmp_path: Path) -> None:
    scenario = load_scenario(TINY, [*ASYNC, "rounds=1"])
    run_dir = RunDir.create(tmp_path, scenario)
    run_federation(InProcessGrid(scenario), scenario, run_dir)  # type: ignore[arg-type]
    more = load_scenario(TINY, [*ASYNC, "rounds=2"])
    with pytest.raises(ValueError, match="cannot be resumed, because the updates its devices had in flight"):
        resume_point(RunDir.open(run_dir.path), more)


def test_a_device_slower_than_the_deadline_is_a_straggler_billed_until_the_server_gave_up(tmp_path: Path) -> None:
    metrics, _ = _run(tmp_path, ["fleet.deadline_s=0.05"])  # phones take ~0.1 s a trip here, laptops ~0.03 s
    train = metrics[metrics["kind"] == "train"]
    late = train[train["status"] == "straggler"]
    assert len(late) > 0 and set(late["device"]) == {"phone-midrange"}
    assert (late["sim_compute_s"] + late["sim_comm_s"] > 0.05).all()
    assert late["reason"].str.contains("deadline").all()
    full = _run(tmp_path / "no-deadline", [])[0]
    phone = full[(full["kind"] == "train") & (full["device"] == "phone-midrange") & (full["status"] == "ok")]
    assert late["energy_j"].max() < phone["energy_j"].min()  # cut at the deadline: less than a whole trip


def test_the_battery_policy_gives_a_fuller_battery_more_steps() -> None:
    scenario = load_scenario(
        TINY,
        [*ASYNC, "participation.steps_policy='battery'", "participation.min_steps=2", "participation.max_steps=10"],
    )
    spec = BatterySpec.of([Battery(capacity_wh=1.0, initial_charge=c) for c in (0.0, 0.5, 1.0)] + [None] * 3)
    env = SimpleNamespace(scenario=scenario, strategy=STRATEGIES["afa_cd"](scenario), batteries=Batteries(spec))
    steps = AsyncClock(env)._local_steps(np.arange(6), 1, 0.0, 0)  # type: ignore[arg-type]
    assert steps == {0: 2, 1: 6, 2: 10, 3: 10, 4: 10, 5: 10}  # empty, half, full, then mains-powered: the most
