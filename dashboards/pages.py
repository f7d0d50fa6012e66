"""The dashboard's HTML: pure functions from loaded runs to a page.

Every string that comes from a run directory (names, scenario text, event fields, failure
reasons) is escaped, by `html.escape` or by pandas' `to_html`: run directories are written by
whoever runs fedsim and the pages are opened in a browser. No JavaScript; pages reload themselves
every `REFRESH_S` seconds so a run in progress can be watched (`?refresh=0` pauses that, e.g. while
ticking runs to compare).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from dashboards.runs import Run, summary
from fedsim.results.plots import RUN_PLOTS

REFRESH_S = 10

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 75em; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.error { color: #b00020; } .muted { color: #777; font-size: 0.85em; }
img { max-width: 100%; margin: 0.3em 0.5em 0.3em 0; border: 1px solid #eee; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A table cell: "–" for missing, 4 significant digits for floats (whole numbers from 1000)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def run_url(name: str) -> str:
    return "/run/" + quote(name, safe="")


def layout(title: str, body: str, *, refresh_s: int = REFRESH_S, toggle_url: str | None = None) -> str:
    """A whole page; reloads itself every `refresh_s` seconds (0: never). `toggle_url` pauses or
    resumes that reloading."""
    meta = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s > 0 else ""
    state = f"auto-refresh every {refresh_s} s" if refresh_s > 0 else "auto-refresh paused"
    toggle = f' · <a href="{_e(toggle_url)}">{"pause" if refresh_s > 0 else "resume"}</a>' if toggle_url else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}'
        f"<title>{_e(title)} · fedsim</title><style>{_CSS}</style></head>\n<body>"
        f'<p class="muted"><a href="/">fedsim runs</a> · {state}{toggle}</p>\n'
        f"<h1>{_e(title)}</h1>\n{body}\n</body></html>\n"
    )


def frame_html(frame: pd.DataFrame, *, index: bool = True) -> str:
    """A DataFrame as an HTML table (pandas escapes the cells)."""
    return frame.to_html(float_format=fmt, na_rep="–", border=0, index=index, escape=True)


def _errors(run: Run) -> str:
    return "".join(f'<div class="error">{_e(error)}</div>' for error in run.errors)


def _index_row(run: Run) -> str:
    s = summary(run)
    rounds = f"{fmt(s['rounds_done'])} / {fmt(s['rounds_planned'])}"
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.mtime))
    cells = [
        f'<input type="checkbox" name="run" value="{_e(run.name)}">',
        f'<a href="{_e(run_url(run.name))}">{_e(run.name)}</a>{_errors(run)}',
        _e(s["model"]),
        _e(s["task"]),
        _e(s["strategy"]),
    ]
    numbers = [rounds, fmt(s["final_accuracy"]), fmt(s["best_accuracy"]), fmt(s["wall_time_s"]), updated]
    return (
        "<tr>"
        + "".join(f'<td class="text">{c}</td>' for c in cells)
        + "".join(f"<td>{n}</td>" for n in numbers)
        + "</tr>"
    )


def index_page(runs: Sequence[Run], root: Path, *, refresh_s: int = REFRESH_S, toggle_url: str | None = None) -> str:
    """Every run under `root` in a table, with checkboxes to compare some of them."""
    if not runs:
        body = f"<p>No runs under <code>{_e(root)}</code> yet: start one with <code>fedsim run SCENARIO</code>.</p>"
        return layout("fedsim runs", body, refresh_s=refresh_s, toggle_url=toggle_url)
    heads = ["", "run", "model", "task", "strategy"]
    numbers = ["rounds", "final acc.", "best acc.", "wall time (s)", "updated"]
    header = "".join(f'<th class="text">{h}</th>' for h in heads) + "".join(f"<th>{h}</th>" for h in numbers)
    rows = "\n".join(_index_row(run) for run in runs)
    body = (
        f'<p class="muted">{len(runs)} runs under <code>{_e(root)}</code>, most recently changed first.</p>\n'
        f'<form action="/compare" method="get"><table><tr>{header}</tr>\n{rows}</table>\n'
        '<p><button type="submit">Compare selected runs</button></p></form>'
    )
    return layout("fedsim runs", body, refresh_s=refresh_s, toggle_url=toggle_url)


def _details(event: Mapping[str, Any]) -> str:
    rest = {k: v for k, v in event.items() if k not in {"time", "event"}}
    return json.dumps(rest, default=str)


def _event_time(event: Mapping[str, Any]) -> str:
    stamp = event.get("time")
    if isinstance(stamp, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    return "" if stamp is None else str(stamp)


def events_html(events: Sequence[Mapping[str, Any]]) -> str:
    if not events:
        return '<p class="muted">No events yet.</p>'
    rows = "".join(
        f'<tr><td class="text">{_e(_event_time(ev))}</td><td class="text">{_e(ev.get("event", ""))}</td>'
        f'<td class="text"><code>{_e(_details(ev))}</code></td></tr>\n'
        for ev in events
    )
    return (
        '<table><tr><th class="text">time</th><th class="text">event</th><th class="text">details</th></tr>\n'
        f"{rows}</table>"
    )


def _plots_html(run: Run, plots: Sequence[str]) -> str:
    base = run_url(run.name)
    return "".join(f'<img src="{_e(f"{base}/plot/{name}.png")}" alt="{_e(RUN_PLOTS[name].alt)}">' for name in plots)


def run_page(
    run: Run,
    plots: Sequence[str],
    clients: pd.DataFrame,
    events: Sequence[Mapping[str, Any]],
    *,
    refresh_s: int = REFRESH_S,
    toggle_url: str | None = None,
) -> str:
    """One run: its errors, plots, per-round table, last round's clients, recent events, scenario."""
    parts = [_errors(run)]
    if run.table is not None:
        parts.append(f"<h2>Plots</h2>\n<div>{_plots_html(run, plots)}</div>")
        parts.append(f"<h2>Rounds</h2>\n{frame_html(run.table.reset_index(), index=False)}")
    if not clients.empty:
        last = int(run.table.index.max()) if run.table is not None and len(run.table) else "?"
        parts.append(f"<h2>Clients in round {_e(last)}</h2>\n{frame_html(clients, index=False)}")
    parts.append(f"<h2>Last {len(events)} events</h2>\n{events_html(events)}")
    scenario = _e(run.scenario_text) if run.scenario_text else "(no scenario.toml)"
    parts.append(f"<h2>Scenario</h2>\n<pre>{scenario}</pre>")
    parts.append(f'<p class="muted">{_e(run.path)} · as JSON: <a href="{_e("/api" + run_url(run.name))}">api</a></p>')
    return layout(f"run {run.name}", "\n".join(parts), refresh_s=refresh_s, toggle_url=toggle_url)


_COMPARED = [
    ("model", "model"),
    ("task", "task"),
    ("strategy", "strategy"),
    ("rounds_done", "rounds done"),
    ("final_accuracy", "final central accuracy"),
    ("best_accuracy", "best central accuracy"),
    ("final_central_loss", "final central loss"),
    ("final_train_loss", "final train loss"),
    ("wall_time_s", "wall time (s)"),
]


def compare_page(
    runs: Sequence[Run], plot_url: str, *, refresh_s: int = REFRESH_S, toggle_url: str | None = None
) -> str:
    """Several runs: their accuracy on one plot (`plot_url`) and their final metrics side by side."""
    summaries = [summary(run) for run in runs]
    header = "".join(f'<th><a href="{_e(run_url(r.name))}">{_e(r.name)}</a>{_errors(r)}</th>' for r in runs)
    rows = "".join(
        f'<tr><th class="text">{label}</th>' + "".join(f"<td>{_e(fmt(s[key]))}</td>" for s in summaries) + "</tr>\n"
        for key, label in _COMPARED
    )
    body = (
        f'<img src="{_e(plot_url)}" alt="central accuracy vs round, one line per run">\n'
        f"<h2>Final metrics</h2>\n<table><tr><th></th>{header}</tr>\n{rows}</table>"
    )
    return layout(f"compare {len(runs)} runs", body, refresh_s=refresh_s, toggle_url=toggle_url)


def error_page(title: str, message: str) -> str:
    """A page that says what went wrong (not reloaded: the address itself is wrong)."""
    body = f'<p class="error">{_e(message)}</p><p><a href="/">All runs</a></p>'
    return layout(title, body, refresh_s=0)
