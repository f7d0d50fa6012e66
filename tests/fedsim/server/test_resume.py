"""`fedsim resume`: a run stopped after round 1 and resumed to round 2 gives the metrics of a run
that went to round 2 at once, the pruning records and the controller's state included. The runs
have a controller, pruning and a deploy ratio, so they are also the end-to-end test of the
controller and of the fleet's deployed models (`fedsim.server.deployed`). Runs with a stateful
server optimiser (fedadam, fedavgm) resume exactly too, their moments taken up from the
checkpoint's strategy.npz; a checkpoint without it (an older fedsim's) resumes with fresh moments
and says so."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.config.scenario import load_scenario
from fedsim.results.rundir import STRATEGY_FILE, RunDir, read_metrics
from fedsim.runtime.simulation import run_simulations
from fedsim.server.control import STATE_FILE
from fedsim.server.resume import resume_point

ROOT = Path(__file__).resolve().parents[3]
OPTIMIZERS = ("fedadam", "fedavgm")  # Flower's FedOpt family and FedAvgM: each keeps its state its own way
OVERRIDES = [
    'controller={name="ucb1", ranks=[2, 8], ratios=[0.0, 0.5]}', "pruning.events=1", "clients.eval_per_round=0",
    "pruning.deploy_ratios={phone-highend=0.5}",
    'fleet.groups=[{profile="laptop-cpu", count=2}, {profile="phone-highend", count=2}]',
]  # fmt: skip


def _cli(*args: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(list(args))


def _run(out: Path, name: str, rounds: int) -> Path:
    sets = [a for o in [*OVERRIDES, f"rounds={rounds}", f"name={name}"] for a in ("--set", o)]
    assert _cli("run", str(ROOT / "scenarios" / "tiny.toml"), "--out", str(out), *sets) == 0
    return out / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    stopped = _run(
        out, "run-a", rounds=1
    )  # names of one length: the scenario travels in every message, and its bytes are on the clock
    assert _cli("resume", str(stopped), "--rounds", "2") == 0
    return stopped, _run(out, "run-b", rounds=2)


def test_resumed_run_has_the_metrics_of_an_uninterrupted_one(runs: tuple[Path, Path]) -> None:
    resumed, straight = (read_metrics(r).drop(columns="wall_time_s") for r in runs)
    pd.testing.assert_frame_equal(resumed, straight)
    assert (resumed.query("kind == 'train' and round == 2")["arm_rank"] > 0).all()  # the controller went on
    assert (runs[0] / "keeps.json").read_text() == (runs[1] / "keeps.json").read_text()
    assert load_scenario(runs[0] / "scenario.toml").rounds == 2


def test_a_finished_run_needs_more_rounds(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resume", str(runs[1])]) == 2
    assert "already ran 2 of 2 rounds" in capsys.readouterr().err


def test_a_round_whose_checkpoint_is_incomplete_is_redone(runs: tuple[Path, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(runs[1], tmp_path / "copy"))
    (copy / "checkpoints" / "round_2" / STATE_FILE).unlink()  # killed while saving round 2
    scenario = load_scenario(copy / "scenario.toml")
    point = resume_point(RunDir.open(copy), scenario)
    assert point.server_round == 1 and point.lost == ()
    assert point.sim_time == read_metrics(copy).query("kind == 'eval_central' and round == 1")["sim_time_s"].item()


def test_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resume", str(tmp_path)]) == 2
    assert "is not a fedsim run directory" in capsys.readouterr().err


def test_the_controllers_arms_drive_rank_pruning_and_rewards(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs[1]
    train = read_metrics(run).query("kind == 'train' and status == 'ok'")
    assert (train["lora_rank"] == train["arm_rank"]).all() and set(train["arm_rank"]) <= {2, 8}
    assert ((train["prune_ratio"] - train["arm_ratio"]).abs() < 0.05).all()  # one event, at the first step
    assert train["reward"].between(0, 1).all() and (train.groupby("round")["reward"].max() == 1.0).all()
    assert (
        train["contribution"].between(-1, 1).all() and train["contribution"].nunique() > 1
    )  # scored by the server, one per client
    seen = set(train.query("round == 1")["device"])
    later = train.query("round == 2")
    known = later[later["device"].isin(seen)]
    assert len(known) > 0 and train.query("round == 1")["arm_predicted_s"].isna().all()
    ratio = known["arm_predicted_s"] / (
        known["sim_compute_s"] + known["sim_comm_s"]
    )  # the pace's price of the arm played
    assert ratio.between(0.5, 2.0).all(), ratio.tolist()
    for k in (1, 2):
        assert (run / "checkpoints" / f"round_{k}" / STATE_FILE).is_file()
    assert main(["report", str(run), "--arms"]) == 0
    assert "settled_rank" in capsys.readouterr().out
    central = read_metrics(run).query("kind == 'eval_central'")  # the phones deploy a model cut to 0.5: scored too
    assert central["deployed_loss"].notna().all() and (central["deployed_loss"] != central["loss"]).all()
    assert main(["report", str(run)]) == 0
    assert "deployed_loss" in capsys.readouterr().out


# --- stateful server optimisers -------------------------------------------------------------


@pytest.fixture(scope="module")
def optimizer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per optimiser, "<name>-a": stopped after round 1, then resumed to round 2; "<name>-b": straight
    to round 2 (these four in one simulation; names of one length, as the scenario travels in every
    message). "old": fedadam-a resumed from a copy of its round-1 checkpoint without strategy.npz."""
    out = tmp_path_factory.mktemp("optimizers")
    jobs = []
    for name in OPTIMIZERS:
        for tag, rounds in (("a", 1), ("b", 2)):
            sets = [f"strategy.name={name}", "clients.eval_per_round=0", f"rounds={rounds}", f"name={name}-{tag}"]
            scenario = load_scenario(ROOT / "scenarios" / "tiny.toml", sets)
            jobs.append((scenario, RunDir.create(out, scenario)))
    assert run_simulations(jobs) == []
    runs = {run.path.name: run.path for _, run in jobs}
    runs["old"] = Path(shutil.copytree(runs["fedadam-a"], out / "old"))
    (runs["old"] / "checkpoints" / "round_1" / STRATEGY_FILE).unlink()
    for stopped in (runs["fedadam-a"], runs["fedavgm-a"], runs["old"]):
        assert _cli("resume", str(stopped), "--rounds", "2") == 0
    return runs


def _resumed_event(run: Path) -> dict[str, object]:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "run_resumed")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_resumed_server_optimizer_has_the_metrics_of_an_uninterrupted_one(
    optimizer_runs: dict[str, Path], name: str
) -> None:
    resumed, straight = optimizer_runs[f"{name}-a"], optimizer_runs[f"{name}-b"]
    frames = [read_metrics(r).drop(columns="wall_time_s") for r in (resumed, straight)]
    pd.testing.assert_frame_equal(*frames, check_exact=True)
    assert _resumed_event(resumed)["not_restored"] == []
    for k in (1, 2):
        assert (resumed / "checkpoints" / f"round_{k}" / STRATEGY_FILE).is_file()
    # the moments after round 2, byte for byte (the file has no timestamps)
    assert (resumed / STRATEGY_FILE).read_bytes() == (straight / STRATEGY_FILE).read_bytes()


def test_a_checkpoint_without_the_strategy_state_resumes_with_fresh_moments(optimizer_runs: dict[str, Path]) -> None:
    old, straight = optimizer_runs["old"], optimizer_runs["fedadam-b"]
    lost = "fedadam's server moments (a checkpoint from before fedsim saved them)"
    assert _resumed_event(old)["not_restored"] == [lost]
    loss = {r: read_metrics(r).query("kind == 'eval_central'").set_index("round")["loss"] for r in (old, straight)}
    assert loss[old][1] == loss[straight][1] and loss[old][2] != loss[straight][2]  # the moments mattered
    assert (old / "checkpoints" / "round_2" / STRATEGY_FILE).is_file()  # and are saved from then on
