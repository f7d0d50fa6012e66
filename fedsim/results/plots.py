"""Plots of runs' per-round tables as PNG bytes: pure functions, a DataFrame in and bytes out, for
the dashboard and for `fedsim compare`.

The tables are `dashboards.runs.per_round` (= `fedsim.results.report.round_table`, indexed by round, plus
`sim_time_s` where a run records it); the comparison plots also take `fedsim.results.comparison.mean_curves`
and shade its `<column>_lo` / `<column>_hi` as a band. Figures are drawn on a bare matplotlib
`Figure` with the Agg canvas, not through pyplot: pyplot keeps global state (the current figure,
the backend chosen at import) and is not thread-safe, while the dashboard renders plots from
several request threads.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.typing import ColorType

SIZE_PX = (640, 360)  # (width, height) of every plot, at 100 dpi
_DPI = 100


def _require(table: pd.DataFrame, columns: tuple[str, ...], plot: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"the {plot} plot needs columns {missing}; the table has {list(table.columns)}")


def _figure(size_px: tuple[int, int], title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(size_px[0] / _DPI, size_px[1] / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if xlabel == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _png(fig: Figure, ax: Axes) -> bytes:
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="best", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _label(name: str) -> str:
    """A run name as a legend label, literally: matplotlib reads `$...$` as math and hides
    labels that start with an underscore."""
    return (" " if name.startswith("_") else "") + name.replace("$", r"\$")


def _accuracy_axis(ax: Axes) -> None:
    ax.set_ylim(-0.02, 1.02)


def accuracy_png(table: pd.DataFrame, *, size_px: tuple[int, int] = SIZE_PX) -> bytes:
    """Central accuracy per round (and the clients' federated accuracy where it was measured)."""
    _require(table, ("central_accuracy",), "accuracy")
    fig, ax = _figure(size_px, "Accuracy", "round", "accuracy")
    ax.plot(table.index, table["central_accuracy"], marker="o", label="central")
    if "client_accuracy" in table.columns and table["client_accuracy"].notna().any():
        ax.plot(table.index, table["client_accuracy"], marker=".", linestyle="--", label="clients (federated)")
    _accuracy_axis(ax)
    return _png(fig, ax)


def loss_png(table: pd.DataFrame, *, size_px: tuple[int, int] = SIZE_PX) -> bytes:
    """Central evaluation loss and the clients' mean training loss per round."""
    _require(table, ("central_loss", "train_loss"), "loss")
    fig, ax = _figure(size_px, "Loss", "round", "loss")
    ax.plot(table.index, table["central_loss"], marker="o", label="central eval")
    ax.plot(table.index, table["train_loss"], marker=".", linestyle="--", label="train (clients' mean)")
    return _png(fig, ax)


def sim_time_accuracy_png(table: pd.DataFrame, *, size_px: tuple[int, int] = SIZE_PX) -> bytes:
    """Central accuracy against the simulated clock (`sim_time_s`) at each round's end."""
    _require(table, ("sim_time_s", "central_accuracy"), "accuracy vs simulated time")
    fig, ax = _figure(size_px, "Accuracy vs simulated time", "simulated time (s)", "accuracy")
    ax.plot(table["sim_time_s"], table["central_accuracy"], marker="o", label="central")
    _accuracy_axis(ax)
    return _png(fig, ax)


def _band(ax: Axes, x: pd.Series, table: pd.DataFrame, column: str, color: ColorType) -> None:
    """Shade [`column`_lo, `column`_hi] around a line where the table has them (`fedsim compare`:
    the 95 % interval over seeds)."""
    lo, hi = f"{column}_lo", f"{column}_hi"
    if lo in table.columns and hi in table.columns and (table[lo].notna() & table[hi].notna()).any():
        ax.fill_between(x, table[lo], table[hi], color=color, alpha=0.2, linewidth=0)


def _compare(tables: Mapping[str, pd.DataFrame], x: str | None, y: str, fig: Figure, ax: Axes, plot: str) -> bytes:
    """One line per table, `y` against `x` (None: the round index), each with its band."""
    for name, table in tables.items():
        _require(table, (y,) if x is None else (x, y), plot)
        xs = table.index.to_series() if x is None else table[x]
        (line,) = ax.plot(xs, table[y], marker="o", label=_label(name))
        _band(ax, xs, table, y, line.get_color())
    if y.endswith("accuracy"):
        _accuracy_axis(ax)
    return _png(fig, ax)


def compare_accuracy_png(tables: Mapping[str, pd.DataFrame], *, size_px: tuple[int, int] = SIZE_PX) -> bytes:
    """Central accuracy per round, one line per run or strategy (`tables`: name → per-round
    table), shaded over [central_accuracy_lo, central_accuracy_hi] where a table has them."""
    fig, ax = _figure(size_px, "Central accuracy", "round", "accuracy")
    return _compare(tables, None, "central_accuracy", fig, ax, "comparison")


def compare_sim_time_png(tables: Mapping[str, pd.DataFrame], *, size_px: tuple[int, int] = SIZE_PX) -> bytes:
    """Central accuracy against simulated fleet time, one line per run or strategy, with its band."""
    fig, ax = _figure(size_px, "Central accuracy over simulated time", "simulated time (s)", "accuracy")
    return _compare(tables, "sim_time_s", "central_accuracy", fig, ax, "comparison over simulated time")


def compare_loss_png(tables: Mapping[str, pd.DataFrame], *, size_px: tuple[int, int] = SIZE_PX) -> bytes:
    """Central loss per round, one line per run or strategy, shaded over [central_loss_lo,
    central_loss_hi] where a table has them."""
    fig, ax = _figure(size_px, "Central loss", "round", "loss")
    return _compare(tables, None, "central_loss", fig, ax, "loss comparison")


@dataclass(frozen=True)
class RunPlot:
    """A plot of one run: how to draw it and the per-round columns it needs."""

    render: Callable[[pd.DataFrame], bytes]
    needs: tuple[str, ...]
    alt: str


RUN_PLOTS: dict[str, RunPlot] = {
    "accuracy": RunPlot(accuracy_png, ("central_accuracy",), "central accuracy vs round"),
    "loss": RunPlot(loss_png, ("central_loss", "train_loss"), "central loss and mean train loss vs round"),
    "sim_time": RunPlot(sim_time_accuracy_png, ("sim_time_s", "central_accuracy"), "accuracy vs simulated time"),
}


def available_plots(table: pd.DataFrame) -> list[str]:
    """Names in `RUN_PLOTS` whose columns `table` has, with at least one value (a run that does
    not record a column has it all-NaN)."""
    return [
        name
        for name, plot in RUN_PLOTS.items()
        if all(c in table.columns and table[c].notna().any() for c in plot.needs)
    ]
