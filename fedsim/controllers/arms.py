"""The arm grid: every (LoRA rank, pruning ratio) pair a grid controller may assign a device.

Ranks and ratios are kept sorted ascending and unique. Arm a = i·P + j is (ranks[i], ratios[j])
for P ratios, so arm 0 is the smallest rank with the least pruning.

Coordinates map the box [r_min, r_max] × [p_min, p_max] onto the unit square, for the
controllers that measure distances between arms (`sucb`, `fixed`'s fallback):

    u_rank(r)  = (log2 r − log2 r_min) / (log2 r_max − log2 r_min)     (0 when r_min = r_max)
    u_ratio(p) = (p − p_min) / (p_max − p_min)                          (0 when p_min = p_max)

The rank axis is logarithmic because LoRA ranks are usually swept in doublings (4, 8, 16, 32)
and a step from 4 to 8 changes cost and capacity as much, relatively, as one from 16 to 32.

Memory order: an arm (r, p) needs at least as much device memory as (r', p') when r ≥ r' and
p ≤ p' (a larger adapter on a less pruned model). `dominated_by` uses it to infer infeasibility.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RATIO_ATOL = 1e-6  # two pruning ratios closer than this are the same arm


@dataclass(frozen=True)
class ArmGrid:
    """The ranks × ratios grid, sorted and unique."""

    ranks: tuple[int, ...]
    ratios: tuple[float, ...]

    def __post_init__(self) -> None:
        ranks, ratios = sorted({int(r) for r in self.ranks}), sorted({float(p) for p in self.ratios})
        problems = []
        if not ranks or ranks[0] < 1:
            problems.append(f"`ranks` must be non-empty integers >= 1, got {list(self.ranks)}")
        if not ratios or ratios[0] < 0 or ratios[-1] >= 1:
            problems.append(f"`ratios` must be non-empty values in [0, 1), got {list(self.ratios)}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "ranks", tuple(ranks))
        object.__setattr__(self, "ratios", tuple(ratios))

    @property
    def num_arms(self) -> int:
        return len(self.ranks) * len(self.ratios)

    def rank_of(self, arms: np.ndarray) -> np.ndarray:
        """(n,) int64 rank of each arm index."""
        return np.asarray(self.ranks, dtype=np.int64)[np.asarray(arms) // len(self.ratios)]

    def ratio_of(self, arms: np.ndarray) -> np.ndarray:
        """(n,) float64 pruning ratio of each arm index."""
        return np.asarray(self.ratios, dtype=np.float64)[np.asarray(arms) % len(self.ratios)]

    def arm_ranks(self) -> np.ndarray:
        """(K,) rank of every arm, in arm order."""
        return self.rank_of(np.arange(self.num_arms))

    def arm_ratios(self) -> np.ndarray:
        """(K,) ratio of every arm, in arm order."""
        return self.ratio_of(np.arange(self.num_arms))

    def arm_of(self, ranks: np.ndarray, ratios: np.ndarray) -> np.ndarray:
        """(n,) arm index of each (rank, ratio); ValueError naming the first pair not on the grid."""
        ranks, ratios = np.asarray(ranks), np.asarray(ratios, dtype=np.float64)
        grid_r, grid_p = np.asarray(self.ranks), np.asarray(self.ratios)
        i = np.clip(np.searchsorted(grid_r, ranks), 0, len(grid_r) - 1)
        j = np.abs(ratios[:, None] - grid_p[None, :]).argmin(axis=1)  # (n, P) → (n,)
        off = (grid_r[i] != ranks) | (np.abs(grid_p[j] - ratios) > RATIO_ATOL)
        if off.any():
            k = int(np.flatnonzero(off)[0])
            raise ValueError(
                f"(rank, ratio) = ({ranks[k]}, {ratios[k]}) is not on the arm grid: ranks {list(self.ranks)}, ratios "
                f"{list(self.ratios)}"
            )
        return (i * len(grid_p) + j).astype(np.int64)

    def rank_coord(self, ranks: np.ndarray) -> np.ndarray:
        """u_rank ∈ [0, 1] of each rank (log2 scale, see the module docstring)."""
        lo, hi = np.log2(self.ranks[0]), np.log2(self.ranks[-1])
        return (np.log2(np.asarray(ranks, dtype=np.float64)) - lo) / (hi - lo) if hi > lo else np.zeros(np.shape(ranks))

    def ratio_coord(self, ratios: np.ndarray) -> np.ndarray:
        """u_ratio ∈ [0, 1] of each pruning ratio (linear)."""
        lo, hi = self.ratios[0], self.ratios[-1]
        return (np.asarray(ratios, dtype=np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(np.shape(ratios))

    def rank_at(self, u: np.ndarray, snap: str = "integer") -> np.ndarray:
        """The rank at coordinate u_rank: the nearest integer in [r_min, r_max] ("integer"), or
        the nearest grid rank on the log2 axis ("grid")."""
        lo, hi = np.log2(self.ranks[0]), np.log2(self.ranks[-1])
        log_r = lo + np.asarray(u, dtype=np.float64) * (hi - lo)
        if snap == "grid":
            grid = np.log2(np.asarray(self.ranks, dtype=np.float64))
            return np.asarray(self.ranks, dtype=np.int64)[np.abs(log_r[..., None] - grid).argmin(axis=-1)]
        return np.clip(np.rint(2.0**log_r), self.ranks[0], self.ranks[-1]).astype(np.int64)

    def ratio_at(self, u: np.ndarray) -> np.ndarray:
        """The pruning ratio at coordinate u_ratio."""
        return self.ratios[0] + np.asarray(u, dtype=np.float64) * (self.ratios[-1] - self.ratios[0])


def dominated_by(
    point_ranks: np.ndarray, point_ratios: np.ndarray, ranks: np.ndarray, ratios: np.ndarray
) -> np.ndarray:
    """(n, K) whether candidate point k needs at least the memory of (ranks[i], ratios[i]):
    rank_k ≥ rank_i and ratio_k ≤ ratio_i (the memory order of the module docstring)."""
    return (point_ranks[None, :] >= np.asarray(ranks)[:, None]) & (
        point_ratios[None, :] <= np.asarray(ratios)[:, None] + RATIO_ATOL
    )


def same_point(point_ranks: np.ndarray, point_ratios: np.ndarray, ranks: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """(n, K) whether candidate point k is (ranks[i], ratios[i])."""
    return (point_ranks[None, :] == np.asarray(ranks)[:, None]) & (
        np.abs(point_ratios[None, :] - np.asarray(ratios)[:, None]) <= RATIO_ATOL
    )
