"""The Plotly figures, checked against direct computations on the tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tests_support.fake_runs import fleet_metrics

from dashboards.figures import STATUS_COLOURS, compare_curves, fleet_heatmap, palette, run_curves, smooth, time_split
from dashboards.groups import x_values
from dashboards.runs import per_round


def test_smooth_is_tensorboards_debiased_moving_average() -> None:
    x, w = np.array([1.0, np.nan, 3.0, 5.0]), 0.6
    # reference: s_t = w s_{t-1} + (1 - w) x_t over the finite points, divided by 1 - w^t
    s1 = 0.4 * 1.0
    s2 = 0.6 * s1 + 0.4 * 3.0
    s3 = 0.6 * s2 + 0.4 * 5.0
    expected = [s1 / (1 - 0.6), np.nan, s2 / (1 - 0.6**2), s3 / (1 - 0.6**3)]

    np.testing.assert_allclose(smooth(x, w), expected)
    np.testing.assert_array_equal(smooth(x, 0.0), x)


def test_palette_gives_distinct_colours_past_the_first_ten() -> None:
    assert len(set(palette(40))) == 40


def test_run_curves_draw_the_columns_the_table_has() -> None:
    table = per_round(fleet_metrics([0.25, 0.5, 0.75]))

    fig = run_curves(table, "accuracy", x_values(table, "round"), "round")

    assert [t.name for t in fig.data] == ["central", "clients (federated eval)", "deployed (pruned models)"]
    assert list(fig.data[0].y) == [0.25, 0.5, 0.75] and list(fig.data[2].y) == [0.125, 0.375, 0.625]


def test_bytes_axis_is_cumulative_bytes_sent() -> None:
    table = per_round(fleet_metrics([0.25, 0.5, 0.75]))

    xs = x_values(table, "bytes")

    assert xs.tolist() == (table["bytes_up"] + table["bytes_down"]).cumsum().tolist() and xs.iloc[0] == 0


def test_fleet_status_heatmap_codes_each_client_round() -> None:
    rows = fleet_metrics([0.1, 0.2, 0.3])
    rows = rows[rows["client_id"] >= 0]

    fig = fleet_heatmap(rows, "status", "client")

    heat = fig.data[0]
    grid = pd.DataFrame(heat.z, index=heat.y, columns=heat.x)
    order = list(STATUS_COLOURS)
    # round 2: clients 2, 3, 4 train and 5 is the straggler; client 1 trains only in round 1
    assert grid.loc["5 · jetson-agx-orin", 2] == order.index("straggler")
    assert grid.loc["2 · jetson-agx-orin", 2] == order.index("ok") and np.isnan(grid.loc["1 · jetson-xavier-nx", 2])


def test_fleet_by_device_averages_and_names_are_escaped() -> None:
    rows = fleet_metrics([0.1, 0.2, 0.3])
    rows = rows[rows["kind"] == "train"].assign(device=lambda f: f["device"].replace("jetson-tx2", "<b>tx2</b>"))

    fig = fleet_heatmap(rows, "reward", "device")

    heat = fig.data[0]
    assert "&lt;b&gt;tx2&lt;/b&gt;" in heat.y and "<b>tx2</b>" not in heat.y
    grid = pd.DataFrame(heat.z, index=heat.y, columns=heat.x)
    expected = rows[(rows["device"] == "jetson-agx-orin") & (rows["round"] == 2)]["reward"].mean()
    assert grid.loc["jetson-agx-orin", 2] == expected


def test_time_split_stacks_mean_compute_and_communication_of_kept_clients() -> None:
    rows = fleet_metrics([0.1, 0.2, 0.3])

    fig = time_split(rows, "device")

    compute = dict(zip(fig.data[0].x, fig.data[0].y))
    assert fig.data[0].name == "compute" and fig.layout.barmode == "stack"
    assert compute["jetson-tx2"] == 0.004 and compute["jetson-agx-orin"] == 0.001


def test_a_band_shares_its_lines_legend_entry() -> None:
    curve = pd.DataFrame({"x": [0.0, 1.0], "mean": [0.5, 0.6], "lo": [0.4, 0.5], "hi": [0.6, 0.7], "n": [2, 2]})

    fig = compare_curves({"fedit": curve, "<i>x</i>": curve.assign(lo=np.nan, hi=np.nan, n=1)}, "acc", "round")

    escaped = "&lt;i&gt;x&lt;/i&gt;"
    assert [(t.name, t.legendgroup, t.showlegend) for t in fig.data] == [
        ("fedit", "fedit", False), ("fedit (n=2)", "fedit", None), (escaped, escaped, None),
    ]  # fmt: skip
