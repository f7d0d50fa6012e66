"""The Runs page (`/`, `/runs`): every run under the root at any depth in one sortable, filterable
table; click a run's name to open it, tick runs and "Compare selected" to compare them. The
`fedsim compare` folders are listed above it, each opening straight into its comparison. The table
is refreshed in place every `POLL_S` seconds when anything changed; row selection survives it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dash_ag_grid as dag
from dash import Dash, Input, Output, State, ctx, dcc, html, no_update

from dashboards.runs import comparisons, list_runs, runs_in, summary
from dashboards.widgets import column, compare_url, note, run_url

PAGE_ROWS = 50  # runs per page of the table
COLUMNS = [
    column("name", "run", cellClass="link", minWidth=220),
    column("strategy", "strategy"),
    column("model", "model"),
    column("seed", "seed", "number", maxWidth=90),
    column("status", "status", maxWidth=120),
    column("rounds_done", "rounds", "number", maxWidth=110),
    column("rounds_planned", "of", "number", maxWidth=80),
    column("final_accuracy", "final acc.", "number"),
    column("best_accuracy", "best acc.", "number"),
    column("final_central_loss", "final loss", "number"),
    column("best_central_loss", "best loss", "number"),
    column("sim_time_s", "sim. time", "seconds"),
    column("bytes", "bytes sent", "bytes"),
    column("updated", "updated"),
    column("errors", "problems", minWidth=200),
]


def rows(root: Path) -> list[dict[str, Any]]:
    """The table's rows, most recently changed run first (`id`: the run's name)."""
    out = []
    for run in list_runs(root):
        s = summary(run)
        sent = (s["bytes_up"] or 0) + (s["bytes_down"] or 0)
        out.append(
            s
            | {
                "id": run.name,
                "bytes": sent if s["bytes_up"] is not None else None,
                "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.mtime)),
                "errors": "; ".join(s["errors"]),
            }
        )
    return out


def _comparison_links(root: Path) -> html.Div:
    folders = comparisons(root)
    if not folders:
        return html.Div()
    links = [
        dcc.Link(f"{folder} ({len(runs_in(root, folder))} runs)", href=compare_url(folder=folder)) for folder in folders
    ]
    return html.Div([html.Span("fedsim compare folders: ", className="muted"), *links], className="links")


def layout(root: Path, poll_s: float) -> html.Div:
    """The page: every run under `root`, refreshed every `poll_s` seconds."""
    data = rows(root)
    empty = note(f"No runs under {root} yet: start one with `fedsim run SCENARIO --out {root}`.") if not data else None
    return html.Div(
        [
            html.H1("Runs"),
            note(f"{len(data)} runs under {root.resolve()}, most recently changed first.", "muted"),
            _comparison_links(root),
            empty,
            html.Div(
                [
                    html.Button("Compare selected", id="compare-button", className="primary", disabled=True),
                    html.Span(id="runs-selected", className="muted"),
                ],
                className="controls",
            ),
            dag.AgGrid(
                id="runs-grid",
                rowData=data,
                columnDefs=COLUMNS,
                defaultColDef={"sortable": True, "resizable": True, "floatingFilter": True, "minWidth": 80},
                dashGridOptions={
                    "rowSelection": {"mode": "multiRow", "checkboxes": True, "headerCheckbox": True},
                    "domLayout": "autoHeight",
                    "pagination": True,
                    "paginationPageSize": PAGE_ROWS,
                    "animateRows": False,
                },
                getRowId="params.data.id",
                columnSize="autoSize",
                style={"width": "100%"},
            ),
            dcc.Interval(id="runs-poll", interval=int(poll_s * 1000)),
        ]
    )


def register(app: Dash, root: Path) -> None:
    """The page's callbacks: refresh the rows, count the selection, open a run or a comparison."""

    @app.callback(
        Output("runs-grid", "rowData"),
        Input("runs-poll", "n_intervals"),
        State("runs-grid", "rowData"),
        prevent_initial_call=True,
    )
    def refresh(_: int, shown: list[dict[str, Any]] | None) -> Any:
        data = rows(root)
        return no_update if data == shown else data

    @app.callback(
        Output("compare-button", "disabled"),
        Output("runs-selected", "children"),
        Input("runs-grid", "selectedRows"),
    )
    def selected(picked: list[dict[str, Any]] | None) -> tuple[bool, str]:
        n = len(picked or [])
        return n < 1, f"{n} selected" if n else "tick runs to compare them"

    @app.callback(
        Output("url", "href"),
        Input("runs-grid", "cellClicked"),
        Input("compare-button", "n_clicks"),
        State("runs-grid", "selectedRows"),
        prevent_initial_call=True,
    )
    def navigate(cell: dict[str, Any] | None, _: int | None, picked: list[dict[str, Any]] | None) -> Any:
        if ctx.triggered_id == "compare-button":
            return compare_url([row["id"] for row in picked or []]) if picked else no_update
        if cell and cell.get("colId") == "name" and cell.get("rowId") is not None:
            return run_url(str(cell["rowId"]))
        return no_update
