"""Energy on the simulated clock: what a round costs each client in joules, and its battery.

Per client k of a round, with its device's figures (`fedsim.config.devices`):

    E_k = P_train,k · compute_k + e_up,k · up_k / 10^6 + e_down,k · down_k / 10^6 + P_idle,k · wait_k

compute_k is its training seconds on the clock (`fedsim.fleet.clock`), up_k / down_k the bytes it
sent and received, e_up / e_down its radio's joules per MB (10^6 bytes), and wait_k = max(0, T − finish_k)
the seconds it stays online, idle, until the round of duration T ends (`idle_wait`). A figure its
profile does not give is NaN, so is its E_k, and so is a total over it: unknown, not zero.

A client receives, trains and sends one after the other, down_k + compute_k + up_k = finish_k seconds
(`fedsim.fleet.clock`). One the round gives up on (a straggler, finish_k > T) is cut at T, when the
server may address it again: it is billed what it got through by then (`cut_at`),

    compute_k ← clip(T − down_k, 0, compute_k),   bytes_k ← bytes_k · clip(elapsed / seconds, 0, 1)

for each transfer (elapsed: the seconds of the round left when it began), and wait_k = 0.

Batteries (`Batteries`). Client i has capacity C_i joules (NaN: mains-powered), charge c_i(t),
threshold θ_i and daily charging windows w of power P_w over [a_w, b_w) seconds of the day,
D = 86 400 s, t = 0 being midnight. Between drains the charge rises by the time spent in windows:

    c_i(t₁) = min(C_i, c_i(t₀) + Σ_w P_w · (F_w(t₁) − F_w(t₀))),
    F_w(t) = ⌊t / D⌋ · (b_w − a_w) + clip(t mod D − a_w, 0, b_w − a_w)      (seconds in window w up to t)

A drain of E joules at t charges up to t first, then c_i ← max(0, c_i − E). Client i may take part
at t iff it has no battery or c_i(t) > θ_i · C_i; below that it waits for a window to charge it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedsim.config.devices import DAY_H, Battery

DAY_S = DAY_H * 3600.0
WH = 3600.0  # joules per watt-hour
MB = 1e6  # bytes per MB, as the radio figures count them


def idle_wait(finish_s: npt.ArrayLike, round_s: float) -> np.ndarray:
    """wait_k = max(0, T − finish_k): seconds each client idles until the round of `round_s` ends."""
    return np.maximum(float(round_s) - np.asarray(finish_s, dtype=np.float64), 0.0)


def cut_at(
    end_s: npt.ArrayLike, down_s: npt.ArrayLike, compute_s: npt.ArrayLike, up_s: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each client got through by `end_s` seconds into its round, receiving for `down_s`, then
    training for `compute_s`, then sending for `up_s` (module docstring): (seconds trained, share of
    its download, share of its upload), all of each for a client done by then. Elementwise."""
    end, down, compute, up = (np.asarray(v, dtype=np.float64) for v in (end_s, down_s, compute_s, up_s))
    trained = np.clip(end - down, 0.0, compute)
    return trained, _share(end, down), _share(end - down - compute, up)


def _share(elapsed: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """clip(elapsed / seconds, 0, 1); a transfer of 0 seconds is done once its turn comes (elapsed ≥ 0)."""
    elapsed, seconds = np.broadcast_arrays(elapsed, seconds)
    done = np.divide(elapsed, seconds, out=np.where(elapsed >= 0, 1.0, 0.0), where=seconds > 0)
    return np.clip(done, 0.0, 1.0)


def client_energy(
    compute_s: npt.ArrayLike,
    bytes_up: npt.ArrayLike,
    bytes_down: npt.ArrayLike,
    wait_s: npt.ArrayLike,
    train_watts: npt.ArrayLike,
    idle_watts: npt.ArrayLike,
    j_per_mb_up: npt.ArrayLike,
    j_per_mb_down: npt.ArrayLike,
) -> np.ndarray:
    """E_k = P_train·compute + e_up·up/10^6 + e_down·down/10^6 + P_idle·wait, elementwise, in joules
    (module docstring); NaN where a figure is NaN. ValueError for negative seconds or bytes."""
    times = {"compute_s": compute_s, "bytes_up": bytes_up, "bytes_down": bytes_down, "wait_s": wait_s}
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in times.items()}
    bad = [f"`{name}` must be >= 0, got min {a.min()}" for name, a in arrays.items() if a.size and a.min() < 0]
    if bad:
        raise ValueError("; ".join(bad))
    return (
        np.asarray(train_watts, dtype=np.float64) * arrays["compute_s"]
        + np.asarray(j_per_mb_up, dtype=np.float64) * arrays["bytes_up"] / MB
        + np.asarray(j_per_mb_down, dtype=np.float64) * arrays["bytes_down"] / MB
        + np.asarray(idle_watts, dtype=np.float64) * arrays["wait_s"]
    )


def round_energy(energy_j: npt.ArrayLike) -> float:
    """The fleet's energy for a round: Σ_k E_k (NaN when any E_k is unknown; 0 for no client)."""
    return float(np.sum(np.asarray(energy_j, dtype=np.float64)))


@dataclass(frozen=True)
class BatterySpec:
    """The fleet's batteries as per-client arrays; W is the most window segments any client has
    (a window over midnight is two), shorter rows padded with empty 0 W segments."""

    capacity_j: np.ndarray  # (N,) C_i, NaN: no battery
    initial: np.ndarray  # (N,) charge at t = 0, share of capacity
    threshold: np.ndarray  # (N,) θ_i
    window_start_s: np.ndarray  # (N, W) a_w, seconds into the day
    window_end_s: np.ndarray  # (N, W) b_w > a_w (padding: a_w = b_w = 0)
    window_watts: np.ndarray  # (N, W) P_w (padding: 0)

    @property
    def size(self) -> int:
        return len(self.capacity_j)

    @classmethod
    def of(cls, batteries: Sequence[Battery | None]) -> BatterySpec:
        """One entry per client, in client order (None: mains-powered); equal batteries are read once."""
        distinct: dict[Battery | None, int] = {}
        group = np.fromiter((distinct.setdefault(b, len(distinct)) for b in batteries), np.int64, len(batteries))
        specs = list(distinct)
        segments = [[(a, b, w.watts) for w in s.charging for a, b in w.segments()] if s else [] for s in specs]
        width = max((len(s) for s in segments), default=0)
        windows = np.zeros((len(specs), width, 3))
        for g, rows in enumerate(segments):
            windows[g, : len(rows)] = np.reshape(rows, (len(rows), 3))
        column = lambda value: np.array([value(s) if s else np.nan for s in specs] or [np.nan])[group]  # noqa: E731
        return cls(
            capacity_j=column(lambda s: s.capacity_wh * WH),
            initial=column(lambda s: s.initial_charge),
            threshold=column(lambda s: s.threshold),
            window_start_s=windows[group, :, 0] * 3600.0,
            window_end_s=windows[group, :, 1] * 3600.0,
            window_watts=windows[group, :, 2],
        )


def _in_windows(spec: BatterySpec, ids: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(n, W) F_w(t): seconds each of the clients' window segments has been open up to t."""
    a, b = spec.window_start_s[ids], spec.window_end_s[ids]  # (n, W)
    t = t[:, None]  # (n, 1)
    return np.floor(t / DAY_S) * (b - a) + np.clip(np.mod(t, DAY_S) - a, 0.0, b - a)


class Batteries:
    """Each client's charge over simulated time (module docstring): charged in its windows,
    drained by the energy it spends, available while above its threshold. Vectorised over ids."""

    STATE_KEYS = ("charge_j", "updated_s")

    def __init__(self, spec: BatterySpec) -> None:
        self.spec = spec
        self.charge_j = spec.initial * spec.capacity_j  # (N,) c_i at updated_s (NaN: no battery)
        self.updated_s = np.zeros(spec.size)  # (N,) when c_i was last brought up to date

    def charge_at(self, ids: npt.ArrayLike, t: float) -> np.ndarray:
        """c_i(t) for each client in `ids` (NaN: no battery), charged in its windows since its last
        update; nothing changes. ValueError for a t before a client's last drain."""
        ids = self._ids(ids)
        since = self.updated_s[ids]
        if ids.size and float(t) < since.max():
            raise ValueError(f"t = {t} is before client {ids[since.argmax()]}'s last drain at {since.max()}")
        now = np.full(ids.shape, float(t))
        gained = np.sum(
            self.spec.window_watts[ids] * (_in_windows(self.spec, ids, now) - _in_windows(self.spec, ids, since)),
            axis=1,
        )
        return np.minimum(self.spec.capacity_j[ids], self.charge_j[ids] + gained)

    def available(self, ids: npt.ArrayLike, t: float) -> np.ndarray:
        """Whether each client may take part at t: no battery, or c_i(t) > θ_i · C_i."""
        ids = self._ids(ids)
        capacity = self.spec.capacity_j[ids]
        return np.isnan(capacity) | (self.charge_at(ids, t) > self.spec.threshold[ids] * capacity)

    def drain(self, ids: npt.ArrayLike, joules: npt.ArrayLike, t: float) -> None:
        """Charge each client up to t, then take `joules` (≥ 0) from it, floored at 0; clients
        without a battery are left as they are (their joules may be NaN). ids must be distinct."""
        ids = self._ids(ids)
        spent = np.broadcast_to(np.asarray(joules, dtype=np.float64), ids.shape)
        powered = ~np.isnan(self.spec.capacity_j[ids])
        if len(np.unique(ids)) != len(ids):
            raise ValueError("drain: `ids` must be distinct")
        bad = (spent < 0) | (np.isnan(spent) & powered)
        if bad.any():
            raise ValueError(
                f"drain: `joules` must be >= 0 (not NaN for a client with a battery), got {spent[bad]} "
                f"for clients {ids[bad]}"
            )
        charged = self.charge_at(ids, t)
        self.charge_j[ids] = np.where(powered, np.maximum(charged - spent, 0.0), np.nan)
        self.updated_s[ids] = float(t)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Each client's charge and when it was last brought up to date, for a checkpoint."""
        return {"charge_j": self.charge_j.copy(), "updated_s": self.updated_s.copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Put back what `state_dict` returned; ValueError naming what does not fit this fleet."""
        n = self.spec.size
        problems = [f"`{k}` is missing" for k in self.STATE_KEYS if k not in state]
        problems += [f"`{k}` is not a battery state key" for k in state if k not in self.STATE_KEYS]
        problems += [
            f"`{k}` must have shape ({n},), got {np.shape(state[k])}"
            for k in self.STATE_KEYS
            if k in state and np.shape(state[k]) != (n,)
        ]
        if problems:
            raise ValueError("battery state: " + "; ".join(problems))
        charge, updated = (np.asarray(state[k], dtype=np.float64).copy() for k in self.STATE_KEYS)
        if np.any(np.isnan(charge) != np.isnan(self.spec.capacity_j)):
            raise ValueError("battery state: `charge_j` is NaN exactly where a client has no battery, not elsewhere")
        self.charge_j, self.updated_s = charge, updated

    def _ids(self, ids: npt.ArrayLike) -> np.ndarray:
        out = np.asarray(ids, dtype=np.int64)
        if out.size and (out.min() < 0 or out.max() >= self.spec.size):
            raise IndexError(f"client ids must be in [0, {self.spec.size}), got {out.min()}..{out.max()}")
        return out


__all__ = ["Batteries", "BatterySpec", "client_energy", "cut_at", "idle_wait", "round_energy"]
