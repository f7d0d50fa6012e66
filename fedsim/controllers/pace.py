"""Each device's pace, learned from its own reports, to price the arms it has not tried.

A client's round time is compute plus communication. The server's cost model gives each arm k its
FLOPs per round F_k (`fedsim.fleet.costs` at the arm's rank, on the model cut to its ratio) and the LoRA
parameters P_k that travel (both directions scale with them: ComPEFT keeps a fixed share of them,
the downlink sends the client's rank). From a round in which device d played arm j and reported
compute c and communication m seconds (the first report sets the rate, each later one moves it
halfway):

    a_d ← (a_d + c / F_j) / 2     seconds per FLOP
    b_d ← (b_d + m / P_j) / 2     seconds per LoRA parameter
    t̂_dk = a_d · F_k + b_d · P_k  the arm's predicted round time on device d

A device not yet seen takes its profile's median a and b over the devices seen (a device says what
hardware it is, nothing more; `fedsim.server.control`); with no peer seen either its times are unknown
(NaN).

Screening (`hopeless`, on the times `Pace.predict` gives): an arm is not tried on device d this
round when

    t̂_dk > s · max(T, min_k t̂_dk)

with s = `screen_slack` and T the caller's threshold: the round's deadline if it has one, else the
lesser of the fastest round so far (the reward's threshold) and the fastest round the pace
predicts for this round's devices, max_d min_k t̂_dk (`fastest_round`). The max keeps a device that
cannot reach T at all choosing among its own fastest arms. Screening reaches the controller only
through `choose(avoid=...)`: nothing is marked infeasible, and an arm screened now is tried again
when T or the device's pace changes.

A device of unknown pace cannot be priced, but how much slower one of its arms can be than its
fastest is bounded: t_k ≤ max(F_k / min F, P_k / min P) · min_j t_j (`worst_ratio`), so the arms
whose bound exceeds s wait until the device, or a peer of its profile, has reported once.

Vectorised over devices; the state is two (N,) arrays, saved with the controller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Pace:
    """Per device, seconds per FLOP of training and seconds per LoRA parameter sent (NaN: not seen)."""

    profiles: np.ndarray  # (N,) profile index of each device
    compute: np.ndarray  # (N,) a_d
    comm: np.ndarray  # (N,) b_d

    @classmethod
    def unknown(cls, profiles: np.ndarray) -> Pace:
        n = len(profiles)
        return cls(np.asarray(profiles, dtype=np.int64), np.full(n, np.nan), np.full(n, np.nan))

    def observe(
        self, devices: np.ndarray, flops: np.ndarray, params: np.ndarray, compute_s: np.ndarray, comm_s: np.ndarray
    ) -> None:
        """Learn from devices (n,) that played arms of `flops` and `params` (n,) and took
        `compute_s` and `comm_s` (n,) seconds. Entries that are not finite and positive are skipped."""
        for rate, seconds, units in ((self.compute, compute_s, flops), (self.comm, comm_s, params)):
            seconds, units = np.asarray(seconds, dtype=float), np.asarray(units, dtype=float)
            good = np.isfinite(seconds) & (seconds >= 0) & np.isfinite(units) & (units > 0)
            d, new = np.asarray(devices)[good], seconds[good] / units[good]
            rate[d] = np.where(np.isnan(rate[d]), new, 0.5 * rate[d] + 0.5 * new)

    def predict(self, devices: np.ndarray, flops: np.ndarray, params: np.ndarray) -> np.ndarray:
        """(n, K) predicted round time of each arm (`flops`, `params`: (K,) the same arms for
        every device, or (n, K) per device) on each device; NaN where neither the device nor a
        peer of its profile has been seen."""
        devices = np.asarray(devices, dtype=np.int64)
        a, b = self._rates(self.compute, devices), self._rates(self.comm, devices)
        return a[:, None] * np.atleast_2d(np.asarray(flops, dtype=float)) + b[:, None] * np.atleast_2d(
            np.asarray(params, dtype=float)
        )

    def state(self) -> np.ndarray:
        """(2, N): compute and comm rates, for the controller's checkpoint."""
        return np.stack([self.compute, self.comm])

    def load(self, state: np.ndarray) -> None:
        state = np.asarray(state, dtype=float)
        if state.shape != (2, len(self.profiles)):
            raise ValueError(f"cannot load pace: expected shape (2, {len(self.profiles)}), got {state.shape}")
        self.compute, self.comm = state[0].copy(), state[1].copy()

    def _rates(self, rate: np.ndarray, devices: np.ndarray) -> np.ndarray:
        """The devices' own rates, else their profile's median over seen devices (a loop over profiles)."""
        out = rate[devices].copy()
        for g in np.unique(self.profiles[devices[np.isnan(out)]]):
            peers = rate[(self.profiles == g) & ~np.isnan(rate)]
            if peers.size:
                out[np.isnan(out) & (self.profiles[devices] == g)] = np.median(peers)
        return out


def fastest_round(times: np.ndarray) -> float:
    """The round time if each device played its fastest arm: max_d min_k t̂_dk over the rows of
    `times` (n, K) whose pace is known (inf if none is)."""
    fastest = times[np.isfinite(times).all(axis=1)].min(axis=1, initial=np.inf)
    return float(fastest.max()) if fastest.size else float("inf")


def worst_ratio(flops: np.ndarray, params: np.ndarray) -> np.ndarray:
    """(K,) the most each arm can take over a device's fastest arm, whatever the device's pace:
    t_k = a·F_k + b·P_k ≤ max(F_k / min F, P_k / min P) · (a·min F + b·min P) ≤ that × min_j t_j."""
    flops, params = np.asarray(flops, dtype=float), np.asarray(params, dtype=float)
    return np.maximum(flops / flops.min(), params / params.min())


def hopeless(times: np.ndarray, threshold_s: float, slack: float, worst: np.ndarray | None = None) -> np.ndarray:
    """(n, K) arms whose predicted time (`times`, (n, K)) is more than `slack` × max(threshold, the
    device's fastest arm): not worth a try this round. A device of unknown pace screens the arms
    that could take more than `slack` × its fastest (`worst`, (K,), from `worst_ratio`; none without it)."""
    known = np.isfinite(times).all(axis=1, keepdims=True)
    limit = slack * np.maximum(threshold_s, np.where(known, times, np.inf).min(axis=1, keepdims=True))
    blind = ~known & (np.asarray(worst)[None, :] > slack) if worst is not None else np.zeros_like(known)
    return (known & (times > limit)) | blind
