"""The arm grid: sorted and unique, index ↔ (rank, ratio), coordinates, snapping, memory order."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.controllers.arms import ArmGrid, dominated_by, same_point


def test_grid_is_sorted_unique_and_indexed_rank_major():
    grid = ArmGrid((16, 4, 8, 4), (0.4, 0.0))
    assert grid.ranks == (4, 8, 16) and grid.ratios == (0.0, 0.4) and grid.num_arms == 6
    assert list(zip(grid.arm_ranks().tolist(), grid.arm_ratios().tolist())) == [
        (4, 0.0),
        (4, 0.4),
        (8, 0.0),
        (8, 0.4),
        (16, 0.0),
        (16, 0.4),
    ]


def test_arm_of_inverts_rank_of_and_ratio_of():
    grid = ArmGrid((4, 8, 16, 32), (0.0, 0.2, 0.4, 0.6))
    arms = np.arange(grid.num_arms)
    np.testing.assert_array_equal(grid.arm_of(grid.rank_of(arms), grid.ratio_of(arms)), arms)
    np.testing.assert_array_equal(grid.arm_of(np.array([8]), np.array([0.2 + 1e-9])), [5])  # float noise tolerated


@pytest.mark.parametrize(("rank", "ratio"), [(5, 0.2), (8, 0.3), (64, 0.0)])
def test_arm_of_refuses_points_off_the_grid(rank, ratio):
    with pytest.raises(ValueError, match=rf"\({rank}, {ratio}\) is not on the arm grid"):
        ArmGrid((4, 8, 16, 32), (0.0, 0.2, 0.4, 0.6)).arm_of(np.array([rank]), np.array([ratio]))


@pytest.mark.parametrize(
    ("ranks", "ratios", "message"), [((0, 4), (0.0,), "`ranks`"), ((4,), (1.0,), "`ratios`"), ((), (0.0,), "`ranks`")]
)
def test_invalid_grids_are_refused(ranks, ratios, message):
    with pytest.raises(ValueError, match=message):
        ArmGrid(ranks, ratios)


def test_coordinates_are_log2_for_ranks_and_linear_for_ratios():
    grid = ArmGrid((4, 8, 16, 32), (0.0, 0.2, 0.4, 0.6))
    np.testing.assert_allclose(grid.rank_coord(np.array([4, 8, 16, 32])), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(grid.ratio_coord(np.array([0.0, 0.3, 0.6])), [0, 0.5, 1])
    np.testing.assert_array_equal(grid.rank_at(np.array([0.0, 0.5, 1.0])), [4, 11, 32])  # 2^3.5 = 11.3
    np.testing.assert_array_equal(grid.rank_at(np.array([0.5, 0.6]), snap="grid"), [8, 16])  # log2 11.3 is nearer 8
    assert ArmGrid((8,), (0.2,)).rank_coord(np.array([8])).tolist() == [0.0]


def test_memory_order_and_same_point():
    ranks, ratios = np.array([4, 8, 8, 16]), np.array([0.4, 0.0, 0.4, 0.2])
    np.testing.assert_array_equal(
        dominated_by(ranks, ratios, np.array([8]), np.array([0.2])), [[False, True, False, True]]
    )
    np.testing.assert_array_equal(
        same_point(ranks, ratios, np.array([8]), np.array([0.4])), [[False, False, True, False]]
    )
