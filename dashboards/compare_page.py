"""The Compare page (`/compare?run=a&run=b`, or `?folder=F` for every run of a `fedsim compare`
folder): any per-round metric of the runs against the round, the simulated time or the bytes
sent; runs that differ only by seed grouped into their mean and a 95 % band
(`dashboards.groups`); the time each group took to a target accuracy; the final metrics with their
intervals and differences from a baseline (`fedsim.results.comparison`); and the scenario settings
in which the runs differ. Polls while any of the runs is in progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dcc, html, no_update

from dashboards.figures import compare_curves, human_axis
from dashboards.format import human_bytes, human_seconds, number
from dashboards.groups import (
    X_LABELS,
    final_table,
    group_curve,
    group_runs,
    scenario_differences,
    time_to_target,
)
from dashboards.runs import Run, RunNotFoundError, load_run, version
from dashboards.widgets import note, radio, run_url, section, smoothing, table
from fedsim.results.comparison import METRICS

TARGET = 0.3  # `fedsim compare`'s default target accuracy
_OPTIONS = {"band": "group seeds (mean and 95 % band)", "log": "log y"}
_UNITS = {
    "bytes_up": human_bytes,
    "bytes_down": human_bytes,
    "time_to_target_s": human_seconds,
    "wall_time_s": human_seconds,
}


def load(root: Path, names: Sequence[str]) -> list[Run]:
    """The runs `names`, in order; `RunNotFoundError` for the first that is not there."""
    return [load_run(root, name) for name in dict.fromkeys(names)]


def _metrics(runs: Sequence[Run]) -> list[str]:
    columns: dict[str, None] = {}
    for run in runs:
        if run.table is not None:
            columns |= dict.fromkeys(c for c in run.table.columns if pd.api.types.is_numeric_dtype(run.table[c]))
    first = [
        c for c in ("central_accuracy", "central_loss", "train_loss", "client_accuracy", "client_loss") if c in columns
    ]
    return first + sorted(set(columns) - set(first))


def layout(root: Path, names: Sequence[str], poll_s: float, folder: str | None = None) -> html.Div:
    """The comparison of runs `names` (of `folder`, a `fedsim compare` folder, when given);
    `RunNotFoundError` for a name that is no run."""
    runs = load(root, names)
    groups = group_runs(runs)
    metrics = _metrics(runs)
    baseline = "fedit" if "fedit" in groups else next(iter(groups), "")
    title = f"Compare {len(runs)} runs" + (f" of {folder}" if folder else "")
    return html.Div(
        [
            dcc.Store(id="cmp-names", data=[run.name for run in runs]),
            dcc.Store(id="cmp-version", data=[version(run) for run in runs]),
            dcc.Interval(id="cmp-poll", interval=int(poll_s * 1000), disabled=all(run.finished for run in runs)),
            html.H1(title),
            html.Div([dcc.Link(run.name, href=run_url(run.name)) for run in runs], className="links", id="cmp-runs"),
            note(
                f"{len(groups)} group(s): "
                + "; ".join(f"{k} ({len(v)} run{'s' * (len(v) > 1)})" for k, v in groups.items()),
                "muted",
            ),
            section(
                "Curves",
                html.Div(
                    [
                        dcc.Dropdown(
                            id="cmp-metric",
                            options=metrics,
                            value=metrics[0] if metrics else None,
                            clearable=False,
                            style={"width": "18em"},
                        ),
                        radio("cmp-x", X_LABELS, "round"),
                        dcc.Checklist(
                            id="cmp-options",
                            options=[{"label": v, "value": k} for k, v in _OPTIONS.items()],
                            value=["band"],
                            inline=True,
                        ),
                        smoothing("cmp-smooth"),
                    ],
                    className="controls",
                ),
                dcc.Graph(id="cmp-graph"),
            ),
            section(
                "Final metrics",
                html.Div(
                    [
                        html.Label("target accuracy ", htmlFor="cmp-target"),
                        dcc.Input(
                            id="cmp-target",
                            type="number",
                            value=TARGET,
                            min=0,
                            max=1,
                            step=0.01,
                            debounce=True,
                            style={"width": "7em"},
                        ),
                        html.Label("baseline ", htmlFor="cmp-baseline"),
                        dcc.Dropdown(
                            id="cmp-baseline",
                            options=list(groups),
                            value=baseline,
                            clearable=False,
                            style={"width": "16em"},
                        ),
                    ],
                    className="controls",
                ),
                html.Div(id="cmp-target-table"),
                html.Div(id="cmp-final"),
            ),
            section("Scenario differences", html.Div(_differences(runs), id="cmp-diff")),
        ]
    )


def _differences(runs: Sequence[Run]) -> Any:
    diff = scenario_differences(runs)
    if diff.empty:
        return note("The runs' scenarios are the same but for their names.")
    return table([[key, *values] for key, values in diff.iterrows()], ["setting", *diff.columns])


def _interval(estimate: float, lo: float, hi: float, render: Callable[[Any], str] = number) -> str:
    if not math.isfinite(estimate):
        return "–"
    text = render(estimate)
    return text + (f" [{render(lo)}, {render(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else "")


def _final(frame: pd.DataFrame, notes: Sequence[str], baseline: str) -> list[Any]:
    """The comparison table as "mean [lo, hi]" per group and metric, then the differences from the
    baseline ("~": cannot be told apart)."""
    if frame.empty:
        return [note("No finished rounds to compare yet."), *[note(n, "warning") for n in notes]]
    groups = list(dict.fromkeys(frame["strategy"]))
    baseline = baseline if baseline in groups else groups[0]  # as `final_table` chose
    by = frame.set_index(["strategy", "metric"])
    rows = []
    for metric, label in METRICS.items():
        render = _UNITS.get(metric, number)
        cells = [by.loc[(g, metric)] for g in groups]
        rows.append([label, *(_interval(c["mean"], c["seed_lo"], c["seed_hi"], render) for c in cells)])
    diffs = []
    for metric, label in METRICS.items():
        render = _UNITS.get(metric, number)
        cells = []
        for g in groups:
            row = by.loc[(g, metric)]
            if g == baseline or not math.isfinite(row["diff"]):
                cells.append("–")
                continue
            mark = "" if row["distinguishable"] else " ~"
            cells.append(_interval(row["diff"], row["diff_seed_lo"], row["diff_seed_hi"], render) + mark)
        diffs.append([label, *cells])
    return [
        table(rows, ["final, mean [95 % t interval over seeds]", *groups], id="cmp-final-table"),
        html.H3(f"Difference from {baseline}, paired by seed"),
        table(diffs, ["metric", *groups], id="cmp-diff-table"),
        note(
            "~: cannot be told apart from the baseline (an interval, over seeds or pooled over held-out examples, "
            "contains 0). Pooled intervals: fedsim compare's comparison.md.",
            "muted",
        ),
        *[note(n, "warning") for n in notes],
    ]


def _targets(frame: pd.DataFrame, target: float) -> Any:
    rows = [
        [
            r.group,
            f"{r.reached} / {r.runs}",
            _interval(r.round, r.round_lo, r.round_hi),
            _interval(r.sim_time_s, r.sim_time_lo, r.sim_time_hi, human_seconds),
        ]
        for r in frame.itertuples()
    ]
    head = ["group", f"reached accuracy {target:g}", "at round", "at simulated time"]
    return table(rows, head, id="cmp-target-rows")


def register(app: Dash, root: Path) -> None:
    """The page's callbacks: a poll that notices changes, the plot, the tables."""

    def current(names: Sequence[str]) -> list[Run]:
        try:
            return load(root, names)
        except RunNotFoundError:
            return [run for name in names for run in _maybe(root, name)]

    @app.callback(
        Output("cmp-version", "data"),
        Output("cmp-poll", "disabled"),
        Input("cmp-poll", "n_intervals"),
        State("cmp-names", "data"),
        State("cmp-version", "data"),
        prevent_initial_call=True,
    )
    def poll(_: int, names: list[str], shown: list[str]) -> tuple[Any, bool]:
        runs = current(names)
        tokens = [version(run) for run in runs]
        return (no_update if tokens == shown else tokens), all(run.finished for run in runs)

    @app.callback(
        Output("cmp-graph", "figure"),
        Input("cmp-version", "data"),
        Input("cmp-metric", "value"),
        Input("cmp-x", "value"),
        Input("cmp-options", "value"),
        Input("cmp-smooth", "value"),
        State("cmp-names", "data"),
    )
    def curves(_: Any, metric: str | None, x: str, options: list[str], weight: float, names: list[str]) -> go.Figure:
        runs = current(names)
        groups = group_runs(runs) if "band" in options else {run.name: [run] for run in runs}
        data = {label: group_curve(members, metric or "", x) for label, members in groups.items()}  # type: ignore[arg-type]
        fig = compare_curves(
            data, metric or "", X_LABELS[x], band="band" in options, weight=weight or 0.0, log_y="log" in options
        )
        return human_axis(fig, "x") if x == "bytes" else fig

    @app.callback(
        Output("cmp-target-table", "children"),
        Output("cmp-final", "children"),
        Input("cmp-version", "data"),
        Input("cmp-target", "value"),
        Input("cmp-baseline", "value"),
        State("cmp-names", "data"),
    )
    def tables(_: Any, target: float | None, baseline: str, names: list[str]) -> tuple[Any, Any]:
        runs = current(names)
        groups = group_runs(runs)
        target = TARGET if target is None else float(target)
        frame, notes = final_table(groups, target, baseline)
        return _targets(time_to_target(groups, target), target), _final(frame, notes, baseline)


def _maybe(root: Path, name: str) -> list[Run]:
    try:
        return [load_run(root, name)]
    except RunNotFoundError:
        return []
