"""The Run page (`/run/<name>`): one run's curves, its fleet over the rounds, its clients, events
and scenario.

- Curves: accuracy and loss (central, clients' federated evaluation, training, and the deployed
  pruned models where the run has them) and any other per-round column (aggregation bias, privacy
  budget `dp_epsilon`, ...) against the round, the simulated time or the bytes sent; log scale
  and smoothing.
- Fleet: clients (or device profiles) × rounds coloured by status, LoRA rank, pruning ratio, the
  controller's arm, reward, ...; simulated compute against communication time.
- Pruned runs: the final adapter on each target ratio's model (`report.ratio_table`).
- Clients of any round in a sortable, filterable table, bytes and FLOPs in human units; events as
  sentences; the scenario.

While the run is in progress the page asks every `POLL_S` seconds whether it changed and redraws
in place (zoom and hidden traces kept); once it is finished or failed, polling stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dash_ag_grid as dag
import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dcc, html, no_update

from dashboards.figures import CURVES, FLEET_QUANTITIES, fleet_heatmap, human_axis, round_metric, run_curves, time_split
from dashboards.format import describe_event, human_bytes, human_seconds, number
from dashboards.groups import X_LABELS, x_values
from dashboards.runs import Run, RunNotFoundError, client_rows, load_run, read_events, summary, version
from dashboards.widgets import badge, column, compare_url, note, radio, section, smoothing, table
from fedsim.results.report import ratio_table

CLIENT_COLUMNS = [
    column("round", "round", "number", maxWidth=95),
    column("client_id", "client", "number", maxWidth=95),
    column("kind", "kind", minWidth=120),
    column("device", "device", minWidth=170),
    column("status", "status", minWidth=110),
    column("lora_rank", "rank", "number"),
    column("prune_ratio", "pruning", "number"),
    column("arm", "arm", minWidth=120),
    column("reward", "reward", "number"),
    column("loss", "loss", "number"),
    column("accuracy", "accuracy", "number"),
    column("num_examples", "examples", "number"),
    column("bytes_up", "bytes up", "bytes"),
    column("bytes_down", "bytes down", "bytes"),
    column("flops", "FLOPs", "flops"),
    column("sim_compute_s", "compute (sim.)", "seconds"),
    column("sim_comm_s", "comm. (sim.)", "seconds"),
    column("reason", "reason", minWidth=240),
]
LATEST = -1  # the clients table's round that follows the run's last round
_SKIP_METRICS = {*CURVES["accuracy"], *CURVES["loss"]}  # on the two main plots already


def layout(root: Path, name: str, poll_s: float) -> html.Div:
    """The page of run `name`, polling every `poll_s` seconds while it runs; `RunNotFoundError`
    when there is none (the router then shows "not found")."""
    run = load_run(root, name)
    folder = name.rpartition("/")[0]
    return html.Div(
        [
            dcc.Store(id="run-name", data=name),
            dcc.Store(id="run-version", data=version(run)),
            dcc.Interval(id="run-poll", interval=int(poll_s * 1000), disabled=run.finished),
            html.H1(["Run ", html.Span(name, id="run-title")]),
            html.Div(id="run-header", children=header(run)),
            html.Div(dcc.Link(f"compare the runs of {folder}", href=compare_url(folder=folder)), className="links")
            if folder
            else None,
            _curves(),
            _fleet(),
            html.Div(id="run-extra"),
            _clients_table(),
            section("Events", html.Div(id="run-events")),
            section("Scenario", html.Pre(run.scenario_text or "(no scenario.toml)", id="run-scenario")),
            note(f"{run.path.resolve()} · as JSON: /api/run/{name}", "muted"),
        ]
    )


def _curves() -> html.Section:
    """Accuracy and loss, and any other per-round metric, with their controls."""
    return section(
        "Curves",
        html.Div(
            [
                radio("run-x", X_LABELS, "round"),
                dcc.Checklist(id="run-log", options=[{"label": "log y", "value": "log"}], value=[], inline=True),
                smoothing("run-smooth"),
            ],
            className="controls",
        ),
        html.Div([dcc.Graph(id="run-accuracy"), dcc.Graph(id="run-loss")], className="grid2"),
        html.Div(
            [html.Label("other per-round metric "), dcc.Dropdown(id="run-metric", clearable=False)],
            className="controls",
            style={"width": "30em"},
        ),
        dcc.Graph(id="run-metric-graph"),
    )


def _fleet() -> html.Section:
    """Clients × rounds by a chosen quantity; compute against communication time."""
    return section(
        "Fleet",
        html.Div(
            [
                dcc.Dropdown(
                    id="fleet-quantity",
                    options=[{"label": v, "value": k} for k, v in FLEET_QUANTITIES.items()],
                    value="status",
                    clearable=False,
                    style={"width": "18em"},
                ),
                radio("fleet-by", {"client": "per client", "device": "per device profile"}, "client"),
            ],
            className="controls",
        ),
        dcc.Graph(id="fleet-heatmap"),
        radio("split-by", {"round": "per round", "device": "per device profile"}, "device"),
        dcc.Graph(id="time-split"),
    )


def _clients_table() -> html.Section:
    """The clients of a chosen round."""
    return section(
        "Clients",
        html.Div(
            [html.Label("round "), dcc.Dropdown(id="clients-round", clearable=False, style={"width": "8em"})],
            className="controls",
        ),
        dag.AgGrid(
            id="clients-grid",
            columnDefs=CLIENT_COLUMNS,
            defaultColDef={"sortable": True, "resizable": True, "floatingFilter": True, "minWidth": 90},
            columnSize="autoSize",
            style={"height": "26em", "width": "100%"},
        ),
    )


def header(run: Run) -> list[Any]:
    """Status, progress and totals of the run, and its errors."""
    s = summary(run)
    done, planned = s["rounds_done"], s["rounds_planned"]
    facts = [
        ("status", badge(run.status)),
        ("rounds", f"{number(done)} / {number(planned)}"),
        ("strategy", s["strategy"]),
        ("model", s["model"]),
        ("task", s["task"]),
        ("seed", number(s["seed"])),
        ("central accuracy", f"{number(s['final_accuracy'])} (best {number(s['best_accuracy'])})"),
        ("central loss", number(s["final_central_loss"])),
        ("simulated time", human_seconds(s["sim_time_s"])),
        ("wall time", human_seconds(s["wall_time_s"])),
        ("sent", f"{human_bytes(s['bytes_up'])} up, {human_bytes(s['bytes_down'])} down"),
    ]
    items = [html.Div([html.B(k + ": "), v], id=f"fact-{k.replace(' ', '-')}") for k, v in facts]
    live = "live: updating in place" if not run.finished else "finished: not polling"
    return [
        html.Div(items, className="facts"),
        note(live, "muted"),
        *[note(error, "error") for error in run.errors],
    ]


def _table(run: Run) -> pd.DataFrame:
    return run.table if run.table is not None else pd.DataFrame(index=pd.Index([], name="round"))


def _events(run: Run) -> html.Ol | html.P:
    events = read_events(run)
    if not events:
        return note("No events yet.")
    items = []
    for event in reversed(events):
        when, kind, details = describe_event(event)
        items.append(
            html.Li(
                [
                    html.Span(when, className="when"),
                    html.Span(kind, className=f"kind kind-{kind.replace(' ', '-')}"),
                    html.Span(details),
                ]
            )
        )
    return html.Ol(items, className="events", reversed=True)


def _extra(run: Run) -> list[Any]:
    """The sections only some runs have: deployed pruned models, privacy budget."""
    parts: list[Any] = []
    if run.metrics is not None and not run.metrics.empty:
        ratios = ratio_table(run.metrics)
        if len(ratios):
            rows = [
                [f"{t:.2f}", number(r.prune_ratio), number(r.accuracy), number(r.loss), number(r.num_examples)]
                for t, r in ratios.iterrows()
            ]
            parts.append(
                section(
                    "Deployed models",
                    note(
                        "The final adapter on each target pruning ratio's model, central test set "
                        "(the per-round deployed scores are on the accuracy and loss plots)."
                    ),
                    table(rows, ["target ratio", "pruned share", "accuracy", "loss", "examples"], id="deployed-table"),
                )
            )
    table_ = _table(run)
    if "dp_epsilon" in table_ and table_["dp_epsilon"].notna().any():
        x = x_values(table_, "round")
        fig = round_metric(table_, "dp_epsilon", x, "round")
        fig.update_layout(title={"text": "privacy budget ε spent so far"})
        parts.append(section("Privacy", dcc.Graph(id="run-privacy", figure=fig)))
    return parts


def _clients(run: Run) -> pd.DataFrame:
    rows = client_rows(run)
    if rows.empty:
        return rows
    if "arm_rank" in rows:
        ratio = rows["arm_ratio"].map(lambda v: f"{v:.2f}" if pd.notna(v) else "–")
        rows = rows.assign(arm=("r" + rows["arm_rank"].astype(str) + " / " + ratio).where(rows["arm_rank"] > 0, ""))
    return rows


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts, NaN as None."""
    clean = frame.astype(object).where(frame.notna(), None)
    return [{str(k): v for k, v in row.items()} for row in clean.to_dict("records")]


def register(app: Dash, root: Path) -> None:
    """The page's callbacks: one poll that notices a change, the others redraw from it."""

    def current(name: str) -> Run | None:
        try:
            return load_run(root, name)
        except RunNotFoundError:
            return None

    @app.callback(
        Output("run-version", "data"),
        Output("run-poll", "disabled"),
        Input("run-poll", "n_intervals"),
        State("run-name", "data"),
        State("run-version", "data"),
        prevent_initial_call=True,
    )
    def poll(_: int, name: str, shown: str) -> tuple[Any, bool]:
        run = current(name)
        if run is None:
            return no_update, True
        token = version(run)
        return (no_update if token == shown else token), run.finished

    @app.callback(
        Output("run-header", "children"),
        Output("run-events", "children"),
        Output("run-extra", "children"),
        Output("clients-round", "options"),
        Output("clients-round", "value"),
        Input("run-version", "data"),
        State("run-name", "data"),
        State("clients-round", "value"),
    )
    def facts(_: str, name: str, picked: int | None) -> tuple[Any, ...]:
        run = current(name)
        if run is None:
            return [note(f"run {name} is gone", "error")], [], [], [], None
        rounds = sorted(int(r) for r in _table(run).index if r > 0)
        options = [{"label": f"latest ({rounds[-1] if rounds else '–'})", "value": LATEST}]
        options += [{"label": str(r), "value": r} for r in rounds]
        return header(run), _events(run), _extra(run), options, picked if picked in rounds else LATEST

    @app.callback(
        Output("run-accuracy", "figure"),
        Output("run-loss", "figure"),
        Output("run-metric", "options"),
        Output("run-metric", "value"),
        Input("run-version", "data"),
        Input("run-x", "value"),
        Input("run-log", "value"),
        Input("run-smooth", "value"),
        State("run-name", "data"),
        State("run-metric", "value"),
    )
    def curves(_: str, x: str, log: list[str], weight: float, name: str, metric: str | None) -> tuple[Any, ...]:
        run = current(name)
        table_ = _table(run) if run is not None else pd.DataFrame()
        xs, label = x_values(table_, x), X_LABELS[x]  # type: ignore[arg-type]
        options = [c for c in table_.columns if c not in _SKIP_METRICS and pd.api.types.is_numeric_dtype(table_[c])]
        figures = [run_curves(table_, which, xs, label, weight=weight or 0.0, log_y="log" in log) for which in CURVES]
        if x == "bytes":
            figures = [human_axis(f, "x") for f in figures]
        default = metric if metric in options else ("aggregation_bias" if "aggregation_bias" in options else None)
        return *figures, options, default or (options[0] if options else None)

    @app.callback(
        Output("run-metric-graph", "figure"),
        Input("run-version", "data"),
        Input("run-metric", "value"),
        Input("run-x", "value"),
        Input("run-log", "value"),
        Input("run-smooth", "value"),
        State("run-name", "data"),
    )
    def metric(_: str, column_: str | None, x: str, log: list[str], weight: float, name: str) -> go.Figure:
        run = current(name)
        table_ = _table(run) if run is not None else pd.DataFrame()
        xs = x_values(table_, x)  # type: ignore[arg-type]
        fig = round_metric(table_, column_ or "", xs, X_LABELS[x], weight=weight or 0.0, log_y="log" in log)
        return human_axis(fig, "x") if x == "bytes" else fig

    @app.callback(
        Output("fleet-heatmap", "figure"),
        Output("time-split", "figure"),
        Input("run-version", "data"),
        Input("fleet-quantity", "value"),
        Input("fleet-by", "value"),
        Input("split-by", "value"),
        State("run-name", "data"),
    )
    def fleet(_: str, quantity: str, by: str, split: str, name: str) -> tuple[go.Figure, go.Figure]:
        run = current(name)
        rows = client_rows(run) if run is not None else pd.DataFrame()
        return fleet_heatmap(rows, quantity, by), time_split(rows, split)

    @app.callback(
        Output("clients-grid", "rowData"),
        Input("run-version", "data"),
        Input("clients-round", "value"),
        State("run-name", "data"),
    )
    def clients(_: str, server_round: int | None, name: str) -> list[dict[str, Any]]:
        run = current(name)
        rows = _clients(run) if run is not None else pd.DataFrame()
        if rows.empty or server_round is None:
            return []
        server_round = int(rows["round"].max()) if server_round == LATEST else server_round
        keep = [c["field"] for c in CLIENT_COLUMNS if c["field"] in rows]
        return _records(rows.loc[rows["round"] == server_round, keep])
