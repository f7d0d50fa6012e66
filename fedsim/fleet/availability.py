"""Device availability: when is each client of the fleet online.

A device profile names an availability *spec* (`fedsim.config.availability`, picked by its `kind`):

    always      online at every time of every round
    bernoulli   online in round r with probability p, independently per (client, round)
    diurnal     online for `on_fraction` of every `period_s`, from a per-client phase φ_i:
                online(i, t) ⇔ frac(t / period_s + φ_i) < on_fraction
    trace       online inside the client's windows [start, end) read from a trace file

Evaluation is stateless and vectorised: every answer is a pure function of (seed, client, round,
time), so asking about clients in any order, or any subset of them, gives the same answer, and a
fleet of 10,000 clients is a handful of NumPy calls (no per-client Python loop on the hot path).

Random draws come from a counter-based hash, not from a generator that advances: the key
`derive_seed(seed, stream..., round)` (SHA-256, see `fedsim.seeding`) is spread over clients by
SplitMix64 (Steele et al., 2014), u_i = mix64(key + (i + 1)·γ) / 2^64, as a SplitMix generator
would draw its i-th number. Bernoulli presence, diurnal phases and mid-round dropout use separate
streams.

Traces are FedScale-style (Lai et al., 2022, arXiv:2105.11367: one row per client with its device
and its online intervals), as CSV with header `client_id,profile,windows` plus optional columns
`train_tflops,memory_gb,uplink_mbps,downlink_mbps` that override the named profile where non-empty;
`windows` is `start-end;start-end;...` in seconds (empty: never online). See
`scenarios/traces/campus-40.csv`.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config.availability import KINDS, Availability
from fedsim.config.errors import InputError
from fedsim.seeding import derive_seed

_ALWAYS, _BERNOULLI, _DIURNAL, _TRACE = range(4)

# --- stateless draws -----------------------------------------------------------------------

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic): a bijection with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform_draws(clients: np.ndarray, seed: int, *stream: int | str) -> np.ndarray:
    """One U[0, 1) number per client, a pure function of (seed, stream, client)."""
    key = np.uint64(derive_seed(seed, *stream))
    state = key + (np.asarray(clients, dtype=np.int64).astype(np.uint64) + np.uint64(1)) * _GAMMA
    return (_mix64(state) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # top 53 bits


def dropout_draws(clients: np.ndarray, server_round: int, seed: int, p: float) -> np.ndarray:
    """True where a client drops out in the middle of `server_round` (probability `p` each,
    independent per (client, round), on a stream of its own)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return uniform_draws(clients, seed, "dropout", server_round) < p


# --- windows -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Windows:
    """Online windows of every client in CSR form: client i's windows are
    `starts[offsets[i]:offsets[i+1]]` / `ends[...]`, each [start, end), sorted and separated by
    a gap (touching windows are merged by `from_lists`). Arrays are copied and made read-only."""

    starts: np.ndarray  # (W,) float64 seconds
    ends: np.ndarray  # (W,) float64 seconds, ends > starts
    offsets: np.ndarray  # (N + 1,) int64, offsets[0] = 0, offsets[-1] = W

    def __post_init__(self) -> None:
        for name, dtype in (("starts", np.float64), ("ends", np.float64), ("offsets", np.int64)):
            array = np.array(getattr(self, name), dtype=dtype)  # a copy
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        if (msg := self._invalid()) is not None:
            raise ValueError(f"invalid windows: {msg}")

    def _invalid(self) -> str | None:
        s, e, o = self.starts, self.ends, self.offsets
        if s.ndim != 1 or e.ndim != 1 or o.ndim != 1 or len(o) == 0:
            return "starts, ends and offsets must be 1-D, offsets non-empty"
        if len(s) != len(e) or o[0] != 0 or o[-1] != len(s) or np.any(np.diff(o) < 0):
            return "offsets must rise from 0 to len(starts) == len(ends)"
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(e))):
            return "window bounds must be finite"
        if np.any(e <= s):
            return f"window {int(np.argmax(e <= s))} has end <= start"
        same_client = self._client_of[1:] == self._client_of[:-1]
        if np.any(same_client & (s[1:] <= e[:-1])):
            return "a client's windows must be sorted and separated (overlapping or touching)"
        return None

    @classmethod
    def from_lists(cls, per_client: Sequence[Sequence[tuple[float, float]]]) -> Windows:
        """Windows from one list of (start, end) per client, sorted; touching windows merged."""
        starts: list[float] = []
        ends: list[float] = []
        offsets = [0]
        for windows in per_client:
            first = len(starts)
            for start, end in sorted(windows):
                if len(starts) > first and start == ends[-1]:
                    ends[-1] = end
                else:
                    starts.append(start)
                    ends.append(end)
            offsets.append(len(starts))
        return cls(np.array(starts), np.array(ends), np.array(offsets))

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def _client_of(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_clients), np.diff(self.offsets))  # (W,)

    @cached_property
    def _keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact composite sort keys: client · (M + 1) + rank(start), rank among the M distinct
        start times. Sorted by (client, start), so one searchsorted finds a client's window."""
        values = np.unique(self.starts)  # (M,)
        ranks = np.searchsorted(values, self.starts, side="right")  # 1..M
        return values, self._client_of * (len(values) + 1) + ranks

    def _locate(self, clients: np.ndarray, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """For each (client, t): index k of the client's last window with start <= t, and
        whether t lies inside it. Two binary searches (np.searchsorted), no per-client loop."""
        clients = np.asarray(clients, dtype=np.int64)
        if clients.size and (clients.min() < 0 or clients.max() >= self.num_clients):
            raise IndexError(f"client ids must be in [0, {self.num_clients}), got {clients.min()}..{clients.max()}")
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), clients.shape)
        values, keys = self._keys
        query = clients * (len(values) + 1) + np.searchsorted(values, t, side="right")
        k = np.searchsorted(keys, query, side="right") - 1
        safe = np.clip(k, 0, max(len(keys) - 1, 0))
        inside = (k >= self.offsets[clients]) & (t < self.ends[safe]) if len(keys) else np.zeros(clients.shape, bool)
        return safe, inside

    def online(self, clients: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        """Whether each client is inside one of its windows at time t (scalar or per client)."""
        return self._locate(clients, t)[1]

    def online_until(self, clients: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        """End of the window containing t, or t itself where the client is offline."""
        k, inside = self._locate(clients, t)
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), inside.shape)
        return np.where(inside, self.ends[k] if len(self.ends) else t, t)


# --- the fleet -----------------------------------------------------------------------------


class FleetAvailability:
    """Availability of every client of a fleet: one spec per client (deduplicated into groups),
    the trace windows for `trace` clients (client i uses row i of `windows`), and the seed."""

    def __init__(self, specs: Sequence[Availability], seed: int, windows: Windows | None = None) -> None:
        distinct: dict[Availability, int] = {}
        group = np.fromiter((distinct.setdefault(s, len(distinct)) for s in specs), np.int64, len(specs))
        self._setup(tuple(distinct), group, seed, windows)

    @classmethod
    def from_groups(
        cls, groups: Sequence[tuple[Availability, int]], seed: int, windows: Windows | None = None
    ) -> FleetAvailability:
        """`[(spec, count), ...]`: consecutive runs of clients sharing a spec."""
        fleet = cls.__new__(cls)
        counts = [count for _, count in groups]
        if any(count < 0 for count in counts):
            raise ValueError(f"group sizes must be >= 0, got {counts}")
        fleet._setup(tuple(spec for spec, _ in groups), np.repeat(np.arange(len(groups)), counts), seed, windows)
        return fleet

    def _setup(self, specs: tuple[Availability, ...], group: np.ndarray, seed: int, windows: Windows | None) -> None:
        def column(value: Any) -> np.ndarray:  # per-client array of one field of the specs
            return np.array([value(s) for s in specs] or [0], dtype=np.float64)[group]

        self.seed = seed
        self.num_clients = len(group)
        self._kind = column(lambda s: KINDS.index(s.kind)).astype(np.int8)
        self._p = column(lambda s: getattr(s, "p", 1.0))
        self._period = column(lambda s: getattr(s, "period_s", 1.0))
        self._on = column(lambda s: getattr(s, "on_fraction", 1.0))
        self._phase = uniform_draws(np.arange(self.num_clients), seed, "availability", "diurnal-phase")
        traced = np.flatnonzero(self._kind == _TRACE)
        if traced.size and (windows is None or windows.num_clients <= traced.max()):
            have = "no windows" if windows is None else f"windows for {windows.num_clients} clients"
            raise ValueError(f"clients up to {traced.max()} have trace availability but the fleet has {have}")
        self._windows = windows

    def _state(self, clients: np.ndarray, t: float, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """(online at t, time its current online spell ends: inf if it does not end, t if offline)."""
        c = np.asarray(clients, dtype=np.int64)
        if c.size and (c.min() < 0 or c.max() >= self.num_clients):
            raise IndexError(f"client ids must be in [0, {self.num_clients}), got {c.min()}..{c.max()}")
        kind = self._kind[c]
        online, until = np.ones(c.shape, bool), np.full(c.shape, np.inf)
        if np.any(b := kind == _BERNOULLI):
            online[b] = uniform_draws(c[b], self.seed, "availability", "bernoulli", server_round) < self._p[c[b]]
        if np.any(d := kind == _DIURNAL):
            x = np.mod(t / self._period[c[d]] + self._phase[c[d]], 1.0)  # position in the cycle
            on = self._on[c[d]]
            online[d] = x < on
            until[d] = np.where(on >= 1.0, np.inf, t + (on - x) * self._period[c[d]])
        if np.any(w := kind == _TRACE):
            assert self._windows is not None  # checked in _setup
            online[w] = self._windows.online(c[w], t)
            until[w] = self._windows.online_until(c[w], t)
        return online, np.where(online, until, t)

    def online(self, clients: np.ndarray, t: float, server_round: int) -> np.ndarray:
        """Whether each client is online at simulated time t of `server_round`."""
        return self._state(clients, t, server_round)[0]

    def online_through(self, clients: np.ndarray, t_start: float, t_end: np.ndarray, server_round: int) -> np.ndarray:
        """Online at t_start and still online at each client's t_end: for bernoulli the round's
        draw; for diurnal and trace no off-transition in between (finishing exactly as the
        window closes counts as finished in time)."""
        t_end = np.broadcast_to(np.asarray(t_end, dtype=np.float64), np.shape(clients))
        if np.any(t_end < t_start):
            raise ValueError(f"t_end must be >= t_start ({t_start}), got min {t_end.min()}")
        online, until = self._state(clients, t_start, server_round)
        return online & (t_end <= until)


# --- trace files ---------------------------------------------------------------------------

TRACE_COLUMNS = ("client_id", "profile", "windows")
TRACE_FIGURES = ("train_tflops", "memory_gb", "uplink_mbps", "downlink_mbps")
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_WINDOW = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*")


class TraceError(InputError):
    """A trace file that cannot be used; `problems` lists every reason, each with its line."""

    what = "trace"


def load_trace(path: str | Path, known_profiles: Collection[str] | None = None) -> tuple[list[dict[str, Any]], Windows]:
    """Read a trace CSV: rows sorted by client id, each `{"client_id", "profile", "line",
    "overrides": {figure: value}}`, and the clients' windows. Every problem is reported at once,
    by line number. With `known_profiles`, profile names are checked too."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(str(path), [f"file not found: {path}"])
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            records = [(reader.line_num, fields) for fields in reader]  # line_num: the record's last line
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(str(path), [f"not a readable CSV file: {exc}"]) from None
    if not records:
        raise TraceError(str(path), ["line 1: missing header client_id,profile,windows"])
    header = [name.strip() for name in records[0][1]]
    problems = _header_problems(header)
    if problems:
        raise TraceError(str(path), problems)
    rows: list[dict[str, Any]] = []
    windows: dict[int, list[tuple[float, float]]] = {}  # client id → its windows
    first_line: dict[int, int] = {}  # client id → the line that gave it
    for line, fields in records[1:]:
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            problems.append(f"line {line}: expected {len(header)} fields (as in the header), got {len(fields)}")
            continue
        row, row_windows, row_problems = _parse_row(dict(zip(header, fields)), line, known_profiles)
        problems += row_problems
        if (cid := row["client_id"]) is None:
            continue
        if cid in first_line:
            problems.append(f"line {line}: client_id {cid} already given on line {first_line[cid]}")
            continue
        first_line[cid] = line
        rows.append(row)
        windows[cid] = row_windows
    problems += _id_problems(first_line)
    if problems:
        raise TraceError(str(path), problems)
    rows.sort(key=lambda row: row["client_id"])
    return rows, Windows.from_lists([windows[i] for i in range(len(rows))])


def _header_problems(header: list[str]) -> list[str]:
    allowed = TRACE_COLUMNS + TRACE_FIGURES
    problems = [
        f"line 1: unknown column {name!r}; allowed: {', '.join(allowed)}" for name in header if name not in allowed
    ]
    problems += [
        f"line 1: column {name!r} appears {header.count(name)} times" for name in allowed if header.count(name) > 1
    ]
    problems += [f"line 1: missing column {name!r}" for name in TRACE_COLUMNS if name not in header]
    return problems


def _parse_row(
    fields: dict[str, str], line: int, known_profiles: Collection[str] | None
) -> tuple[dict[str, Any], list[tuple[float, float]], list[str]]:
    """One data row → (row, its windows, problems); the row's client_id is None if unreadable."""
    problems = []
    raw_id = fields["client_id"].strip()
    cid = int(raw_id) if re.fullmatch(r"[0-9]+", raw_id) else None
    if cid is None:
        problems.append(f"line {line}: client_id must be a non-negative integer, got {raw_id!r}")
    profile = fields["profile"].strip()
    if not profile:
        problems.append(f"line {line}: profile is empty")
    elif known_profiles is not None and profile not in known_profiles:
        problems.append(f"line {line}: unknown profile {profile!r}; known: {', '.join(sorted(known_profiles))}")
    overrides = {}
    for name in TRACE_FIGURES:
        raw = fields.get(name, "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            problems.append(f"line {line}: {name} {raw!r} is not a number")
            continue
        if not math.isfinite(value) or value <= 0:
            problems.append(f"line {line}: {name} must be a finite number > 0, got {raw}")
        overrides[name] = value
    windows, window_problems = _parse_windows(fields["windows"], line)
    problems += window_problems
    return {"client_id": cid, "profile": profile, "line": line, "overrides": overrides}, windows, problems


def _parse_windows(text: str, line: int) -> tuple[list[tuple[float, float]], list[str]]:
    """`start-end;start-end;...` → sorted windows, or the problems found."""
    parsed: list[tuple[float, float, str]] = []
    problems: list[str] = []
    for piece in (p.strip() for p in text.split(";")):
        if not piece:
            continue
        match = _WINDOW.fullmatch(piece)
        if match is None:
            problems.append(f"line {line}: window {piece!r} must look like start-end (seconds >= 0)")
            continue
        start, end = float(match[1]), float(match[2])
        if not (math.isfinite(start) and math.isfinite(end)):
            problems.append(f"line {line}: window {piece!r} is not finite")
        elif end <= start:
            problems.append(f"line {line}: window {piece!r} has end <= start")
        else:
            parsed.append((start, end, piece))
    parsed.sort()
    for (_, end_a, a), (start_b, _, b) in zip(parsed, parsed[1:]):
        if start_b < end_a:
            problems.append(f"line {line}: windows {a!r} and {b!r} overlap")
    return [(start, end) for start, end, _ in parsed], problems


def _id_problems(first_line: dict[int, int]) -> list[str]:
    if not first_line:
        return ["no clients: the trace has a header and no rows"]
    missing = sorted(set(range(max(first_line) + 1)) - set(first_line))
    if not missing:
        return []
    shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
    return [f"client ids must be 0..{max(first_line)}, each once; missing: {shown}"]
