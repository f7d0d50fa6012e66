"""The controller interface, and the bookkeeping every bandit algorithm here shares.

A controller gives each device, each round, an arm = (LoRA rank, pruning ratio), knowing nothing
of the device beforehand, and learns from the rewards (`fedsim.controllers.reward`: progress, less
for holding the round up) which arm serves that device best. The round loop's side of it:

    ranks, ratios = ctrl.choose(devices, round)                  # (n,) int64, (n,) float64
    ctrl.update(devices, ranks, ratios, rewards, feasible)       # what those devices reported
    state = ctrl.state_dict(); other.load_state_dict(state)      # dict[str, np.ndarray]

Candidate points. A controller picks among K candidate points (rank_k, ratio_k): the grid arms
(`fedsim.controllers.arms`) for the grid algorithms, the cells of its partition tree for `sucb`.
Per device and point it keeps

    counts      (N, K) float64   pulls (plain, discounted or windowed, as the algorithm says)
    sums        (N, K) float64   rewards summed over those pulls; mean = sums / counts
    infeasible  (N, K) bool      the point did not fit the device

and one numpy Generator (PCG64, seeded) for sampling and tie-breaks. All of it is arrays, so
10,000 devices are one (N, K) matrix and choose/update are vectorised over devices; algorithms
loop at most over arms, tree levels or device profiles.

Rules every controller keeps:
- Infeasible. A (rank, ratio) reported infeasible (out of memory) is never chosen again for that
  device; with `infer_infeasible` neither is any point needing at least as much memory (rank ≥ r,
  ratio ≤ p). Its reward (the reward module's penalty) is learned as any other, so that shared
  models (linucb) and tree cells (sucb) learn that the region is poor. If every point is
  infeasible for a device (`exhausted`), `choose` returns the cheapest point (smallest rank,
  largest ratio): the round loop should leave that device out.
- Avoided. `choose(avoid=...)` keeps the points a caller rules out for this round only (the
  round loop's pace screen, `pace`) out of `_select`, as if infeasible, unless that would leave
  a device nothing feasible. Nothing is learned or stored from it.
- Ties are broken uniformly at random, with the controller's own Generator.
- Determinism: the same seed and the same calls give the same choices; `state_dict` holds the
  Generator's state as a uint64 array, so a controller loaded from it continues identically.
- `update` takes each device at most once (one report per device per round).

Pooling over profiles (`pool = "profile"`, at most C = `pool_pulls` borrowed). Devices of one
profile (same hardware) behave alike, and a device sampled once every ten rounds would otherwise
explore all run long. The grid and tree algorithms (ucb1, discounted/sliding-window UCB, thompson,
sucb) then score each device's points on effective statistics, its own plus what its peers lend:

    n'_dk = n_dk + m_dk           s'_dk = s_dk + m_dk · S_dk / N_dk
    N_dk, S_dk = the peers' pulls and reward sums of point k (the profile's, less the device's own)
    m_dk = N_dk · C / (N_dk + C)  the pulls' worth the peers lend: all of them while few (N ≪ C),
                                  at most C however many peers have played

i.e. a prior at the peers' mean worth m pulls: the normal-normal shrinkage of a device's mean
toward its profile's, where C is the ratio of the reward noise's variance to the spread of the
devices' true means within a profile (σ²/τ²; C → ∞ pools the profile into one learner, C = 0 learns
alone). What the peers lend depends on how much they have played, not on how many they are: a
profile of 40 rarely sampled devices lends as much as one of 3 that play every round. It is derived
from `counts` and `sums` at each `choose` (`_statistics`), so it adds no state; a device alone in
its profile is scored exactly as without pooling, and its own pulls outweigh the loan once it has
played C times, so pooling fades for a device that differs from its peers. Learning (`counts`,
`sums`) and infeasibility stay per device: a peer's out-of-memory report lowers the pooled mean of
that point but never excludes it for another device (memory differs per device).

Spreading a profile's picks (`pool_spread`, on by default with pooling). Pooled devices of one
profile score alike, so the ones chosen in the same round would all take the same point
("herding"): with per-round normalised rewards, a point that every device of a round played scores
near the top whatever it is worth, and the round says nothing about it. `choose` therefore picks in
waves, the i-th chosen device of every profile in wave i (at most `SPREAD_WAVES` = 8 waves, so
`choose` stays vectorised: more of a profile's devices in one round share waves). After each wave,
each pick counts for the later peers as one more pull of that point (and, in S-UCB, of its
ancestors: `_credit`) at the device's current mean, in full, beside the loan (the peers it stands
for are about to play it): the "hallucinated" observations of batched bandits (Desautels, Krause &
Burdick, "Parallelizing Exploration-Exploitation Tradeoffs in Gaussian Process Bandit
Optimization", JMLR 15, 2014). The mean is unchanged and the confidence bonus shrinks, so a close
second point gets the next device. Nothing of it is stored: `counts` and `sums` hold only real
pulls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.controllers.arms import ArmGrid, dominated_by, same_point

if TYPE_CHECKING:
    from fedsim.config.controller import ControllerConfig

_U64 = (1 << 64) - 1
# `_spread`: a profile's devices in one round pick in at most 8 waves (a round's sample of a profile is rarely more)
SPREAD_WAVES = 8


class Controller(ABC):
    """Per-device arm choice for one fleet: shared state and the choose/update/state contract.
    Subclasses implement `_select` (and extend `_learn`, `_points`, `state_keys` as needed)."""

    name: ClassVar[str] = ""
    state_keys: ClassVar[tuple[str, ...]] = ("counts", "sums", "infeasible")
    uses_rewards: ClassVar[bool] = (
        True  # False: choices ignore rewards (only feasibility counts), so the loop need not score clients
    )

    def __init__(
        self,
        config: ControllerConfig,
        num_devices: int,
        profiles: np.ndarray,
        features: np.ndarray | None = None,
        seed: int = 0,
        profile_names: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.grid = ArmGrid(config.ranks, config.ratios)
        self.num_devices = int(num_devices)
        self.profiles = _check_profiles(profiles, self.num_devices)  # (N,) int64
        self.features = _check_features(features, self.num_devices)  # (N, d) float64
        num_profiles = int(self.profiles.max()) + 1 if self.num_devices else 0
        self.profile_names = (
            tuple(profile_names) if profile_names is not None else tuple(str(g) for g in range(num_profiles))
        )
        if len(self.profile_names) < num_profiles:
            raise ValueError(
                "`profile_names` must name every profile index "
                f"0..{num_profiles - 1}, got {len(self.profile_names)} names"
            )
        self.point_ranks, self.point_ratios = self._points()  # (K,), (K,)
        shape = (self.num_devices, len(self.point_ranks))
        self.counts = np.zeros(shape)
        self.sums = np.zeros(shape)
        self.infeasible = np.zeros(shape, dtype=bool)
        self.rng = np.random.default_rng(seed)
        self._avoid: np.ndarray | None = None  # (n, K) during `choose` only
        self._totals: tuple[np.ndarray, np.ndarray] | None = (
            None  # (P, K) the profiles' counts and sums, during `_spread` only (they do not change within a choose)
        )
        self._batch: tuple[np.ndarray, np.ndarray] | None = (
            None  # (P, K) counts and sums of this round's earlier picks per profile, during `_spread` only
        )
        self._cheapest = int(np.lexsort((-self.point_ratios, self.point_ranks))[0])
        # Pooling: devices sorted by profile, the start of each present profile's run, and whether
        # any device has a peer to borrow from.
        self._pool_order = np.argsort(self.profiles, kind="stable")
        ids, self._pool_starts, sizes = np.unique(
            self.profiles[self._pool_order], return_index=True, return_counts=True
        )
        self._pool_row = np.zeros(num_profiles, dtype=np.int64)
        self._pool_row[ids] = np.arange(len(ids))  # profile index → row of the pooled totals
        self._pooled = config.pool == "profile" and config.pool_pulls > 0 and bool((sizes > 1).any())

    # --- the interface --------------------------------------------------------------------

    def choose(
        self, devices: np.ndarray, round: int, avoid: np.ndarray | None = None, exploit: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ranks (n,) int64, ratios (n,) float64) for `devices` (n,) in round `round`; `avoid`
        (n, K) bool: points not to choose this round (predicted too slow, `pace`), ignored for a
        device where it would leave no feasible point. Nothing is learned from it. `exploit`:
        explore no more, each device plays its best point so far (`_exploit`; the run's last
        rounds, `commit_rounds`)."""
        devices = self._check_devices(devices)
        self._avoid = self._check_avoid(devices, avoid)
        try:
            if exploit and self.uses_rewards:
                points = self._exploit(devices, round)
            elif self._pooled and self.config.pool_spread:
                points = self._spread(devices, round)
            else:
                points = self._select(devices, round)
        finally:
            self._avoid, self._totals, self._batch = None, None, None
        points = np.where(self.exhausted(devices), self._cheapest, points)
        return self.point_ranks[points].copy(), self.point_ratios[points].copy()

    def update(
        self, devices: np.ndarray, ranks: np.ndarray, ratios: np.ndarray, rewards: np.ndarray, feasible: np.ndarray
    ) -> None:
        """Learn from one round's reports: each device's (rank, ratio), reward and feasibility."""
        devices = self._check_devices(devices, unique=True)
        ranks, ratios, rewards, feasible = _aligned(
            len(devices),
            ranks=(ranks, np.int64),
            ratios=(ratios, np.float64),
            rewards=(rewards, np.float64),
            feasible=(feasible, bool),
        )
        if not np.isfinite(rewards).all():
            raise ValueError(f"`rewards` must be finite, got {rewards[~np.isfinite(rewards)][:3]}")
        points = self._locate(devices, ranks, ratios)
        self._learn(devices, points, rewards)
        bad = ~feasible
        if bad.any():
            match = dominated_by if self.config.infer_infeasible else same_point
            rows = devices[bad]
            self.infeasible[rows] |= match(self.point_ranks, self.point_ratios, ranks[bad], ratios[bad])

    def exhausted(self, devices: np.ndarray) -> np.ndarray:
        """(n,) whether no point fits the device any more (choose then returns the cheapest)."""
        return self.infeasible[np.asarray(devices)].all(axis=1)

    def means(self, devices: np.ndarray) -> np.ndarray:
        """(n, K) mean reward of each point (0 where never pulled)."""
        counts = self.counts[np.asarray(devices)]
        return np.divide(self.sums[np.asarray(devices)], counts, out=np.zeros_like(counts), where=counts > 0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every learned array, the Generator's state and the controller's name, as copies."""
        state = {key: np.array(getattr(self, key), copy=True) for key in self.state_keys}
        state["rng"] = _rng_to_array(self.rng)
        state["controller"] = np.array(self.name)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state_dict()` of a controller built with the same config and fleet."""
        if problems := self._state_problems(state):
            raise ValueError("cannot load controller state:\n" + "\n".join(f"  - {p}" for p in problems))
        for key in self.state_keys:
            setattr(self, key, np.array(state[key], dtype=getattr(self, key).dtype, copy=True))
        self.rng = _rng_from_array(np.asarray(state["rng"]))
        self._after_load()

    # --- what algorithms implement --------------------------------------------------------

    @abstractmethod
    def _select(self, devices: np.ndarray, round: int) -> np.ndarray:
        """(n,) candidate point index per device, never an infeasible one where a feasible exists."""

    def _exploit(self, devices: np.ndarray, round: int) -> np.ndarray:
        """(n,) the choosable point with the best mean reward (on `_statistics`: pooled with
        `pool`), ties at random; a device that has played no choosable point explores (`_select`)."""
        counts, sums = self._statistics(devices)
        played = (counts > 0) & ~self._blocked(devices)
        mean = np.divide(sums, counts, out=np.full(counts.shape, -np.inf), where=played)
        points, avoid, known = np.zeros(len(devices), dtype=np.int64), self._avoid, played.any(axis=1)
        for rows in (known, ~known):  # each on its rows' share of `avoid`
            if rows.any():
                self._avoid = None if avoid is None else avoid[rows]
                points[rows] = (
                    self._pick(devices[rows], mean[rows]) if rows is known else self._select(devices[rows], round)
                )
        self._avoid = avoid
        return points

    def _learn(self, devices: np.ndarray, points: np.ndarray, rewards: np.ndarray) -> None:
        """Plain statistics: one more pull of `points` with `rewards` (devices are unique)."""
        self.counts[devices, points] += 1.0
        self.sums[devices, points] += rewards

    def _credit(self, points: np.ndarray) -> np.ndarray:
        """(n, K) the statistics one pull of each point adds to (1 where it counts): the point."""
        credit = np.zeros((len(points), len(self.point_ranks)))
        credit[np.arange(len(points)), points] = 1.0
        return credit

    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        """The candidate points (ranks (K,), ratios (K,)): the grid arms, in arm order."""
        return self.grid.arm_ranks(), self.grid.arm_ratios()

    def _locate(self, devices: np.ndarray, ranks: np.ndarray, ratios: np.ndarray) -> np.ndarray:
        """(n,) point index of each reported (rank, ratio)."""
        return self.grid.arm_of(ranks, ratios)

    def _after_load(self) -> None:
        """Recompute what is derived from the state (caches), after `load_state_dict`."""
        return None

    # --- helpers --------------------------------------------------------------------------

    def _statistics(self, devices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts, sums) (n, K) the algorithm scores `devices` on: their own, or with
        `pool = "profile"` plus what their peers lend (the module docstring's n', s') and, within
        `_spread`, the peers' picks earlier in this round."""
        counts, sums = self.counts[devices], self.sums[devices]
        if not self._pooled:
            return counts, sums
        rows, cap = self._pool_row[self.profiles[devices]], self.config.pool_pulls
        total_counts, total_sums = self._totals if self._totals is not None else self._profile_totals()
        peer_counts, peer_sums = total_counts[rows] - counts, total_sums[rows] - sums
        peer_counts = np.maximum(peer_counts, 0.0)  # float round-off of totals less one's own
        lent = peer_counts * cap / (peer_counts + cap)
        peer_mean = np.divide(peer_sums, peer_counts, out=np.zeros_like(peer_sums), where=peer_counts > 0)
        counts, sums = counts + lent, sums + lent * peer_mean
        if self._batch is not None:
            batch_counts, batch_sums = self._batch
            counts, sums = counts + batch_counts[rows], sums + batch_sums[rows]
        return counts, sums

    def _profile_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, sums) (P, K) summed over each profile's devices (rows: `_pool_row`)."""
        order, starts = self._pool_order, self._pool_starts
        return np.add.reduceat(self.counts[order], starts, axis=0), np.add.reduceat(self.sums[order], starts, axis=0)

    def _spread(self, devices: np.ndarray, round: int) -> np.ndarray:
        """`_select` in waves, the i-th chosen device of each profile in wave i, each wave seeing
        the earlier waves' picks of its peers as pulls at their current mean (module docstring)."""
        rows = self._pool_row[self.profiles[devices]]  # (n,) the device's profile, as a pool row
        order = np.argsort(rows, kind="stable")
        first = np.r_[0, np.flatnonzero(np.diff(rows[order])) + 1]  # where each profile's run starts
        runs = np.diff(np.r_[first, len(devices)])  # how many of each profile were chosen
        size, position = np.repeat(runs, runs), np.arange(len(devices)) - np.repeat(first, runs)
        wave = np.empty(len(devices), dtype=np.int64)
        wave[order] = position * np.minimum(SPREAD_WAVES, size) // size  # more than SPREAD_WAVES: near-equal waves
        self._totals = self._profile_totals()  # once: every wave's `_statistics` reads them
        shape = (len(self._pool_starts), len(self.point_ranks))
        batch_counts, batch_sums = self._batch = (
            np.zeros(shape),
            np.zeros(shape),
        )  # each wave's picks are added to them
        avoid, points = self._avoid, np.zeros(len(devices), dtype=np.int64)
        for w in range(int(wave.max(initial=-1)) + 1):  # at most SPREAD_WAVES, whatever the number of devices
            now = np.flatnonzero(wave == w)
            self._avoid = None if avoid is None else avoid[now]
            points[now] = self._select(devices[now], round)
            counts, sums = self._statistics(devices[now])
            pulls = counts.sum(axis=1, keepdims=True)
            overall = np.divide(sums.sum(axis=1, keepdims=True), pulls, out=np.zeros_like(pulls), where=pulls > 0)
            mean = np.divide(
                sums, counts, out=np.broadcast_to(overall, sums.shape).copy(), where=counts > 0
            )  # never pulled: the device's overall mean
            credit = self._credit(points[now])
            np.add.at(batch_counts, rows[now], credit)  # in place: the later waves' `_statistics` see them
            np.add.at(batch_sums, rows[now], credit * mean)
        return points

    def _blocked(self, devices: np.ndarray) -> np.ndarray:
        """(n, K) points `_select` must not choose: infeasible, or avoided this round."""
        blocked = self.infeasible[devices]
        return blocked if self._avoid is None else blocked | self._avoid

    def _check_avoid(self, devices: np.ndarray, avoid: np.ndarray | None) -> np.ndarray | None:
        if avoid is None:
            return None
        avoid = np.asarray(avoid)
        if avoid.shape != (len(devices), len(self.point_ranks)) or avoid.dtype != bool:
            raise ValueError(
                f"`avoid` must be a bool array of shape ({len(devices)}, "
                f"{len(self.point_ranks)}), got {avoid.dtype} {avoid.shape}"
            )
        infeasible = self.infeasible[devices]
        return avoid & ~(infeasible | avoid).all(axis=1, keepdims=True)

    def _pick(self, devices: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """(n,) argmax of scores (n, K) over each device's choosable points, ties at random."""
        scores = np.where(self._blocked(devices), -np.inf, scores)
        best = scores >= scores.max(axis=1, keepdims=True)
        return np.where(best, self.rng.random(scores.shape), -1.0).argmax(axis=1)

    def _check_devices(self, devices: np.ndarray, unique: bool = False) -> np.ndarray:
        devices = np.asarray(devices)
        if devices.ndim != 1 or (devices.size and devices.dtype.kind not in "iu"):
            raise ValueError(
                f"`devices` must be a 1-D array of device indices, got shape {devices.shape}, dtype {devices.dtype}"
            )
        devices = devices.astype(np.int64)
        if devices.size and (devices.min() < 0 or devices.max() >= self.num_devices):
            raise ValueError(
                f"`devices` must be in [0, {self.num_devices}), got values in [{devices.min()}, {devices.max()}]"
            )
        if unique and np.unique(devices).size != devices.size:
            raise ValueError("`devices` must not repeat a device in one update (one report per device per round)")
        return devices

    def _state_problems(self, state: Mapping[str, np.ndarray]) -> list[str]:
        expected = {*self.state_keys, "rng", "controller"}
        problems = [f"missing key {k!r}" for k in sorted(expected - set(state))]
        problems += [f"unexpected key {k!r}" for k in sorted(set(state) - expected)]
        if "controller" in state and str(state["controller"]) != self.name:
            problems.append(f"state of controller {str(state['controller'])!r} cannot load into {self.name!r}")
        for key in self.state_keys:
            if key in state:
                mine, theirs = getattr(self, key), np.asarray(state[key])
                if theirs.shape != mine.shape or theirs.dtype.kind != mine.dtype.kind:
                    problems.append(
                        f"{key!r} must have shape {mine.shape} and dtype kind {mine.dtype.kind!r}, got "
                        f"{theirs.shape}, {theirs.dtype}"
                    )
        if "rng" in state and np.asarray(state["rng"]).shape != (6,):
            problems.append(f"'rng' must have shape (6,), got {np.asarray(state['rng']).shape}")
        return problems


def _check_profiles(profiles: np.ndarray, num_devices: int) -> np.ndarray:
    profiles = np.asarray(profiles)
    if profiles.shape != (num_devices,) or (num_devices and (profiles.dtype.kind not in "iu" or profiles.min() < 0)):
        raise ValueError(
            f"`profiles` must be ({num_devices},) non-negative profile "
            f"indices, got shape {profiles.shape}, dtype {profiles.dtype}"
        )
    return profiles.astype(np.int64)


def _check_features(features: np.ndarray | None, num_devices: int) -> np.ndarray:
    if features is None:
        return np.ones((num_devices, 1))
    features = np.asarray(features, dtype=np.float64)
    if (
        features.ndim != 2
        or features.shape[0] != num_devices
        or features.shape[1] < 1
        or not np.isfinite(features).all()
    ):
        raise ValueError(
            f"`features` must be a finite ({num_devices}, d) array with d >= 1, got shape {features.shape}"
        )
    return features


def _aligned(n: int, **arrays: tuple[np.ndarray, type]) -> list[np.ndarray]:
    """Each array as its dtype, checked to be (n,) like `devices`."""
    out: list[np.ndarray] = []
    for name, (value, dtype) in arrays.items():
        value = np.asarray(value)
        if value.shape != (n,):
            raise ValueError(f"`{name}` must be aligned with devices, shape ({n},), got {value.shape}")
        out.append(value.astype(dtype))
    return out


def _rng_to_array(rng: np.random.Generator) -> np.ndarray:
    """PCG64 state → uint64[6]: state (hi, lo), increment (hi, lo), has_uint32, uinteger."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise TypeError(f"controllers use PCG64, got {st['bit_generator']}")
    s, inc = st["state"]["state"], st["state"]["inc"]
    return np.array([s >> 64, s & _U64, inc >> 64, inc & _U64, st["has_uint32"], st["uinteger"]], dtype=np.uint64)


def _rng_from_array(a: np.ndarray) -> np.random.Generator:
    hi_s, lo_s, hi_i, lo_i, has, uint = (int(x) for x in a.astype(np.uint64))
    bit_gen = np.random.PCG64()
    bit_gen.state = {
        "bit_generator": "PCG64",
        "state": {"state": (hi_s << 64) | lo_s, "inc": (hi_i << 64) | lo_i},
        "has_uint32": has,
        "uinteger": uint,
    }
    return np.random.Generator(bit_gen)
