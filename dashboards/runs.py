"""The run directories a dashboard shows: found safely under one root folder, and read into
tables without ever raising for a damaged run.

The dashboard is reached over HTTP, so a run name taken from a URL is resolved strictly inside the
root: one path component, no `..`, no absolute path, no symlink leading out of the root; the files
read inside a run directory must stay inside it too. A run whose metrics are missing or corrupt is
loaded with its errors recorded (`Run.errors`) instead of raised: one bad run must not take down
the pages of the others.

Metrics are read through `fedsim.results.rundir.read_metrics` and tabulated by `fedsim.results.report.round_table`;
optional columns (`sim_time_s`, `bytes_up`, `device`, ...) are carried through where they exist,
never required.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.results.report import round_table
from fedsim.results.rundir import read_metrics

RUN_FILES = ("metrics.parquet", "scenario.toml")  # a folder holding either is a run directory


class RunNotFoundError(LookupError):
    """No run of that name under the dashboard's root (or the name tries to leave the root)."""


@dataclass(frozen=True, eq=False)
class Run:
    """One run directory as read at one moment. `table` is None when the metrics are unreadable."""

    name: str
    path: Path
    mtime: float
    scenario_text: str
    scenario: dict[str, Any]
    metrics: pd.DataFrame | None
    table: pd.DataFrame | None
    errors: tuple[str, ...]

    def setting(self, section: str, key: str) -> str:
        """`scenario[section][key]` as text, "?" where the scenario does not say."""
        value = self.scenario.get(section, {})
        value = value.get(key) if isinstance(value, dict) else None
        return "?" if value is None else str(value)


def _inside(path: Path, parent: Path) -> bool:
    """Whether `path`, symlinks followed, is `parent` or below it."""
    return path.resolve().is_relative_to(parent.resolve())


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def _is_run_name(root: Path, name: str) -> bool:
    """Whether `name` is one path component naming a run directory directly under `root`, also
    once symlinks are followed."""
    if not name or name in {".", ".."} or any(c in name for c in "/\\\0"):
        return False
    path = Path(root) / name
    try:
        return path.resolve().parent == Path(root).resolve() and _is_run_dir(path)
    except OSError:  # e.g. a name too long for the file system
        return False


def resolve_run(root: Path, name: str) -> Path:
    """The directory of run `name` under `root`; `RunNotFoundError` if there is none."""
    if not _is_run_name(root, name):
        raise RunNotFoundError(f"no run named {name!r} under {root}")
    return Path(root) / name


def run_names(root: Path) -> list[str]:
    """Names of the run directories directly under `root` (none if `root` does not exist yet)."""
    if not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if _is_run_name(root, p.name))


def _file(run_path: Path, filename: str) -> Path | None:
    """`run_path / filename` if it is a regular file inside the run directory, else None."""
    path = run_path / filename
    return path if path.is_file() and _inside(path, run_path) else None


def _mtime(run_path: Path) -> float:
    """Last change to the run: metrics are replaced by rename (the folder changes), events appended."""
    paths = [run_path, run_path / "metrics.parquet", run_path / "events.jsonl"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def per_round(metrics: pd.DataFrame) -> pd.DataFrame:
    """`round_table(metrics)` (which carries the simulated clock, `sim_time_s`, at each round's
    end), or an empty table while a run has no rows yet."""
    if metrics.empty:
        return pd.DataFrame(columns=["train_loss", "central_accuracy"], index=pd.Index([], name="round"))
    return round_table(metrics)


def _read_scenario(run_path: Path) -> tuple[str, dict[str, Any], list[str]]:
    path = _file(run_path, "scenario.toml")
    if path is None:
        return "", {}, ["no scenario.toml"]
    text = path.read_text(errors="replace")
    try:
        return text, tomllib.loads(text), []
    except tomllib.TOMLDecodeError as exc:
        return text, {}, [f"cannot parse scenario.toml: {exc}"]


def _read_tables(run_path: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None, list[str]]:
    if _file(run_path, "metrics.parquet") is None:
        return None, None, ["no metrics.parquet yet"]
    try:
        metrics = read_metrics(run_path)
        return metrics, per_round(metrics), []
    # Any failure here is a damaged file (pyarrow's ArrowInvalid, OSError, a missing column's
    # KeyError, ...): report it on this run's page rather than fail the request.
    except Exception as exc:
        return None, None, [f"cannot read metrics.parquet: {type(exc).__name__}: {exc}"]


def load_run(root: Path, name: str) -> Run:
    """Read run `name` under `root`; `RunNotFoundError` if there is none, never an error for its files."""
    path = resolve_run(root, name)
    text, scenario, scenario_errors = _read_scenario(path)
    metrics, table, metric_errors = _read_tables(path)
    return Run(name, path, _mtime(path), text, scenario, metrics, table, tuple(metric_errors + scenario_errors))


def list_runs(root: Path) -> list[Run]:
    """Every run under `root`, the most recently changed first."""
    runs = []
    for name in run_names(root):
        try:
            runs.append(load_run(root, name))
        except (RunNotFoundError, FileNotFoundError):  # removed while we were reading
            continue
    return sorted(runs, key=lambda r: r.mtime, reverse=True)


def _last(table: pd.DataFrame, column: str) -> float:
    return float(table[column].iloc[-1]) if column in table.columns and len(table) else math.nan


def summary(run: Run) -> dict[str, Any]:
    """The run's row of the index table (NaN and unknowns as None, ready for JSON)."""
    table = run.table if run.table is not None else pd.DataFrame()
    accuracy = table["central_accuracy"] if "central_accuracy" in table.columns else pd.Series(dtype=float)
    values: dict[str, Any] = {
        "name": run.name,
        "model": run.setting("model", "name"),
        "task": run.setting("data", "task"),
        "strategy": run.setting("strategy", "name"),
        "rounds_done": int(table.index.max()) if len(table) else None,
        "rounds_planned": run.scenario.get("rounds"),
        "final_accuracy": _last(table, "central_accuracy"),
        "best_accuracy": float(accuracy.max()) if accuracy.notna().any() else math.nan,
        "final_central_loss": _last(table, "central_loss"),
        "final_train_loss": _last(table, "train_loss"),
        "wall_time_s": _last(table, "wall_time_s"),
        "mtime": run.mtime,
        "errors": list(run.errors),
    }
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def last_round_clients(run: Run) -> pd.DataFrame:
    """The per-client rows (every column the metrics have) of the run's last round."""
    if run.metrics is None or run.metrics.empty:
        return pd.DataFrame()
    metrics = run.metrics
    rows = metrics[metrics["round"] == metrics["round"].max()]
    if "client_id" in rows.columns:
        rows = rows[rows["client_id"] >= 0]
    order = [c for c in ("kind", "client_id") if c in rows.columns]
    return rows.sort_values(order).drop(columns="round").reset_index(drop=True)


def _lines(path: Path) -> Iterator[str]:
    with open(path, errors="replace") as fh:
        yield from (line for line in fh if line.strip())


def read_events(run: Run, last: int = 20) -> list[dict[str, Any]]:
    """The last `last` events of events.jsonl, oldest first; a line that is not a JSON object is
    kept as `{"event": "unparseable", "line": ...}`."""
    path = _file(run.path, "events.jsonl")
    if path is None:
        return []
    events = []
    for line in deque(_lines(path), maxlen=last):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        events.append(event if isinstance(event, dict) else {"event": "unparseable", "line": line.rstrip()})
    return events
