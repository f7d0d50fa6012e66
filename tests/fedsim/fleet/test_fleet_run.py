"""The fleet on Flower's engine: simulated times, deadlines, availability, memory.

One federation with a fleet built to make every rule visible at once (tiny model, 2 rounds):
fast and slow custom devices (1000× apart), a deadline between them, devices that are online
only some rounds, and a device whose memory cannot hold a training step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.config.scenario import load_scenario
from fedsim.fleet.fleet import build_fleet
from fedsim.results.rundir import RunDir, read_metrics
from fedsim.runtime.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[3]
FAST, SLOW = 1e-3, 1e-6  # TFLOP/s: a round of the tiny model takes seconds vs thousands of seconds
DEADLINE = 100.0
FLEET = [
    "fleet.jitter=0",
    f"fleet.deadline_s={DEADLINE}",
    "fleet.profiles={"
    f"fast={{train_tflops={FAST}, memory_gb=8.0, uplink_mbps=100.0, downlink_mbps=100.0}}, "
    f"slow={{train_tflops={SLOW}, memory_gb=8.0, uplink_mbps=100.0, downlink_mbps=100.0}}, "
    "tinymem={train_tflops=1.0, memory_gb=0.00001, uplink_mbps=100.0, downlink_mbps=100.0}}",
    "fleet.groups=["
    "{profile='fast', count=2}, {profile='slow', count=2}, {profile='tinymem', count=1}, "
    "{profile='fast', count=3, availability={kind='bernoulli', p=0.5}}]",
    "clients.num_clients=8",
    "clients.per_round=8",
    "clients.eval_per_round=0",
    "rounds=2",
    "data.num_examples=600",
]


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, object]:
    scenario = load_scenario(ROOT / "scenarios" / "tiny.toml", FLEET)
    run_dir = RunDir.create(tmp_path_factory.mktemp("runs"), scenario)
    run_simulation(scenario, run_dir)
    return read_metrics(run_dir.path), scenario


def train_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics[metrics["kind"] == "train"].set_index(["round", "client_id"])


def test_compute_time_is_flops_over_device_speed(fleet_run) -> None:  # type: ignore[no-untyped-def]
    metrics, _ = fleet_run
    trained = metrics[(metrics["kind"] == "train") & metrics["flops"].notna()]
    speed = trained["device"].map({"fast": FAST, "slow": SLOW}) * 1e12
    np.testing.assert_allclose(trained["sim_compute_s"], trained["flops"] / speed, rtol=1e-12)
    # same work, 1000x slower device: 1000x the compute time
    per_flop = (trained["sim_compute_s"] / trained["flops"]).groupby(trained["device"]).mean()
    assert per_flop["slow"] / per_flop["fast"] == pytest.approx(FAST / SLOW)
    assert (trained["bytes_up"] > 0).all() and (trained["bytes_down"] > 0).all()


def test_deadline_drops_exactly_the_clients_that_exceed_it(fleet_run) -> None:  # type: ignore[no-untyped-def]
    metrics, _ = fleet_run
    trained = metrics[(metrics["kind"] == "train") & metrics["flops"].notna()]
    finish = trained["sim_compute_s"] + trained["sim_comm_s"]
    late = finish > DEADLINE
    assert late.any() and (~late).any()
    assert (trained.loc[late, "status"] == "straggler").all()
    assert trained.loc[late, "reason"].str.contains("deadline").all()
    assert (trained.loc[~late, "status"] == "ok").all()
    assert set(trained.loc[late, "device"]) == {"slow"}
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["sim_time_s"]
    assert central[1] == pytest.approx(DEADLINE) and central[2] == pytest.approx(2 * DEADLINE)


def test_infeasible_client_is_flagged_and_not_trained(fleet_run) -> None:  # type: ignore[no-untyped-def]
    rows = train_rows(fleet_run[0])
    for r in (1, 2):
        row = rows.loc[(r, 4)]
        assert row["status"] == "infeasible" and "GiB" in row["reason"]
        assert np.isnan(row["loss"]) and row["tokens"] == 0


def test_offline_devices_are_never_sampled(fleet_run) -> None:  # type: ignore[no-untyped-def]
    metrics, scenario = fleet_run
    fleet = build_fleet(scenario)
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["sim_time_s"]
    rows = train_rows(metrics)
    part_time = np.arange(5, 8)
    seen_offline = False
    for r in (1, 2):
        online = fleet.availability.online(part_time, central[r - 1], r)
        seen_offline |= not online.all()
        sampled = {c for (rr, c) in rows.index if rr == r}
        assert sampled & set(part_time) == set(part_time[online].tolist())
    assert seen_offline  # the draw did take someone offline, so the check above means something
