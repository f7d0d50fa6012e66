"""The run directories a dashboard shows: found safely under one root folder at any depth, and
read into tables without ever raising for a damaged run.

A run is named by its path below the root, components joined by "/" (`tiny-compare/fedit-seed0`;
"." when the root itself is a run directory). The dashboard is reached over HTTP, so a name taken
from a URL is resolved strictly inside the root: no empty, "." or ".." component, no backslash or
NUL, and no symlink anywhere on the way (the resolved path must be the root's resolved path joined
with the components). Files read inside a run directory must stay inside it too. A run whose
metrics are missing or corrupt is loaded with its errors recorded (`Run.errors`) instead of raised:
one bad run must not take down the pages of the others.

A folder written by `fedsim compare` (`<scenario>-compare/`, holding `comparison.csv` and a run
directory per strategy and seed) is a *comparison*: `comparisons` lists them, `runs_in` their runs.

Metrics are read through `fedsim.results.rundir.read_metrics` and tabulated by
`fedsim.results.report.round_table`; optional columns (`sim_time_s`, `device`, `dp_epsilon`, ...)
are carried through where they exist, never required.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import tomllib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from fedsim.results.report import round_table
from fedsim.results.rundir import read_metrics

RUN_FILES = ("metrics.parquet", "scenario.toml")  # a folder holding either is a run directory
COMPARISON_FILES = ("comparison.csv", "comparison.md")  # what `fedsim compare` writes beside its runs
MAX_DEPTH = 4  # folders below the root searched for runs (a compare folder's runs are at depth 2)
STALE_S = 3600.0  # an unfinished run unchanged for this long is shown as "stopped", not "running"
END_EVENTS = {"run_end": "finished", "run_failed": "failed"}
Status = Literal["running", "finished", "failed", "stopped"]


class RunNotFoundError(LookupError):
    """No run of that name under the dashboard's root (or the name tries to leave the root)."""


@dataclass(frozen=True, eq=False)
class Run:
    """One run directory as read at one moment. `table` (`per_round`) is None when the metrics are
    unreadable; `status` is what its events say (`run_status`)."""

    name: str
    path: Path
    mtime: float
    scenario_text: str
    scenario: dict[str, Any]
    metrics: pd.DataFrame | None
    table: pd.DataFrame | None
    errors: tuple[str, ...]
    status: Status

    def setting(self, section: str, key: str) -> str:
        """`scenario[section][key]` as text, "?" where the scenario does not say."""
        value = self.scenario.get(section, {})
        value = value.get(key) if isinstance(value, dict) else None
        return "?" if value is None else str(value)

    @property
    def finished(self) -> bool:
        """Whether the run will not change any more (finished or failed): no need to poll it."""
        return self.status in ("finished", "failed")


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def is_comparison(path: Path) -> bool:
    """Whether `path` is a folder `fedsim compare` wrote (its table, or a `-compare` name over runs)."""
    if not path.is_dir() or _is_run_dir(path):
        return False
    if any((path / f).is_file() for f in COMPARISON_FILES):
        return True
    return path.name.endswith("-compare") and any(_is_run_dir(p) for p in path.iterdir() if not p.is_symlink())


def _parts(name: str) -> list[str] | None:
    """The path components of a run name, None when one is unsafe."""
    if name == ".":
        return []
    parts = name.split("/")
    if not name or any(p in {"", ".", ".."} or "\\" in p or "\0" in p for p in parts):
        return None
    return parts


def resolve(root: Path, name: str) -> Path:
    """The folder `name` names under `root`, checked: no symlink on the way, nothing outside the
    root. `RunNotFoundError` otherwise (the folder need not be a run directory)."""
    parts = _parts(name)
    if parts is None or len(parts) > MAX_DEPTH:
        raise RunNotFoundError(f"no run named {name!r} under {root}")
    base = Path(root)
    path = base.joinpath(*parts)
    try:
        if path.resolve() != base.resolve().joinpath(*parts) or not path.is_dir():
            raise RunNotFoundError(f"no run named {name!r} under {root}")
    except OSError:  # e.g. a name too long for the file system
        raise RunNotFoundError(f"no run named {name!r} under {root}") from None
    return path


def resolve_run(root: Path, name: str) -> Path:
    """The directory of run `name` under `root`; `RunNotFoundError` if there is none."""
    path = resolve(root, name)
    if not _is_run_dir(path):
        raise RunNotFoundError(f"no run named {name!r} under {root}")
    return path


def _folders(root: Path) -> Iterator[tuple[str, Path]]:
    """(name, path) of every folder under `root` to `MAX_DEPTH`, symlinks and hidden folders
    skipped, run directories not descended into; the root itself first, as "."."""
    stack = [(".", Path(root), 0)]
    while stack:
        name, path, depth = stack.pop()
        yield name, path
        if depth >= MAX_DEPTH or _is_run_dir(path):
            continue
        try:
            children = sorted(os.scandir(path), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        for entry in children:
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                child = entry.name if name == "." else f"{name}/{entry.name}"
                stack.append((child, Path(entry.path), depth + 1))


def run_names(root: Path) -> list[str]:
    """Names of the run directories under `root`, at any depth to `MAX_DEPTH`, sorted (none if
    `root` does not exist yet)."""
    if not Path(root).is_dir():
        return []
    return sorted(name for name, path in _folders(root) if _is_run_dir(path))


def comparisons(root: Path) -> list[str]:
    """Names of the `fedsim compare` folders under `root` ("." when the root is one), sorted."""
    if not Path(root).is_dir():
        return []
    return sorted(name for name, path in _folders(root) if is_comparison(path))


def runs_in(root: Path, folder: str) -> list[str]:
    """The run directories directly inside the folder `folder` names under `root` (a comparison)."""
    base = resolve(root, folder)
    prefix = "" if folder == "." else folder + "/"
    return [prefix + p.name for p in sorted(base.iterdir()) if not p.is_symlink() and _is_run_dir(p)]


def _file(run_path: Path, filename: str) -> Path | None:
    """`run_path / filename` if it is a regular file inside the run directory, else None."""
    path = run_path / filename
    return path if path.is_file() and path.resolve().is_relative_to(run_path.resolve()) else None


def _mtime(run_path: Path) -> float:
    """Last change to the run: metrics are replaced by rename (the folder changes), events appended."""
    paths = [run_path, run_path / "metrics.parquet", run_path / "events.jsonl"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def _stamp(run_path: Path) -> tuple[int, ...]:
    """What changes whenever the run's files do: their sizes and modification times in ns."""
    stats = [
        (run_path / f).stat() for f in ("metrics.parquet", "events.jsonl", "scenario.toml") if (run_path / f).exists()
    ]
    return tuple(v for s in stats for v in (s.st_mtime_ns, s.st_size)) + (run_path.stat().st_mtime_ns,)


def per_round(metrics: pd.DataFrame) -> pd.DataFrame:
    """`round_table(metrics)` (which carries the simulated clock, `sim_time_s`, at each round's end)
    plus every other numeric column of the server's round rows (`eval_central`) that it leaves out
    and that has a value (e.g. `dp_epsilon`), or an empty table while a run has no rows yet."""
    if metrics.empty:
        return pd.DataFrame(columns=["train_loss", "central_accuracy"], index=pd.Index([], name="round"))
    table = round_table(metrics)
    central = metrics[metrics["kind"] == "eval_central"].drop_duplicates("round").set_index("round")
    known = set(table.columns) | {"client_id", "num_examples", "loss", "accuracy", "flops", "tokens"}
    extra = [
        c
        for c in central.columns
        if c not in known
        and pd.api.types.is_numeric_dtype(central[c])
        and central[c].notna().any()
        and (central[c] != 0).any()
    ]
    return table.join(central[extra]) if extra else table


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


def _lines(path: Path) -> Iterator[str]:
    with open(path, errors="replace") as fh:
        yield from (line for line in fh if line.strip())


def _parse(line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        event = None
    return event if isinstance(event, dict) else {"event": "unparseable", "line": line.rstrip()}


def run_status(run_path: Path, mtime: float, now: float | None = None) -> Status:
    """ "finished" or "failed" when the last start/resume/end event is a `run_end` or `run_failed`;
    otherwise "running", or "stopped" when nothing changed for `STALE_S` (a killed run)."""
    path = _file(run_path, "events.jsonl")
    last = None
    for line in _lines(path) if path is not None else ():
        if any(f'"{kind}"' in line for kind in ("run_start", "run_resumed", *END_EVENTS)):
            kind = _parse(line).get("event")
            last = kind if kind in ("run_start", "run_resumed", *END_EVENTS) else last
    if last in END_EVENTS:
        return "finished" if last == "run_end" else "failed"
    return "stopped" if (now if now is not None else time.time()) - mtime > STALE_S else "running"


@functools.lru_cache(maxsize=256)
def _load(path: Path, name: str, stamp: tuple[int, ...]) -> Run:
    """The run at `path` as of `stamp` (`_stamp`): a run that did not change is read once."""
    text, scenario, scenario_errors = _read_scenario(path)
    metrics, table, metric_errors = _read_tables(path)
    mtime = _mtime(path)
    errors = tuple(metric_errors + scenario_errors)
    return Run(name, path, mtime, text, scenario, metrics, table, errors, run_status(path, mtime))


def load_run(root: Path, name: str) -> Run:
    """Read run `name` under `root`; `RunNotFoundError` if there is none, never an error for its files.
    A run is read again only when its files changed, so its tables are shared: never modify them."""
    path = resolve_run(root, name)
    run = _load(path, name, _stamp(path))
    status = run.status if run.finished else run_status(path, run.mtime)
    return run if status == run.status else replace(run, status=status)


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


def _best(table: pd.DataFrame, column: str, best: Literal["max", "min"]) -> float:
    values = table[column] if column in table.columns else pd.Series(dtype=float)
    return float(getattr(values, best)()) if values.notna().any() else math.nan


def summary(run: Run) -> dict[str, Any]:
    """The run's row of the runs table (NaN and unknowns as None, ready for JSON)."""
    table = run.table if run.table is not None else pd.DataFrame()
    values: dict[str, Any] = {
        "name": run.name,
        "folder": run.name.rpartition("/")[0],
        "scenario": run.scenario.get("name", run.path.name),
        "model": run.setting("model", "name"),
        "task": run.setting("data", "task"),
        "strategy": run.setting("strategy", "name"),
        "seed": run.scenario.get("seed"),
        "status": run.status,
        "rounds_done": int(table.index.max()) if len(table) else None,
        "rounds_planned": run.scenario.get("rounds"),
        "final_accuracy": _last(table, "central_accuracy"),
        "best_accuracy": _best(table, "central_accuracy", "max"),
        "final_central_loss": _last(table, "central_loss"),
        "best_central_loss": _best(table, "central_loss", "min"),
        "final_train_loss": _last(table, "train_loss"),
        "sim_time_s": _last(table, "sim_time_s"),
        "wall_time_s": _last(table, "wall_time_s"),
        "bytes_up": float(table["bytes_up"].sum()) if "bytes_up" in table else math.nan,
        "bytes_down": float(table["bytes_down"].sum()) if "bytes_down" in table else math.nan,
        "mtime": run.mtime,
        "errors": list(run.errors),
    }
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def client_rows(run: Run) -> pd.DataFrame:
    """Every per-client row (train and eval_client) of every round, sorted by round, kind, client."""
    if run.metrics is None or run.metrics.empty:
        return pd.DataFrame()
    rows = run.metrics[run.metrics["client_id"] >= 0] if "client_id" in run.metrics else run.metrics
    order = [c for c in ("round", "kind", "client_id") if c in rows.columns]
    return rows.sort_values(order).reset_index(drop=True)


def last_round_clients(run: Run) -> pd.DataFrame:
    """The per-client rows (every column the metrics have) of the run's last round."""
    rows = client_rows(run)
    if rows.empty:
        return rows
    return rows[rows["round"] == rows["round"].max()].drop(columns="round").reset_index(drop=True)


def read_events(run: Run, last: int = 200) -> list[dict[str, Any]]:
    """The last `last` events of events.jsonl, oldest first; a line that is not a JSON object is
    kept as `{"event": "unparseable", "line": ...}`."""
    path = _file(run.path, "events.jsonl")
    if path is None:
        return []
    return [_parse(line) for line in deque(_lines(path), maxlen=last)]


def version(run: Run) -> str:
    """A token that changes whenever what the dashboard shows of the run does."""
    return f"{run.mtime!r}|{run.status}|{'; '.join(run.errors)}"
