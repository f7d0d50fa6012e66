"""S-UCB, FedSpine's default: a smooth UCB per device over the continuous (ratio, rank) box.

FedSpine (Yao, Xu, Xu, Liao & Xie, "Efficient Deployment of Large Language Models on
Resource-constrained Devices", arXiv:2501.02438, 2025) assigns each device its pruning ratio and
LoRA rank with an online multi-armed bandit that needs no prior knowledge of the device. The rule
below is fedsim's design for the setting the paper's abstract describes, not a transcription of the
paper's algorithm. Reward and arms are continuous and smooth (a slightly higher ratio or rank
changes the reward slightly), so instead of a fixed grid it refines a partition of the box where
the rewards are high: HOO (Bubeck, Munos, Stoltz & Szepesvári, "X-Armed Bandits", JMLR 12, 2011,
arXiv:1001.4475), in the spirit of the zooming algorithm (Kleinberg, Slivkins & Upfal, "Multi-Armed
Bandits in Metric Spaces", STOC 2008, arXiv:0809.4882).

The box is [p_min, p_max] × [r_min, r_max] of the configured ratios and ranks, in the unit
coordinates of `arms` (rank on a log2 axis). A binary tree of depth D (`sucb_depth`) partitions it:
the root is the box, a node at depth h halves its cell along the ratio axis if h is even, the rank
axis if h is odd, so the leaves form an m_p × m_r lattice of cells (m_p = 2^⌈D/2⌉ along ratio,
m_r = 2^⌊D/2⌋ along rank). Points: leaf cell j of an axis, [j/m, (j+1)/m], plays u = j/(m − 1)
(u = 1/2 when m = 1), a point inside its cell, as HOO allows any, chosen so that the lattice
reaches the box's edges (no pruning, the largest rank); an internal node plays the point of its
middle leaf (the lower middle along each axis). Every point played is thus a leaf's point, and
the best leaf, where the tree converges, is the best point the controller can play. The rank is
snapped to the nearest integer in [r_min, r_max] (`sucb_snap = "grid"`: to the nearest configured
rank). With the default D = 4 and the default ranks and ratios the leaves are exactly the 4 × 4
grid; a deeper tree refines it (D = 6: 8 ratios × 8 ranks).

Rule, for device d after n pulls, with T_{h,i} and μ̂_{h,i} the pulls and mean reward of the pulls
that went through node (h, i):

    U_{h,i} = μ̂_{h,i} + c·√(2 ln n / T_{h,i}) + ν·ρ^h                (+∞ if T_{h,i} = 0)
    B_{h,i} = min(U_{h,i}, max(B_{h+1,2i}, B_{h+1,2i+1}))             (B = U at depth D)
    play: from the root, follow the child with the larger B (ties at random) until a node not
          yet played (T = 0) or depth D; play that node's point; credit its reward to every
          node on the path (T += 1, μ̂ updated).

c = `ucb_c`, ν = `sucb_nu` (how much the reward may vary inside the root cell), ρ = `sucb_rho`
(2^(−1/2): a cell's diameter halves every two levels). Each pull adds at most one node, so the
tree grows where B is high, refining the best region and leaving the poor ones coarse. Unlike
HOO's infinite tree, depth D is fixed: each device holds all 2^(D+1) − 1 nodes as columns of the
shared (N, K) arrays, and once the tree is expanded around the best leaf the depth-D leaves are
replayed like the arms of UCB1.

Infeasible points (`base`): a node whose point is known not to fit is skipped: an unplayed
infeasible node passes the descent to its children (B = max of theirs), a played one counts only
through its children; a played feasible node whose children are all infeasible is replayed as a
leaf. So the descent always ends on a feasible point while one exists. Points avoided for the
round (`choose(avoid=...)`) are skipped the same way.

The client does nothing special: it trains at the (rank, ratio) it is sent.
"""

from __future__ import annotations

import numpy as np

from fedsim.controllers.arms import RATIO_ATOL
from fedsim.controllers.base import Controller


class SmoothUCB(Controller):
    """HOO over the (ratio, rank) box, one fixed-depth tree per device, all devices in one array."""

    name = "sucb"
    state_keys = (*Controller.state_keys, "pending")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending = np.full(self.num_devices, -1, dtype=np.int64)  # (N,) node chosen last, -1 = none
        self._smooth = self.config.sucb_nu * self.config.sucb_rho**self._depth  # (M,) ν·ρ^h

    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        depth = self.config.sucb_depth
        m = 2 ** (depth + 1) - 1
        lo, hi = np.zeros((m, 2)), np.ones((m, 2))  # cell bounds in (u_ratio, u_rank)
        self._depth = np.floor(np.log2(np.arange(m) + 1)).astype(np.int64)  # (M,)
        for k in range(2**depth - 1):  # internal nodes, once at construction
            axis = self._depth[k] % 2
            mid = 0.5 * (lo[k, axis] + hi[k, axis])
            for child, side in ((2 * k + 1, hi), (2 * k + 2, lo)):
                lo[child], hi[child] = lo[k], hi[k]
                side[child, axis] = mid
        self._lo, self._hi = lo, hi
        m = 2 ** np.array([(depth + 1) // 2, depth // 2])  # leaf cells along (ratio, rank)
        first, last = np.rint(lo * m), np.rint(hi * m) - 1  # (M, 2) leaf indices a node's cell spans
        middle = (first + last) // 2
        u = np.where(m > 1, middle / np.maximum(m - 1, 1), 0.5)  # (M, 2) the middle leaf's point
        return self.grid.rank_at(u[:, 1], self.config.sucb_snap), np.round(
            self.grid.ratio_at(u[:, 0]), 9
        )  # 0.6/3 → 0.2

    def _b_values(self, counts: np.ndarray, sums: np.ndarray, feasible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """B (n, M) of every node and `below` (n, M) = max B of its children (−∞ at the leaves)."""
        depth = self.config.sucb_depth
        n_pulls = np.maximum(counts[:, :1], 1.0)  # (n, 1) the root's count is the device's pulls
        with np.errstate(divide="ignore", invalid="ignore"):
            u = sums / counts + self.config.ucb_c * np.sqrt(2.0 * np.log(n_pulls) / counts) + self._smooth
        u = np.where(counts > 0, u, np.inf)  # (n, M)
        b, below = np.full(u.shape, -np.inf), np.full(u.shape, -np.inf)
        first = 2**depth - 1
        b[:, first:] = np.where(feasible[:, first:], u[:, first:], -np.inf)
        for h in range(depth - 1, -1, -1):  # a loop over tree levels
            level, children = slice(2**h - 1, 2 ** (h + 1) - 1), 2 ** (h + 1) - 1
            best_child = np.maximum(b[:, children : 2 ** (h + 2) - 1 : 2], b[:, children + 1 : 2 ** (h + 2) - 1 : 2])
            below[:, level] = best_child
            f, uh = feasible[:, level], u[:, level]
            played = np.where(best_child == -np.inf, np.where(f, uh, -np.inf), np.minimum(uh, best_child))
            b[:, level] = np.where(counts[:, level] > 0, played, np.where(f, np.inf, best_child))
        return b, below

    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        (counts, sums), feasible = self._statistics(devices), ~self._blocked(devices)
        b, below = self._b_values(counts, sums, feasible)
        rows, node = np.arange(len(devices)), np.zeros(len(devices), dtype=np.int64)
        descending = np.ones(len(devices), dtype=bool)
        for _ in range(self.config.sucb_depth):  # a loop over tree levels
            new = (counts[rows, node] == 0) & feasible[rows, node]
            descending &= ~new & (below[rows, node] > -np.inf)
            left, right = 2 * node + 1, 2 * node + 2
            b_left, b_right = b[rows, left], b[rows, right]
            go_right = (b_right > b_left) | ((b_right == b_left) & (self.rng.random(len(devices)) < 0.5))
            node = np.where(descending, np.where(go_right, right, left), node)
        self.pending[devices] = node
        return node

    def _exploit(self, devices: np.ndarray, round: int) -> np.ndarray:
        """The node with the best mean reward (its own pulls and its subtree's: a node beats its
        children only if its own point did better than they), credited as played."""
        node = super()._exploit(devices, round)
        self.pending[devices] = node
        return node

    def _locate(self, devices: np.ndarray, ranks: np.ndarray, ratios: np.ndarray) -> np.ndarray:
        """The node chosen for the device if it played that node's point, else the depth-D cell
        that contains the reported point (clipped into the box)."""
        pending = self.pending[devices]
        known = pending >= 0
        node = np.where(known, pending, 0)
        known &= (self.point_ranks[node] == ranks) & (np.abs(self.point_ratios[node] - ratios) <= RATIO_ATOL)
        return np.where(known, pending, self._leaf_of(ranks, ratios))

    def _credit(self, points: np.ndarray) -> np.ndarray:
        """(n, M) a pull of node `points` counts for the node and every ancestor."""
        credit, node = np.zeros((len(points), len(self.point_ranks))), points.copy()
        for _ in range(self.config.sucb_depth + 1):
            live = node >= 0
            credit[np.flatnonzero(live), node[live]] = 1.0
            node = np.where(node > 0, (node - 1) // 2, -1)
        return credit

    def _leaf_of(self, ranks: np.ndarray, ratios: np.ndarray) -> np.ndarray:
        coords = np.clip(
            np.stack([self.grid.ratio_coord(ratios), self.grid.rank_coord(ranks)], axis=1), 0.0, 1.0
        )  # (n, 2)
        rows, node = np.arange(len(ranks)), np.zeros(len(ranks), dtype=np.int64)
        for h in range(self.config.sucb_depth):
            axis = h % 2
            mid = 0.5 * (self._lo[node, axis] + self._hi[node, axis])
            node = np.where(coords[rows, axis] >= mid, 2 * node + 2, 2 * node + 1)
        return node

    def _learn(self, devices: np.ndarray, points: np.ndarray, rewards: np.ndarray) -> None:
        credit = self._credit(points)  # the path, leaf to root
        self.counts[devices] += credit
        self.sums[devices] += credit * rewards[:, None]
        self.pending[devices] = -1
