"""Each plot function returns a PNG that PIL opens, of the requested size, with something drawn."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tests_support.fake_runs import metrics

from dashboards.runs import per_round
from fedsim.results.plots import (
    SIZE_PX,
    accuracy_png,
    available_plots,
    compare_accuracy_png,
    compare_loss_png,
    compare_sim_time_png,
    loss_png,
    sim_time_accuracy_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _open(png: bytes) -> Image.Image:
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _drawn(image: Image.Image) -> bool:
    """Not one flat colour: axes, lines and labels were drawn."""
    low, high = image.convert("L").getextrema()
    return low < high


@pytest.fixture
def table() -> pd.DataFrame:
    return per_round(metrics([0.25, 0.5, 0.75, 0.625], sim_time=True))


@pytest.mark.parametrize("plot", [accuracy_png, loss_png, sim_time_accuracy_png])
def test_run_plots_are_pngs_of_the_default_size(plot: Callable[[pd.DataFrame], bytes], table: pd.DataFrame) -> None:
    image = _open(plot(table))

    assert image.format == "PNG" and image.size == SIZE_PX and _drawn(image)


@pytest.mark.parametrize("size_px", [(320, 200), (900, 500)])
def test_plots_take_a_size_in_pixels(table: pd.DataFrame, size_px: tuple[int, int]) -> None:
    assert _open(accuracy_png(table, size_px=size_px)).size == size_px
    assert _open(compare_accuracy_png({"a": table}, size_px=size_px)).size == size_px


def test_compare_draws_any_run_names(table: pd.DataFrame) -> None:
    # `$` would start matplotlib math text, a leading `_` would hide the label
    tables = {"alpha": table, "cost $5_": table.iloc[:2], "_underscore": table}

    image = _open(compare_accuracy_png(tables))

    assert image.size == SIZE_PX and _drawn(image)


def test_different_data_draw_different_images(table: pd.DataFrame) -> None:
    flipped = table.assign(central_accuracy=1 - table["central_accuracy"])

    assert accuracy_png(table) != accuracy_png(flipped)


@pytest.mark.parametrize(
    ("plot", "column"),
    [(accuracy_png, "central_accuracy"), (loss_png, "train_loss"), (sim_time_accuracy_png, "sim_time_s")],
)
def test_a_missing_column_is_named(plot: Callable[[pd.DataFrame], bytes], column: str, table: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=column):
        plot(table.drop(columns=column))


def test_available_plots_follow_the_columns(table: pd.DataFrame) -> None:
    assert available_plots(table) == ["accuracy", "loss", "sim_time"]
    assert available_plots(table.drop(columns="sim_time_s")) == ["accuracy", "loss"]


def _banded(table: pd.DataFrame, half: float) -> pd.DataFrame:
    """`table` with the `<column>_lo` / `_hi` of a `fedsim compare` curve, ± `half` around it."""
    return table.assign(
        **{
            f"{c}_{side}": table[c] + sign * half
            for c in ("central_accuracy", "central_loss")
            for side, sign in (("lo", -1), ("hi", 1))
        }
    )


@pytest.mark.parametrize("plot", [compare_accuracy_png, compare_sim_time_png, compare_loss_png])
def test_compare_plots_shade_the_interval_where_the_table_has_one(
    plot: Callable[[dict[str, pd.DataFrame]], bytes], table: pd.DataFrame
) -> None:
    plain, banded = plot({"fedit": table}), plot({"fedit": _banded(table, 0.1)})
    undefined = _banded(table, float("nan"))  # one seed: no interval

    assert _drawn(_open(banded)) and banded != plain
    assert plot({"fedit": undefined}) == plain
    # the band is the line's colour, faded: more pixels differ from white than with the line alone
    grey = [int((np.asarray(_open(png).convert("L")) < 250).sum()) for png in (plain, banded)]
    assert grey[1] > grey[0] + 1000
