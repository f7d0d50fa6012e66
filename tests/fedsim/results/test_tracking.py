"""Trackers against the real libraries: what was logged is read back with each one's own reader
(TensorBoard's event accumulator, MLflow's client on a SQLite store, W&B's offline run file)."""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.config.tracking import TrackingConfig
from fedsim.results.tracking import (
    MLFLOW_DB,
    TENSORBOARD_DIR,
    TrackingUnavailableError,
    finite_metrics,
    flatten,
    missing_trackers,
    open_trackers,
)

TINY = Path(__file__).resolve().parents[3] / "scenarios" / "tiny.toml"
SCENARIO = {"name": "tracked", "seed": 3, "rounds": 2, "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]}}
ROUNDS = [
    {"central_accuracy": 0.25, "central_loss": 2.5, "train_loss": math.nan},  # round 0: no training yet
    {"central_accuracy": 0.5, "central_loss": 2.0, "train_loss": 2.25},
    {"central_accuracy": 0.625, "central_loss": 1.75, "train_loss": 1.5},
]


def _log_a_run(spec: TrackingConfig, run_dir: Path) -> None:
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    with open_trackers(spec, run_dir, SCENARIO) as trackers:
        for k, metrics in enumerate(ROUNDS):
            trackers.log_round(k, metrics)
        trackers.log_artifact(adapter)


def test_flatten_and_finite_metrics() -> None:
    assert flatten(SCENARIO) == {
        "name": "tracked",
        "seed": 3,
        "rounds": 2,
        "lora.rank": 8,
        "lora.target_modules": '["q_proj", "v_proj"]',
    }
    assert finite_metrics({"a": 1, "b": math.nan, "c": "x", "d": True, "e/f g": 2.5, "h:i": 1}) == {
        "a": 1.0,
        "e/f g": 2.5,
        "h_i": 1.0,
    }


def test_the_tracking_section_reports_every_problem_by_path() -> None:
    overrides = ['tracking.backends=["comet"]', 'tracking.wandb_mode="cloud"', "tracking.colour=1"]
    with pytest.raises(ScenarioError) as caught:
        load_scenario(TINY, overrides)

    assert caught.value.problems == [
        "`tracking.backends.0` must be 'tensorboard', 'mlflow' or 'wandb', got 'comet'",
        "`tracking.wandb_mode` must be 'offline', 'online' or 'disabled', got 'cloud'",
        "`tracking.colour` is not a known key",
    ]
    with pytest.raises(ScenarioError, match="'mlflow' more than once"):
        load_scenario(TINY, ['tracking.backends=["mlflow", "mlflow"]'])


def test_a_missing_tracker_is_named_with_its_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else real(name))
    spec = TrackingConfig.model_validate({"backends": ["tensorboard", "wandb"]})

    assert missing_trackers(spec) == [
        "`tracking.backends` names 'wandb' but wandb is not installed: pip install 'fedsim[wandb]'"
    ]
    with pytest.raises(TrackingUnavailableError, match=r"fedsim\[wandb\]"):
        open_trackers(spec, tmp_path / "run", SCENARIO)
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()  # nothing opened


def test_tensorboard_event_files_hold_scalars_hparams_and_text(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _log_a_run(TrackingConfig.model_validate({"backends": ["tensorboard"]}), tmp_path / "run")

    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR), size_guidance={"tensors": 0})
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("central_accuracy")]
    assert accuracy == [(0, 0.25), (1, 0.5), (2, 0.625)]
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]  # NaN in round 0 is not logged
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lora.rank"].number_value == 8 and hparams["name"].string_value == "tracked"
    tags = ("scenario/text_summary", "adapter/text_summary")
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in tags}
    assert '"target_modules"' in texts["scenario/text_summary"]
    assert str(tmp_path / "run" / "adapter") in texts["adapter/text_summary"]


def test_mlflow_sqlite_store_holds_params_metrics_the_adapter_and_the_outcome(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    spec = TrackingConfig.model_validate({"backends": ["mlflow"], "mlflow_experiment": "mine"})
    _log_a_run(spec, tmp_path / "out" / "run")
    with pytest.raises(RuntimeError), open_trackers(spec, tmp_path / "out" / "failing", {"name": "failing"}) as t:
        t.log_round(1, {"central_accuracy": 0.5})
        raise RuntimeError("the run failed")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / MLFLOW_DB}")  # the default store
    experiment = client.get_experiment_by_name("mine")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {name: r.info.status for name, r in runs.items()} == {"tracked": "FINISHED", "failing": "FAILED"}
    run = runs["tracked"]
    assert run.data.params["lora.rank"] == "8" and run.data.params["lora.target_modules"] == '["q_proj", "v_proj"]'
    history = client.get_metric_history(run.info.run_id, "central_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.5), (2, 0.625)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert [f.path for f in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/adapter_config.json"]
    local = Path(client.download_artifacts(run.info.run_id, "adapter/adapter_config.json", str(tmp_path)))
    assert local.read_text() == '{"r": 8}'
    assert (tmp_path / "out" / "mlartifacts").is_dir()  # beside the runs, not in the working directory


def _wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log blocks of 32 KiB whose records (checksum, length, type) may span blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            yield wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""


def _until_exit(path: Path, timeout_s: float = 20.0) -> list[Any]:
    """The run file's records once W&B's service has written them all (its `exit` record): `finish`
    returns before the service has flushed the file."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_wandb_offline_run_file_holds_config_history_and_the_adapter(tmp_path: Path) -> None:
    pytest.importorskip("wandb")

    _log_a_run(TrackingConfig.model_validate({"backends": ["wandb"]}), tmp_path / "run")

    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _until_exit(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "tracked" and run.project == "fedsim"
    config = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
    assert config["lora"] == SCENARIO["lora"] and config["seed"] == 3
    history = [
        {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [(h["_step"], h["central_accuracy"]) for h in history] == [(0, 0.25), (1, 0.5), (2, 0.625)]
    assert "train_loss" not in history[0] and history[2]["train_loss"] == 1.5
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and [e.path for e in artifact.manifest.contents] == ["adapter_config.json"]


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("tensorboard")
    trackers = open_trackers(TrackingConfig.model_validate({"backends": ["tensorboard"]}), tmp_path / "run", SCENARIO)
    trackers._backends[0].writer.close()  # type: ignore[attr-defined]
    trackers._backends[0].writer = None  # type: ignore[attr-defined]  # the next call raises

    trackers.log_round(1, {"central_accuracy": 0.5})

    assert trackers.names == [] and "tensorboard failed to log a round" in caplog.text
    trackers.close()
