"""Energy on the clock, end to end: `spend_energy` against E_k worked by hand (kept, cut stragglers,
the measured clock, an unknown figure, battery drains), then the tiny model with fedsim's own
ClientApp in this process (`tests_support.inprocess`):

- every client that ran carries `energy_j` and the round's central row their sum, the run's the
  running total; a resumed run goes on from it;
- with batteries on and a tiny capacity, phones drop out once drained and come back once a
  charging window has charged them; a resumed run's charges are the uninterrupted run's;
- bad power figures and a battery threshold outside [0, 1] are refused before anything runs, exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from tests_support.inprocess import InProcessGrid
from tests_support.scenarios import QUICK

from fedsim.cli import main
from fedsim.config.devices import Battery
from fedsim.config.scenario import Scenario, ScenarioError, load_scenario
from fedsim.fleet.energy import Batteries, BatterySpec
from fedsim.results.rundir import BATTERIES_FILE, RunDir, load_arrays, read_metrics
from fedsim.server.federation import run_federation
from fedsim.server.resume import resume_point
from fedsim.server.rounds import spend_energy

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"
SMALL = QUICK
MB = 1e6

# --- spend_energy against E_k by hand ---------------------------------------------------------------

P_TRAIN, P_IDLE, E_UP, E_DOWN = 4.0, 0.5, 5.0, 1.0  # W, W, J/MB, J/MB
DOWN_BPS, UP_BPS = 8e6, 4e6  # 1 MB down: 1 s; 1 MB up: 2 s


def fleet(n: int, train_watts: float = P_TRAIN) -> SimpleNamespace:
    """The arrays `spend_energy` reads, every client alike (client 0's training power `train_watts`)."""
    watts = np.full(n, P_TRAIN)
    watts[0] = train_watts
    return SimpleNamespace(
        train_watts=watts, idle_watts=np.full(n, P_IDLE), radio_j_per_mb_up=np.full(n, E_UP),
        radio_j_per_mb_down=np.full(n, E_DOWN), down_bps=np.full(n, DOWN_BPS), up_bps=np.full(n, UP_BPS),
    )  # fmt: skip


def row(cid: int, status: str, compute: float, mb_down: float, mb_up: float) -> dict[str, Any]:
    """A train row as `record` writes it: link seconds from the bytes at the clock's rates."""
    comm = 8 * mb_down * MB / DOWN_BPS + 8 * mb_up * MB / UP_BPS
    return {
        "round": 1, "client_id": cid, "kind": "train", "status": status, "sim_compute_s": compute,
        "sim_comm_s": comm, "bytes_up": int(mb_up * MB), "bytes_down": int(mb_down * MB),
    }  # fmt: skip


def env(n: int, *, measured: bool = False, batteries: Batteries | None = None, **figures: float) -> Any:
    return SimpleNamespace(fleet=fleet(n, **figures), measured=measured, batteries=batteries)


def rows() -> list[dict[str, Any]]:
    """A round of 10 s: client 0 kept (1 s down, 4 s training, 2 s up: idles 3 s), client 1 cut while
    training (1 + 20 + 2 s), client 2 cut half way through its upload (2 + 4 + 8 s), client 3 dropped."""
    return [
        row(0, "ok", 4.0, 1.0, 1.0),
        row(1, "straggler", 20.0, 1.0, 1.0),
        row(2, "straggler", 4.0, 2.0, 4.0),
        {"round": 1, "client_id": 3, "kind": "train", "status": "dropped"},
        {"round": 1, "client_id": 0, "kind": "eval_client", "status": "ok"},
    ]


# E_k = P_train·compute + e_up·MB up + e_down·MB down + P_idle·wait, what each got through by 10 s
KEPT = P_TRAIN * 4 + E_UP * 1 + E_DOWN * 1 + P_IDLE * 3
CUT_TRAINING = P_TRAIN * 9 + E_DOWN * 1  # 1 s down, then 9 of its 20 s of training
CUT_SENDING = P_TRAIN * 4 + E_DOWN * 2 + E_UP * 4 * 0.5  # 4 of its 8 s of upload


def test_each_client_that_ran_is_billed_what_it_got_through_by_the_round_end() -> None:
    billed = rows()
    total = spend_energy(env(4), billed, round_s=10.0, t_start=100.0)
    assert [r.get("energy_j") for r in billed] == pytest.approx([KEPT, CUT_TRAINING, CUT_SENDING, None, None])
    assert total == pytest.approx(KEPT + CUT_TRAINING + CUT_SENDING)


def test_on_the_measured_clock_nothing_is_cut() -> None:
    billed = rows()
    spend_energy(env(4, measured=True), billed, round_s=10.0, t_start=0.0)
    whole = [P_TRAIN * 20 + E_UP + E_DOWN, P_TRAIN * 4 + E_UP * 4 + E_DOWN * 2]  # no wait: both finished after 10 s
    assert [billed[1]["energy_j"], billed[2]["energy_j"]] == pytest.approx(whole)


def test_an_unknown_figure_makes_the_client_and_the_round_unknown_not_zero() -> None:
    billed = rows()
    total = spend_energy(env(4, train_watts=math.nan), billed, round_s=10.0, t_start=0.0)
    assert math.isnan(billed[0]["energy_j"]) and billed[1]["energy_j"] == pytest.approx(CUT_TRAINING)
    assert math.isnan(total)


def test_a_round_without_a_client_that_ran_costs_nothing() -> None:
    assert spend_energy(env(4), rows()[3:], round_s=10.0, t_start=0.0) == 0.0


def test_batteries_are_drained_when_each_client_stops() -> None:
    capacity = 1000.0
    book = Batteries(BatterySpec.of([Battery(capacity_wh=capacity / 3600), None, Battery(capacity_wh=capacity / 3600)]))
    spend_energy(env(4, batteries=book), rows()[:3], round_s=10.0, t_start=100.0)
    np.testing.assert_allclose(book.charge_j[[0, 2]], [capacity - KEPT, capacity - CUT_SENDING])
    assert math.isnan(book.charge_j[1])  # mains-powered
    np.testing.assert_array_equal(book.updated_s[[0, 1, 2]], [107.0, 110.0, 110.0])  # finished at 7 s; cut at 10 s


# --- the tiny model, in this process ---------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's Message() reads the running task's identity

PHONES = """
[fleet]
batteries = true
idle_step_s = 1000.0
groups = [{profile = "toy-phone", count = 2}]

[fleet.profiles.toy-phone]
train_tflops = 0.001
memory_gb = 4
uplink_mbps = 8
downlink_mbps = 30
train_watts = 4.0
idle_watts = 0.5
radio_j_per_mb_up = 4.8
radio_j_per_mb_down = 0.76
battery = { capacity_wh = 0.0005, threshold = 0.5, charging = [{ start_h = 0.5, end_h = 1.0, watts = 1.0 }] }
"""  # 1.8 J, below a round's cost (~2.5 J): empty after one; charged from 30 min past midnight at 1 W


def scenario(tmp: Path, overrides: list[str], extra: str = "") -> Scenario:
    path = tmp / "tiny.toml"
    path.write_text(TINY.read_text() + extra)
    return load_scenario(path, [*SMALL, *overrides])


def run(tmp: Path, s: Scenario, resume: Any = None, run_dir: RunDir | None = None) -> Path:
    run_dir = run_dir or RunDir.create(tmp, s)
    run_federation(InProcessGrid(s), s, run_dir, resume=resume)
    return run_dir.path


def test_rows_carry_their_energy_and_the_central_row_the_rounds_and_the_runs_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run(tmp_path, scenario(tmp_path, ["rounds=2"]))
    metrics = read_metrics(path)
    train = metrics[metrics["kind"] == "train"]
    assert (train["status"] == "ok").all() and (train["energy_j"] > 0).all()  # laptops: every figure known
    assert metrics.loc[metrics["kind"] == "eval_client", "energy_j"].isna().all()  # not on the clock
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")
    per_round = train.groupby("round")["energy_j"].sum()
    np.testing.assert_allclose(central.loc[[1, 2], "energy_j"], per_round.loc[[1, 2]])
    np.testing.assert_allclose(central["sim_energy_j"], [0.0, per_round[1], per_round[1] + per_round[2]])
    assert not (path / BATTERIES_FILE).exists()  # batteries off
    assert main(["report", str(path), "--target", "0"]) == 0  # `fedsim report` says the energy beside the time
    assert "time to accuracy 0: round 0, 0.0s simulated, 0 J spent" in capsys.readouterr().out


def test_a_drained_phone_stops_taking_part_until_a_charging_window_charges_it(tmp_path: Path) -> None:
    path = run(tmp_path, scenario(tmp_path, ["rounds=4", "clients.num_clients=2"], PHONES))
    metrics = read_metrics(path)
    trained = metrics[metrics["kind"] == "train"].groupby("round")["client_id"].apply(list)
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")
    # round 1 drains both; rounds 2 and 3 (from ~0 s, then 1000 s) find them empty, the window opens at
    # 1800 s; round 4 (from ~2000 s) finds them charged
    assert trained.to_dict() == {1: [0, 1], 4: [0, 1]}
    assert central.loc[2, "sim_time_s"] < 1800 < central.loc[3, "sim_time_s"]
    assert central.loc[[2, 3], "energy_j"].tolist() == [0.0, 0.0]
    charge = load_arrays(path / BATTERIES_FILE)["charge_j"]
    np.testing.assert_array_equal(charge, [0.0, 0.0])  # drained again in round 4


def test_a_resumed_run_goes_on_with_the_same_energy_and_charges(tmp_path: Path) -> None:
    overrides = ["clients.num_clients=2", "name=phones"]
    straight = run(tmp_path / "a", scenario(tmp_path, [*overrides, "rounds=4"], PHONES))
    stopped = run(tmp_path / "b", scenario(tmp_path, [*overrides, "rounds=2"], PHONES))

    more = scenario(tmp_path, [*overrides, "rounds=4"], PHONES)
    opened = RunDir.open(stopped)
    run(tmp_path, more, resume_point(opened, more), opened)

    resumed, whole = (read_metrics(p).drop(columns="wall_time_s") for p in (stopped, straight))
    pd.testing.assert_frame_equal(resumed, whole)
    for folder in ("checkpoints/round_2", "checkpoints/round_3", "."):
        ours, theirs = (load_arrays(p / folder / BATTERIES_FILE) for p in (stopped, straight))
        for key in ("charge_j", "updated_s"):
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{folder}: {key}")


# --- bad input --------------------------------------------------------------------------------------

PROFILE = "\n[fleet]\ngroups = [{profile = 'my-phone', count = 4}]\n[fleet.profiles.my-phone]\n" + (
    "train_tflops = 0.1\nmemory_gb = 2\nuplink_mbps = 5\ndownlink_mbps = 20\n"
)


@pytest.mark.parametrize(
    ("figures", "problem"),
    [
        ("train_watts = 0\n", "`fleet.profiles.my-phone.train_watts` must be greater than 0, got 0"),
        ("idle_watts = -1.5\n", "`fleet.profiles.my-phone.idle_watts` must be greater than 0, got -1.5"),
        ("radio_j_per_mb_up = nan\n", "`fleet.profiles.my-phone.radio_j_per_mb_up` must be a finite number"),
        ("radio_j_per_mb_down = inf\n", "`fleet.profiles.my-phone.radio_j_per_mb_down` must be a finite number"),
        (
            "train_watts = 4\nidle_watts = 0.5\nradio_j_per_mb_up = 5\nradio_j_per_mb_down = 1\n"
            "battery = { capacity_wh = 10, threshold = 1.5 }\n",
            "`fleet.profiles.my-phone.battery.threshold` must be less than or equal to 1, got 1.5",
        ),
        (
            "train_watts = 4\nidle_watts = 0.5\nradio_j_per_mb_up = 5\nradio_j_per_mb_down = 1\n"
            "battery = { capacity_wh = 10, threshold = -0.1 }\n",
            "`fleet.profiles.my-phone.battery.threshold` must be greater than or equal to 0, got -0.1",
        ),
    ],
)
def test_bad_power_figures_are_refused_by_their_path_before_anything_runs(
    figures: str, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(TINY.read_text() + PROFILE + figures)
    out = tmp_path / "runs"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(path), "--out", str(out)])

    assert code == 2 and problem in err.getvalue(), err.getvalue()
    assert not out.exists()  # nothing written


def test_batteries_on_the_measured_clock_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario(tmp_path, ["fleet.batteries=true", "fleet.clock='measured'"])
    assert info.value.problems == [
        "`fleet.batteries` simulates batteries on the fleet model's clock: not with clock = 'measured'"
    ]


def test_batteries_off_leave_the_scenario_clients_receive_as_it_was(tmp_path: Path) -> None:
    off, on = scenario(tmp_path, []), scenario(tmp_path, ["fleet.batteries=true"])
    assert "batteries" not in json.loads(off.to_json())["fleet"]  # not a byte more on every message
    assert json.loads(on.to_json())["fleet"]["batteries"] is True
    assert Scenario.from_json(off.to_json()) == off and Scenario.from_json(on.to_json()) == on
