"""A web dashboard over fedsim run directories (`fedsim dashboard`), on Plotly Dash.

- `runs`: run directories found under a root at any depth, read safely; `groups`: several runs
  grouped over seeds, with intervals; `format`: human-readable values; `figures`: Plotly figures.
- `runs_page`, `run_page`, `compare_page`: the three pages; `widgets`: what they share.
- `app`: the Dash app, its JSON API and the server; `screenshots`: the script behind docs/images/.
"""

from dashboards.app import DashboardServer, create_app, main, run_forever, serve
from dashboards.runs import Run, RunNotFoundError, list_runs, load_run, per_round, resolve_run, summary

__all__ = [
    "DashboardServer",
    "Run",
    "RunNotFoundError",
    "create_app",
    "list_runs",
    "load_run",
    "main",
    "per_round",
    "resolve_run",
    "run_forever",
    "serve",
    "summary",
]
