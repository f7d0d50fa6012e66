"""Several runs side by side: grouped over seeds, curves with their bands, final metrics with
intervals, time to a target, and how their scenarios differ.

Runs are *grouped* when their scenarios are the same but for `name` and `seed`; a group is labelled
by the settings that tell it from the others (a `fedsim compare` folder's groups are its
strategies). Per round, a group's curve is the mean over its seeds with the Student-t 95 % interval
(`fedsim.results.stats.t_interval`); its x is the round, or the mean over seeds of the simulated
time or of the cumulative bytes sent at that round. The final table is
`fedsim.results.comparison.comparison` over `read_results`, with the group as its "strategy".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from dashboards.runs import Run
from fedsim.config.scenario import Scenario, StrategyConfig
from fedsim.results.comparison import RunResult, comparison, read_results
from fedsim.results.report import time_to_accuracy
from fedsim.results.stats import t_interval

XAxis = Literal["round", "sim_time_s", "bytes"]
X_LABELS: dict[str, str] = {"round": "round", "sim_time_s": "simulated time (s)", "bytes": "bytes sent (up + down)"}
_IGNORED = {"name", "seed"}  # what may differ inside a group
_LABEL_CHARS = 60  # a longer "k=v, ..." label gives way to the run's name


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested scenario as {"dotted.key": value as compact JSON text}; tables of lists stay one value."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, path + ".")
        else:
            flat[path] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return flat


def scenario_differences(runs: Sequence[Run]) -> pd.DataFrame:
    """The scenario keys whose values differ between `runs` (`name` left out): one row per key, one
    column per run, "–" where a run's scenario lacks the key."""
    flats = {run.name: flatten(run.scenario) for run in runs}
    keys = sorted({k for flat in flats.values() for k in flat} - {"name"})
    rows = {k: [flat.get(k, "–") for flat in flats.values()] for k in keys}
    differing = {k: v for k, v in rows.items() if len(set(v)) > 1}
    return pd.DataFrame.from_dict(differing, orient="index", columns=list(flats)).rename_axis("setting")


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs whose scenarios differ only in `name` and `seed`, under a label naming what sets their
    group apart (`_label`: "flexlora", or "lr=0.001, strategy.name=fedit" when several settings do);
    a run without a readable scenario is a group of its own, under its name. Order of first
    appearance."""
    keyed: dict[str, list[Run]] = {}
    settings: dict[str, dict[str, str]] = {}
    for run in runs:
        flat = {k: v for k, v in flatten(run.scenario).items() if k not in _IGNORED}
        key = json.dumps(flat, sort_keys=True) if flat else f"run:{run.name}"
        keyed.setdefault(key, []).append(run)
        settings.setdefault(key, flat)
    differing = sorted(
        {k for flat in settings.values() for k in flat if len({f.get(k) for f in settings.values()}) > 1}
    )
    labels: dict[str, str] = {}
    for key, members in keyed.items():
        label = _label(settings[key], differing, members)
        labels[key] = label if label not in labels.values() else f"{label} ({members[0].name})"
    return {labels[key]: members for key, members in keyed.items()}


def _label(flat: Mapping[str, str], differing: Sequence[str], members: Sequence[Run]) -> str:
    """A group's name: the one setting that differs between groups; else a lone run's name; else
    the differing settings as "k=v, ..." when short; else its first run's name without the seed."""
    if flat and len(differing) == 1:
        return flat.get(differing[0], "–")
    if len(members) == 1:
        return members[0].name
    text = ", ".join(f"{k}={flat.get(k, '–')}" for k in differing)
    if flat and differing and len(text) <= _LABEL_CHARS:
        return text
    if flat and not differing:
        return str(members[0].setting("strategy", "name"))
    return re.sub(r"-seed\d+$", "", members[0].name)


def x_values(table: pd.DataFrame, x: XAxis) -> pd.Series:
    """The x of each round of a per-round table: the round, the simulated time at its end, or the
    bytes sent up and down by its end."""
    if x == "round":
        return pd.Series(table.index, index=table.index, dtype=float)
    if x == "bytes":
        sent = table.get("bytes_up", 0) + table.get("bytes_down", 0)
        return pd.Series(sent, index=table.index, dtype=float).cumsum()
    return table["sim_time_s"].astype(float) if "sim_time_s" in table else pd.Series(math.nan, index=table.index)


def group_curve(runs: Sequence[Run], metric: str, x: XAxis) -> pd.DataFrame:
    """Per round: the x (mean over the group's runs), the metric's mean over them with the t
    interval `lo`, `hi` (NaN with one run), and `n`, the runs that have the round."""
    tables = [run.table for run in runs if run.table is not None and metric in run.table]
    if not tables:
        return pd.DataFrame(columns=["x", "mean", "lo", "hi", "n"], index=pd.Index([], name="round"))
    ys = pd.concat([t[metric].astype(float) for t in tables], axis=1)
    xs = pd.concat([x_values(t, x) for t in tables], axis=1)
    rows = {}
    for server_round in ys.index:
        iv = t_interval(ys.loc[server_round].to_numpy())
        rows[server_round] = {
            "x": float(xs.loc[server_round].mean()),
            "mean": iv.estimate,
            "lo": iv.lo,
            "hi": iv.hi,
            "n": int(ys.loc[server_round].notna().sum()),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("round").sort_index()


def time_to_target(groups: Mapping[str, Sequence[Run]], target: float) -> pd.DataFrame:
    """Per group, the runs whose central accuracy reached `target` (`report.time_to_accuracy`): how
    many of how many, and the first round and simulated time at which they did, mean [t interval]
    over those runs."""
    rows = []
    for label, runs in groups.items():
        hits = [time_to_accuracy(r.metrics, target) for r in runs if r.metrics is not None and not r.metrics.empty]
        reached = [h for h in hits if h is not None]
        rounds, seconds = t_interval([h[0] for h in reached]), t_interval([h[1] for h in reached])
        rows.append(
            {
                "group": label,
                "reached": len(reached),
                "runs": len(runs),
                "round": rounds.estimate,
                "round_lo": rounds.lo,
                "round_hi": rounds.hi,
                "sim_time_s": seconds.estimate,
                "sim_time_lo": seconds.lo,
                "sim_time_hi": seconds.hi,
            }
        )
    return pd.DataFrame(rows)


def _results(runs: Sequence[Run], target: float) -> tuple[list[tuple[Run, RunResult]], list[str]]:
    """Each readable run with its `read_results` (the others left out with a note), read folder by
    folder so that `read_results` checks that the runs of a seed share their held-out set; where
    that check fails, the runs are kept without their per-example results, and a note says so."""
    notes: list[str] = []
    folders: dict[Path, list[tuple[Run, RunResult]]] = {}
    for run in runs:
        for result in _read_one(run, target, notes):
            folders.setdefault(run.path.parent, []).append((run, result))
    pairs: list[tuple[Run, RunResult]] = []
    for folder, members in folders.items():
        try:
            read_results([_stub(run) for run, _ in members], folder, target)
            pairs += members
        except ValueError as exc:
            notes.append(f"{exc}: pooled intervals left out")
            pairs += [(run, replace(result, examples=None)) for run, result in members]
    return pairs, notes


def _read_one(run: Run, target: float, notes: list[str]) -> list[RunResult]:
    try:
        return read_results([_stub(run)], run.path.parent, target)
    except Exception as exc:  # the reason is shown instead of the run's row
        notes.append(f"{run.name}: left out of the final table ({type(exc).__name__}: {exc})")
        return []


def _stub(run: Run) -> Scenario:
    """The parts of a scenario `read_results` reads (name, seed, strategy), without validating the
    rest: a dashboard shows runs whose model or data may no longer be on this machine."""
    seed = run.scenario.get("seed")
    return Scenario.model_construct(
        name=run.path.name,
        seed=seed if isinstance(seed, int) else 0,
        strategy=StrategyConfig.model_construct(name=run.setting("strategy", "name")),
    )


def final_table(groups: Mapping[str, Sequence[Run]], target: float, baseline: str) -> tuple[pd.DataFrame, list[str]]:
    """`comparison.comparison` of the groups' runs (one row per group and metric of `METRICS`,
    differences from `baseline`, or the first group, paired by seed), and notes on the runs left
    out or the checks that failed."""
    label_of = {run.path: label for label, runs in groups.items() for run in runs}
    pairs, notes = _results([run for runs in groups.values() for run in runs], target)
    results = [replace(r, strategy=label_of[run.path]) for run, r in pairs]
    if not results:
        return pd.DataFrame(), notes
    base = baseline if baseline in {r.strategy for r in results} else results[0].strategy
    try:
        return comparison(results, base), notes
    except ValueError as exc:  # paired per-example results of different lengths: other held-out sets
        notes.append(f"{exc}: pooled intervals left out")
        return comparison([replace(r, examples=None) for r in results], base), notes
