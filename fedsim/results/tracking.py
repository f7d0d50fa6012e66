"""Experiment trackers: each round's metrics, the scenario as parameters and the final adapter as an
artifact, logged to TensorBoard, MLflow and W&B (`fedsim.config.tracking.TrackingConfig`).

Call it from the server process only (it owns the run directory), once per run:

    trackers = open_trackers(scenario.tracking, run_dir.path, scenario.model_dump(mode="json"))
    trackers.log_round(k, {"central_accuracy": ..., "train_loss": ...})   # after each round
    trackers.log_artifact(run_dir.adapter_path)                            # the final adapter
    trackers.close()                                                       # or close(failed=True)

Where each writes:

- TensorBoard: event files in `<run>/tensorboard/` (`tensorboard --logdir <out>` shows every run);
  metrics as scalars at step = round, the scenario as hyperparameters (the HParams tab) and as text;
  TensorBoard has no artifacts, so the adapter's path is logged as text.
- MLflow: `tracking.mlflow_uri`, by default a SQLite store beside the run directories
  (`sqlite:///<out>/mlflow.db`, artifacts in `<out>/mlartifacts/`); one MLflow run per fedsim run
  in experiment `tracking.mlflow_experiment`, the flattened scenario as parameters ("lora.rank"),
  metrics at step = round, the adapter under the artifact path "adapter". Logged through
  `MlflowClient`, never MLflow's global active run, so runs in one process do not mix.
- W&B: one run in `tracking.wandb_project`, offline by default (files in `<run>/wandb/`, uploaded
  later by `wandb sync`), the scenario as its config, metrics at step = round, the adapter as a
  "model" artifact.

Each tracker is an optional extra (`pip install 'fedsim[tensorboard]'`, `[mlflow]`, `[wandb]`,
all three: `[track]`); opening one that is not installed raises `TrackingUnavailableError` naming
the extra. A tracker that fails while the run goes on (a full disk, a lost connection) is logged as
a warning once and dropped: an experiment tracker never stops a run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedsim.config.errors import InputError
from fedsim.config.tracking import Backend, TrackingConfig

logger = logging.getLogger(__name__)

MODULES: dict[str, str] = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend → import
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
_MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
_MLFLOW_BATCH = 100  # MLflow's limit on parameters per log_batch call


class TrackingUnavailableError(InputError):
    """A tracker the scenario asks for is not installed; `problems` names each with its extra."""

    what = "tracking for"


def missing_trackers(spec: TrackingConfig) -> list[str]:
    """One problem per backend of `spec` whose package is not installed (for a preflight check)."""
    return [
        f"`tracking.backends` names {name!r} but {MODULES[name]} is not installed: pip install 'fedsim[{name}]'"
        for name in spec.backends
        if importlib.util.find_spec(MODULES[name]) is None
    ]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"dotted.key": leaf}; lists and None become JSON text (what a tracker's
    parameters can hold)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, path + ".")
        elif isinstance(value, bool | int | float | str):
            flat[path] = value
        else:
            flat[path] = json.dumps(value, default=str)
    return flat


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are finite numbers, as floats (NaN: not measured that round), keys limited
    to letters, digits and `_-./ `."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[re.sub(r"[^\w\-./ ]", "_", str(key))] = float(value)
    return out


class _Backend(Protocol):
    name: str

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None: ...

    def log_artifact(self, path: Path, name: str) -> None: ...

    def close(self, failed: bool) -> None: ...


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, scenario: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        experiment, start, self._end = hparams(flatten(scenario), {"central_accuracy": 0.0, "central_loss": 0.0})
        events = self.writer.file_writer
        assert events is not None  # SummaryWriter opens its file writer in __init__
        events.add_summary(experiment)
        events.add_summary(start)
        self.events: Any = events
        text = json.dumps(scenario, indent=2, default=str)
        self.writer.add_text("scenario", "    " + text.replace("\n", "\n    "), 0)

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, server_round)
        self.writer.flush()

    def log_artifact(self, path: Path, name: str) -> None:
        self.writer.add_text(name, f"`{path}`", 0)

    def close(self, failed: bool) -> None:
        if not failed:
            self.events.add_summary(self._end)
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, spec: TrackingConfig, run_dir: Path, scenario: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." on every new store
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
        out = run_dir.resolve().parent
        self.client = MlflowClient(tracking_uri=spec.mlflow_uri or f"sqlite:///{out / MLFLOW_DB}")
        found = self.client.get_experiment_by_name(spec.mlflow_experiment)
        experiment = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(spec.mlflow_experiment, (out / MLFLOW_ARTIFACTS).as_uri())
        )
        name = str(scenario.get("name", run_dir.name))
        self.run_id = self.client.create_run(
            experiment, run_name=name, tags={"fedsim.run_dir": str(run_dir)}
        ).info.run_id
        params = [Param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in flatten(scenario).items()]
        for start in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + _MLFLOW_BATCH])

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, v, stamp, server_round) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, name: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=name)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _WandB:
    name = "wandb"

    def __init__(self, spec: TrackingConfig, run_dir: Path, scenario: Mapping[str, Any]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")  # its own notes ("Adding directory to artifact...") too
        import wandb

        self._wandb = wandb
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
        self.run = wandb.init(
            project=spec.wandb_project,
            entity=spec.wandb_entity,
            dir=str(run_dir),
            mode=spec.wandb_mode,
            name=str(scenario.get("name", run_dir.name)),
            config=dict(scenario),
            reinit="create_new",
            settings=settings,
        )

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=server_round)

    def log_artifact(self, path: Path, name: str) -> None:
        artifact = self._wandb.Artifact(f"{name}-{self.run.id}", type="model")
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers of one run; every call goes to each of them, and one that fails is dropped
    with a warning (module docstring)."""

    def __init__(self, backends: list[_Backend]) -> None:
        self._backends = backends

    @property
    def names(self) -> list[str]:
        """The trackers still logging."""
        return [b.name for b in self._backends]

    def _each(self, what: str, call: Any) -> None:
        for backend in list(self._backends):
            try:
                call(backend)
            except Exception as exc:  # a tracker never stops a run
                logger.warning(
                    "tracking: %s failed to %s (%s: %s); it is dropped", backend.name, what, type(exc).__name__, exc
                )
                self._backends.remove(backend)

    def log_round(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Log round `server_round`'s metrics (the finite numbers among them: `finite_metrics`)."""
        clean = finite_metrics(metrics)
        if clean:
            self._each("log a round", lambda b: b.log_round(server_round, clean))

    def log_artifact(self, path: Path, name: str = "adapter") -> None:
        """Log the file or folder at `path` (the final adapter) as artifact `name`."""
        self._each("log an artifact", lambda b: b.log_artifact(Path(path), name))

    def close(self, failed: bool = False) -> None:
        """End every tracker's run, marked failed when `failed`."""
        self._each("close", lambda b: b.close(failed))
        self._backends = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.close(failed=kind is not None)


def open_trackers(spec: TrackingConfig, run_dir: Path, scenario: Mapping[str, Any]) -> Trackers:
    """Open the trackers `spec.backends` names for the run in `run_dir`, logging `scenario` (the
    resolved scenario as plain data) as its parameters; `TrackingUnavailableError` when one is not
    installed (nothing opened then)."""
    problems = missing_trackers(spec)
    if problems:
        raise TrackingUnavailableError(str(run_dir), problems)
    opened: list[_Backend] = []
    try:
        for name in spec.backends:
            opened.append(_open(name, spec, Path(run_dir), scenario))
    except BaseException:
        Trackers(opened).close(failed=True)
        raise
    return Trackers(opened)


def _open(name: Backend, spec: TrackingConfig, run_dir: Path, scenario: Mapping[str, Any]) -> _Backend:
    if name == "tensorboard":
        return _TensorBoard(run_dir, scenario)
    if name == "mlflow":
        return _MLflow(spec, run_dir, scenario)
    return _WandB(spec, run_dir, scenario)
