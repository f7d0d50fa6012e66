"""A web dashboard over fedsim run directories (`fedsim dashboard`); its plots are
`fedsim.results.plots`."""

from dashboards.app import DashboardServer, main, route, run_forever, serve
from dashboards.runs import Run, RunNotFoundError, list_runs, load_run, per_round, resolve_run, summary

__all__ = [
    "DashboardServer",
    "Run",
    "RunNotFoundError",
    "list_runs",
    "load_run",
    "main",
    "per_round",
    "resolve_run",
    "route",
    "run_forever",
    "serve",
    "summary",
]
