"""A web dashboard over fedsim run directories (`fedsim dashboard`), and the plots it draws,
reusable elsewhere (`fedsim compare`)."""

from dashboards.app import DashboardServer, main, route, run_forever, serve
from dashboards.plots import (
    accuracy_png,
    available_plots,
    compare_accuracy_png,
    compare_loss_png,
    compare_sim_time_png,
    loss_png,
    sim_time_accuracy_png,
)
from dashboards.runs import Run, RunNotFoundError, list_runs, load_run, per_round, resolve_run, summary

__all__ = [
    "DashboardServer",
    "Run",
    "RunNotFoundError",
    "accuracy_png",
    "available_plots",
    "compare_accuracy_png",
    "compare_loss_png",
    "compare_sim_time_png",
    "list_runs",
    "load_run",
    "loss_png",
    "main",
    "per_round",
    "resolve_run",
    "route",
    "run_forever",
    "serve",
    "sim_time_accuracy_png",
    "summary",
]
