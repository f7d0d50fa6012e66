"""The dashboard's Plotly figures: pure functions, tables in and `go.Figure` out.

Curves take a per-round table (`dashboards.runs.per_round`) or a group's curve
(`dashboards.groups.group_curve`); the fleet figures take a run's per-client rows
(`dashboards.runs.client_rows`). Smoothing is TensorBoard's: an exponential moving average
s_t = w·s_{t-1} + (1 − w)·x_t, divided by 1 − w^t so the first points are not pulled to 0; the
raw curve stays underneath, faint. Every figure keeps its zoom and hidden traces across live
updates (`uirevision`). Names from run directories are HTML-escaped, since Plotly renders
some tags in legends, labels and hover text. Colours come from a 24-colour palette, then evenly spaced hues, so no two
of many runs share one.
"""

from __future__ import annotations

import colorsys
import html
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from dashboards.format import human_bytes

STATUS_COLOURS = {  # metrics.parquet's `status` values, in the order of the status heatmap's scale
    "ok": "#4caf50",
    "straggler": "#ffb300",
    "dropped": "#8d6e63",
    "infeasible": "#9e9e9e",
    "failed": "#e53935",
    "rejected": "#8e24aa",
}
FLEET_QUANTITIES = {  # per-client quantity on the fleet heatmap: its label
    "status": "status",
    "lora_rank": "LoRA rank",
    "prune_ratio": "pruning ratio",
    "arm": "arm (rank / ratio)",
    "reward": "reward",
    "contribution": "contribution",
    "loss": "train loss",
    "sim_round_s": "simulated round time (s)",
    "bytes_up": "bytes up",
}
CURVES = {  # per-round columns on a run's accuracy and loss plots: their label
    "accuracy": {
        "central_accuracy": "central",
        "client_accuracy": "clients (federated eval)",
        "deployed_accuracy": "deployed (pruned models)",
    },
    "loss": {
        "train_loss": "train",
        "central_loss": "central",
        "client_loss": "clients (federated eval)",
        "deployed_loss": "deployed (pruned models)",
    },
}
_HEIGHT = 340
_INTEGER_TICKS = 30  # up to this many rounds, a round axis has a tick at every round


def _e(text: str) -> str:
    """Text from a run directory, escaped: Plotly renders a subset of HTML in names and labels."""
    return html.escape(text, quote=True)


def palette(n: int) -> list[str]:
    """`n` distinct colours: Plotly's Dark24, then hues spread evenly."""
    base = list(qualitative.Dark24)
    if n <= len(base):
        return base[:n]
    extra = [colorsys.hls_to_rgb((i * 0.618034) % 1, 0.45, 0.65) for i in range(n - len(base))]
    return base + [f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})" for r, g, b in extra]


def smooth(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average with `weight` w in [0, 1); NaNs are
    skipped (kept as NaN, not fed to the average)."""
    x = np.asarray(values, dtype=float)
    if weight <= 0:
        return x
    out, last, count = np.full_like(x, math.nan), 0.0, 0
    for i, value in enumerate(x):
        if not math.isfinite(value):
            continue
        count += 1
        last = weight * last + (1 - weight) * value
        out[i] = last / (1 - weight**count)
    return out


def _layout(fig: go.Figure, title: str, xlabel: str, ylabel: str, *, log_y: bool = False, key: str = "") -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0, "font": {"size": 15}},
        height=_HEIGHT,
        margin={"l": 55, "r": 10, "t": 40, "b": 45},
        hovermode="x unified",
        uirevision=key or title,
        legend={"orientation": "h", "y": -0.22, "x": 0},
        template="plotly_white",
    )
    fig.update_xaxes(title_text=xlabel)
    rounds = [v for trace in fig.data for v in (trace.x if trace.x is not None else ()) if v is not None]
    if xlabel == "round" and rounds and max(rounds) <= _INTEGER_TICKS:
        fig.update_xaxes(tick0=0, dtick=1)
    fig.update_yaxes(title_text=ylabel, type="log" if log_y else "linear")
    return fig


def _line(
    fig: go.Figure,
    x: Sequence[float],
    y: Sequence[float],
    name: str,
    colour: str,
    weight: float,
    group: str = "",
) -> None:
    """A named line, smoothed with `weight` over a faint raw copy, both in legend group `group`
    (default: the name)."""
    values = np.asarray(y, dtype=float)
    name, group = _e(name), _e(group or name)
    if weight > 0:
        fig.add_scatter(
            x=list(x),
            y=list(values),
            name=name,
            legendgroup=group,
            showlegend=False,
            hoverinfo="skip",
            line={"color": colour, "width": 1},
            opacity=0.3,
            mode="lines",
        )
    fig.add_scatter(
        x=list(x),
        y=list(smooth(values, weight)),
        name=name,
        legendgroup=group,
        mode="lines+markers",
        line={"color": colour, "width": 2},
        marker={"size": 5},
        hovertemplate=f"{name}: %{{y:.4g}}<extra></extra>",
    )


def run_curves(
    table: pd.DataFrame, which: str, x: pd.Series, xlabel: str, *, weight: float = 0.0, log_y: bool = False
) -> go.Figure:
    """One run's `CURVES[which]` lines (those the table has values for) against `x`."""
    fig = go.Figure()
    present = [c for c in CURVES[which] if c in table and table[c].notna().any()]
    for column, colour in zip(present, palette(len(present))):
        _line(fig, x, table[column], CURVES[which][column], colour, weight)
    return _layout(fig, which, xlabel, which, log_y=log_y, key=f"run-{which}")


def round_metric(
    table: pd.DataFrame, column: str, x: pd.Series, xlabel: str, *, weight: float = 0.0, log_y: bool = False
) -> go.Figure:
    """Any one per-round column of a run against `x`."""
    fig = go.Figure()
    if column in table:
        _line(fig, x, table[column], column, palette(1)[0], weight)
    return _layout(fig, column.replace("_", " "), xlabel, column, log_y=log_y, key="run-metric")


def _arm(rows: pd.DataFrame) -> pd.Series:
    rank = rows["arm_rank"] if "arm_rank" in rows else pd.Series(0, index=rows.index)
    ratio = rows["arm_ratio"] if "arm_ratio" in rows else pd.Series(math.nan, index=rows.index)
    text = "r" + rank.astype(int).astype(str) + " / " + ratio.map(lambda v: f"{v:.2f}" if math.isfinite(v) else "–")
    return text.where(rank > 0, "")


def fleet_values(clients: pd.DataFrame, quantity: str) -> pd.Series:
    """The training rows' value of a `FLEET_QUANTITIES` quantity (text for status and arm)."""
    if quantity == "status":
        return clients["status"].astype(str)
    if quantity == "arm":
        return _arm(clients)
    if quantity == "sim_round_s":
        return clients.get("sim_compute_s", math.nan) + clients.get("sim_comm_s", math.nan)
    return clients[quantity].astype(float) if quantity in clients else pd.Series(math.nan, index=clients.index)


def _categorical(grid: pd.DataFrame, order: Sequence[str], colours: Sequence[str]) -> tuple[np.ndarray, list]:
    """Category codes of a grid of labels and a stepped colour scale that shows code k in colour k."""
    codes = grid.apply(lambda col: col.map(lambda v: order.index(v) if v in order else math.nan))
    n = max(len(order), 1)
    scale = []
    for k, colour in enumerate(colours[:n]):
        scale += [[k / n, colour], [(k + 1) / n, colour]]
    return codes.to_numpy(dtype=float), scale


def fleet_heatmap(clients: pd.DataFrame, quantity: str, by: str) -> go.Figure:
    """Clients (or device profiles, `by="device"`) × rounds, coloured by `quantity` over the
    training rows. By device, a numeric quantity is the mean over its sampled clients, the status
    the share not "ok", an arm the most played one."""
    train = clients[clients["kind"] == "train"] if "kind" in clients else clients
    label = FLEET_QUANTITIES.get(quantity, quantity)
    fig = go.Figure()
    if train.empty:
        return _layout(fig, f"fleet: {label}", "round", by, key=f"fleet-{quantity}-{by}")
    rows = train.assign(value=fleet_values(train, quantity).to_numpy())
    ykey = "device" if by == "device" and "device" in rows else "client_id"
    if ykey == "client_id":
        rows = rows.assign(client=rows["client_id"].astype(str) + " · " + rows.get("device", "").astype(str))
        ykey = "client"
    categorical = quantity == "arm" or (quantity == "status" and ykey != "device")
    if quantity == "status" and ykey == "device":
        rows = rows.assign(value=(rows["value"] != "ok").astype(float))
        label = "share of sampled clients not ok"
    agg = (lambda s: s.mode().iloc[0] if len(s.mode()) else "") if categorical else "mean"
    grid = rows.pivot_table(index=ykey, columns="round", values="value", aggfunc=agg)
    grid = grid.reindex(sorted(grid.index, key=_natural))
    grid.index = [_e(str(i)) for i in grid.index]
    hover = "round %{x}<br>%{y}<br>" + label + ": %{text}<extra></extra>"
    if categorical:
        order = list(STATUS_COLOURS) if quantity == "status" else sorted({v for v in rows["value"] if v})
        colours = list(STATUS_COLOURS.values()) if quantity == "status" else palette(len(order))
        z, scale = _categorical(grid, order, colours)
        fig.add_heatmap(
            z=z,
            x=list(grid.columns),
            y=list(grid.index),
            text=grid.fillna("").map(_e).to_numpy(),
            colorscale=scale,
            zmin=0,
            zmax=max(len(order), 1),
            showscale=False,
            hovertemplate=hover,
            xgap=1,
            ygap=1,
        )
        key = "   ".join(f'<span style="color:{c}">■</span> {_e(name)}' for name, c in zip(order, colours))
        fig.add_annotation(text=key, xref="paper", yref="paper", x=0, y=1.0, yanchor="bottom", showarrow=False)
    else:
        text = grid.map(lambda v: _cell(v, quantity))
        fig.add_heatmap(
            z=grid.to_numpy(dtype=float),
            x=list(grid.columns),
            y=list(grid.index),
            text=text.to_numpy(),
            colorscale="Viridis",
            hovertemplate=hover,
            xgap=1,
            ygap=1,
            colorbar={"title": {"text": label}},
        )
    fig = _layout(
        fig,
        f"fleet: {label}",
        "round",
        "device profile" if ykey == "device" else "client · device",
        key=f"fleet-{quantity}-{by}",
    )
    fig.update_layout(hovermode="closest", height=max(_HEIGHT, 100 + 18 * len(grid.index)))
    fig.update_layout(margin={"t": 60})
    fig.update_xaxes(dtick=1 if len(grid.columns) <= 30 else None)
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def _cell(value: float, quantity: str) -> str:
    if not math.isfinite(value):
        return "–"
    return human_bytes(value) if quantity == "bytes_up" else f"{value:.4g}"


def _natural(label: str) -> tuple[int, str]:
    head = label.split(" ", 1)[0]
    return (int(head), label) if head.isdigit() else (10**9, label)


def time_split(clients: pd.DataFrame, by: str) -> go.Figure:
    """Simulated compute against communication time of the clients that trained (status ok), stacked:
    mean per round (`by="round"`) or per device profile."""
    train = clients[(clients["kind"] == "train") & (clients["status"] == "ok")] if "kind" in clients else clients
    fig = go.Figure()
    columns = [c for c in ("sim_compute_s", "sim_comm_s") if c in train]
    key = "device" if by == "device" and "device" in train else "round"
    if not train.empty and columns:
        means = train.groupby(key)[columns].mean()
        for column, colour, name in zip(columns, ("#1f77b4", "#ff7f0e"), ("compute", "communication")):
            fig.add_bar(
                x=[_e(str(i)) for i in means.index] if key == "device" else list(means.index),
                y=means[column],
                name=name,
                marker_color=colour,
                hovertemplate=name + ": %{y:.4g} s<extra></extra>",
            )
    fig = _layout(fig, "simulated time per client: compute vs communication", key, "seconds (mean)", key=f"split-{by}")
    fig.update_layout(barmode="stack")
    return fig


def compare_curves(
    curves: Mapping[str, pd.DataFrame],
    metric: str,
    xlabel: str,
    *,
    band: bool = True,
    weight: float = 0.0,
    log_y: bool = False,
) -> go.Figure:
    """One line per group (`groups.group_curve`: x, mean, lo, hi) with its interval as a band that
    shares the line's legend entry, so toggling the entry hides both."""
    fig = go.Figure()
    for (label, curve), colour in zip(curves.items(), palette(len(curves))):
        if curve.empty:
            continue
        x = curve["x"].to_numpy(dtype=float)
        if band and curve["lo"].notna().any():
            fig.add_scatter(
                x=np.concatenate([x, x[::-1]]),
                y=np.concatenate([curve["hi"].to_numpy(dtype=float), curve["lo"].to_numpy(dtype=float)[::-1]]),
                fill="toself",
                mode="lines",
                fillcolor=colour,
                opacity=0.18,
                line={"width": 0},
                name=_e(label),
                legendgroup=_e(label),
                showlegend=False,
                hoverinfo="skip",
            )
        n = int(curve["n"].max()) if "n" in curve else 1
        _line(fig, x, curve["mean"], label + (f" (n={n})" if n > 1 else ""), colour, weight, group=label)
    return _layout(fig, metric.replace("_", " "), xlabel, metric, log_y=log_y, key="compare")


def human_axis(fig: go.Figure, axis: str) -> go.Figure:
    """Label a bytes axis ("x" or "y") in KiB/MiB/GiB ticks."""
    getattr(fig, f"update_{axis}axes")(ticksuffix="B", tickformat="~s")
    return fig
