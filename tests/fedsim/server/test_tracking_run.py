"""A run logs every round, its scenario and its final adapter to the trackers its scenario names
(read back with TensorBoard's and MLflow's own readers); a tracker that is not installed is refused
before anything is written."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from tests_support.inprocess import InProcessGrid
from tests_support.scenarios import QUICK

from fedsim.cli import main
from fedsim.config.scenario import load_scenario
from fedsim.results.rundir import RunDir, read_metrics
from fedsim.results.tracking import MLFLOW_DB, TENSORBOARD_DIR
from fedsim.server.federation import run_federation

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"
SMALL = ["rounds=2", *QUICK]

pytestmark = pytest.mark.usefixtures("task_identity")


def test_a_run_logs_each_rounds_central_metrics_and_its_adapter_to_tensorboard_and_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scenario = load_scenario(TINY, [*SMALL, 'tracking.backends=["tensorboard", "mlflow"]'])
    run_dir = RunDir.create(tmp_path, scenario)
    run_federation(InProcessGrid(scenario), scenario, run_dir)  # type: ignore[arg-type]
    central = read_metrics(run_dir.path).query("kind == 'eval_central'").set_index("round")["loss"]

    events = EventAccumulator(str(run_dir.path / TENSORBOARD_DIR))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [0, 1, 2] and [e.value for e in scalars] == pytest.approx(list(central))
    assert [e.step for e in events.Scalars("clients_ok")] == [0, 1, 2]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / MLFLOW_DB}")
    experiment = client.get_experiment_by_name("fedsim")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "fedit"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in history] == [0, 1, 2] and [v for _, v in history] == pytest.approx(list(central))
    assert "adapter/adapter_config.json" in [f.path for f in client.list_artifacts(run.info.run_id, "adapter")]


def test_a_tracker_that_is_not_installed_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else real(name))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", str(TINY), "--out", str(tmp_path), "--track", "wandb", "--track", "tensorboard"])
    assert code == 2 and "`tracking.backends` names 'wandb' but wandb is not installed" in err.getvalue()
    assert not any(tmp_path.iterdir())
