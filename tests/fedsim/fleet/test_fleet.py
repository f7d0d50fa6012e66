"""Building the fleet from a scenario: groups, traces, jitter, and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim.config.devices import CATALOG
from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.fleet.fleet import build_fleet, describe
from fedsim.server.preflight import preflight

ROOT = Path(__file__).resolve().parents[3]


def test_fedspine_testbed() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "fedspine-jetson-80.toml")
    fleet = build_fleet(scenario)
    assert describe(fleet) == "30 jetson-tx2, 40 jetson-xavier-nx, 10 jetson-agx-orin"
    tx2 = fleet.flops[fleet.device == "jetson-tx2"]
    assert np.median(tx2) == pytest.approx(CATALOG["jetson-tx2"].train_tflops * 1e12, rel=0.15)
    assert len(np.unique(tx2)) == 30  # jitter: no two devices alike


def test_same_seed_same_fleet_other_seed_other_jitter() -> None:
    path = ROOT / "scenarios" / "phones-and-laptops.toml"
    a, b, c = (build_fleet(load_scenario(path, seed=s)) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.flops, b.flops)
    assert not np.array_equal(a.flops, c.flops)


def test_trace_fleet() -> None:
    fleet = build_fleet(load_scenario(ROOT / "scenarios" / "campus-trace.toml"))
    assert fleet.size == 40
    online = fleet.availability.online(np.arange(40), 3 * 3600.0, 1)
    assert 0 < online.sum() < 40


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fleet.groups=[{profile='jetson-tx2', count=3}]"], "must equal the fleet's size (3 devices)"),
        (["fleet.groups=[{profile='jetson-tx9', count=4}]"], "unknown device profile(s) 'jetson-tx9'"),
        (
            ["fleet.profiles={x={train_tflops=1.0, memory_gb=1.0, uplink_mbps=0.0, downlink_mbps=1.0}}"],
            "`fleet.profiles.x.uplink_mbps` must be greater than 0",
        ),
        (["fleet.deadline_s=0.000001"], "shorter than any device's estimated round time"),
    ],
)
def test_bad_fleets_are_refused_before_running(overrides: list[str], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario = load_scenario(ROOT / "scenarios" / "tiny.toml", overrides)
        preflight(scenario, "tiny.toml")
    assert message in str(info.value)


def test_malformed_trace_row_names_its_line(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("client_id,profile,windows\n0,laptop-cpu,0-100\n1,laptop-cpu,50-10\n")
    scenario = load_scenario(
        ROOT / "scenarios" / "tiny.toml",
        [f"fleet.trace='{trace}'", "clients.num_clients=2", "clients.per_round=2", "clients.eval_per_round=2"],
    )
    with pytest.raises(ScenarioError, match="line 3"):
        preflight(scenario, "tiny.toml")
