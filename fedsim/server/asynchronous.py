"""Anarchic participation on an asynchronous clock (Yang et al., "Anarchic Federated Learning",
ICML 2022): the server does not wait for a round's slowest device, devices decide when they train
and for how many steps, and every update carries the model version it started from.

A run is `rounds` server steps v = 1, 2, …; step v turns the global model x_v into x_{v+1}:

    join       at the step's start t_v, each idle device that is online until it would finish
               (`fedsim.server.rounds.eligible_clients`: its availability, and its battery when
               fleet.batteries is on) chooses to start with probability `join_probability`; the
               willing fill the free slots (at most `concurrency` devices train at once) in a seeded
               order. Each picks its local steps K_i (`steps_policy`), is sent x_v and trains now,
               for real (Flower's engine); its update reaches the server at
               t_v + compute_i + comm_i on the fleet's clock (`fedsim.fleet.clock`)
    collect    the server takes the updates in order of arrival (ties: client id) until
               m = clients.per_round of them are usable. An update is `stale`, and dropped, when it
               started more than `max_staleness` steps ago (τ_i = v − v_i); a device whose trip
               exceeds fleet.deadline_s is a `straggler` the server gives up on at t_i + deadline.
               When nothing is in flight the server asks the idle devices again (each device starts
               at most once a step), and when none joins the step ends with what it has
    aggregate  the strategy's rule on the usable updates (`strategies.afa`: AFA-CD or AFA-CS);
               the clock moves to the last update taken (`fleet.idle_step_s` if there was none)

Devices start when the model changes (a new version is what a device comes back for), not in the
middle of a step. Every draw is seeded by (seed, step, purpose, attempt) and the replies are sorted
by client id, so the run is a function of the scenario and its seed. Each arrival is a row of the
step that took it, with its `staleness`, the `model_version` it started from and its `local_steps`;
a device whose start failed (no reply, a bad reply, too little memory, a dropout draw) is a row of
the step it tried to start in. Updates still in flight when the run ends are not used.

Energy (`fedsim.server.rounds.spend_energy`): each arrival is billed when the server takes it, its
compute and radio from its own start and no idle wait (it leaves once its update is sent); a
straggler what it got through by the time the server gave up on it. With `fleet.batteries` its
battery is drained then, so the next devices to join see it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from fedsim.model.adapter import AdapterState, factors
from fedsim.protocol import LOCAL_STEPS
from fedsim.seeding import derive_seed
from fedsim.server.replies import Checked
from fedsim.server.rounds import (
    RoundEnv,
    RoundResult,
    Row,
    check_train,
    configure,
    eligible_clients,
    problem_rows,
    screen,
    send,
    spend_energy,
    time_replies,
    train_row,
)
from strategies.afa import AFA, StaleUpdate
from strategies.lora_strategy import with_config


@dataclass(frozen=True, order=True)
class Flight:
    """A device's update on its way: ordered by when the server gets it (or gives up), then client id."""

    end_s: float  # arrival, or start + deadline for a straggler
    client: int
    version: int = field(compare=False)  # the server step it started at, v_i
    start_s: float = field(compare=False)
    steps: int = field(compare=False)  # K_i
    reply: Checked = field(compare=False)
    bytes_up: int = field(compare=False)
    bytes_down: int = field(compare=False)
    compute_s: float = field(compare=False)
    comm_s: float = field(compare=False)
    late: bool = field(compare=False)  # its trip is longer than the deadline: the server gave up on it


class AsyncClock:
    """The server's side of an asynchronous run: the devices in flight across steps (`step`)."""

    def __init__(self, env: RoundEnv) -> None:
        if not isinstance(env.strategy, AFA):
            raise TypeError(f"the asynchronous clock needs an AFA strategy, got {type(env.strategy).__name__}")
        self.env, self.strategy = env, env.strategy
        s, p = env.scenario, env.scenario.participation
        self.concurrency = p.concurrency or math.ceil(s.clients.per_round * (1 + s.fleet.overcommit))
        self.steps_range = p.steps_range(s.train.local_steps)
        self.flights: list[Flight] = []  # a heap

    def step(self, state: AdapterState, server_round: int, t_now: float) -> RoundResult:
        """Server step `server_round` from simulated time `t_now` (the stages of the module docstring)."""
        s, env = self.env.scenario, self.env
        tried: set[int] = set()
        rows = self._join(state, server_round, t_now, tried)
        taken: list[Flight] = []
        t_end, energy = t_now, 0.0
        while len(taken) < s.clients.per_round:
            if not self.flights:
                rows += self._join(state, server_round, t_end, tried)
                if not self.flights:
                    break
            flight = heapq.heappop(self.flights)
            t_end = max(t_end, flight.end_s)
            staleness = server_round - flight.version
            if flight.late:
                status, reason = "straggler", f"its trip is longer than the {s.fleet.deadline_s:g}s deadline"
            elif staleness > s.participation.max_staleness:
                status = "stale"
                reason = f"started {staleness} steps ago, more than participation.max_staleness"
            else:
                status, reason = "ok", ""
                taken.append(flight)
            row = self._row(flight, server_round, status, reason)
            energy += spend_energy(env, [row], flight.end_s - flight.start_s, flight.start_s)  # no idle wait
            rows.append(row)
        updates = [
            StaleUpdate(f.client, _update(f.reply), _rank(f.reply), f.steps, server_round - f.version) for f in taken
        ]
        new_state = self.strategy.apply(state, updates) if updates else state
        duration = t_end - t_now if taken or t_end > t_now else s.fleet.idle_step_s
        central = {"in_flight": len(self.flights)}
        rows.sort(key=lambda r: r["client_id"])
        return RoundResult(new_state, rows, duration, float("nan"), central, energy_j=float(energy))

    def _join(self, state: AdapterState, server_round: int, t_now: float, tried: set[int]) -> list[Row]:
        """Start the idle devices that choose to, in the free slots, from `state`; their problem rows."""
        env, s = self.env, self.env.scenario
        free = self.concurrency - len(self.flights)
        if free <= 0:
            return []
        busy = tried | {f.client for f in self.flights}
        idle = np.array([c for c in eligible_clients(env, state, t_now, server_round) if int(c) not in busy])
        rng = np.random.default_rng(derive_seed(s.seed, server_round, "async-join", len(tried)))
        willing = idle[rng.random(len(idle)) < s.participation.join_probability]
        chosen = np.sort(rng.permutation(willing)[:free]).astype(np.int64)
        tried.update(int(c) for c in chosen)
        chosen, rows = screen(env, chosen, server_round)
        if not len(chosen):
            return rows
        steps = self._local_steps(chosen, server_round, t_now, len(tried))
        out = configure(env, state, chosen, server_round)
        told = [with_config(m, {LOCAL_STEPS: steps[env.roster.client(m.metadata.dst_node_id)]}) for m in out.messages]
        replies = send(env, told, lambda r: check_train(env, r, out.sent))
        rows += problem_rows(env, replies, server_round, "train")
        timing = time_replies(env, replies.ok, out.bytes_down, replies.round_trips)  # its `kept` is not used
        for i, c in enumerate(replies.ok):
            node = c.message.metadata.src_node_id
            cid, compute, comm = env.roster.client(node), float(timing.compute[i]), float(timing.comm[i])
            late = 0 < s.fleet.deadline_s < compute + comm
            end = t_now + (s.fleet.deadline_s if late else compute + comm)
            up, down = int(timing.bytes_up[i]), out.bytes_down[node]
            flight = Flight(end, cid, server_round, t_now, steps[cid], c, up, down, compute, comm, late)
            heapq.heappush(self.flights, flight)
        return rows

    def _local_steps(self, chosen: np.ndarray, server_round: int, t_now: float, attempt: int) -> dict[int, int]:
        """Each starting device's K_i: uniform in [min, max], or by its charge share (`steps_policy`)."""
        low, high = self.steps_range
        s = self.env.scenario
        if s.participation.steps_policy == "battery":
            share = self._charge_share(chosen, t_now)
            ks = low + np.rint((high - low) * share).astype(np.int64)
        else:
            rng = np.random.default_rng(derive_seed(s.seed, server_round, "async-steps", attempt))
            ks = rng.integers(low, high + 1, size=len(chosen))
        return {int(c): int(k) for c, k in zip(chosen, ks)}

    def _charge_share(self, ids: np.ndarray, t_now: float) -> np.ndarray:
        """Each device's battery charge over its capacity at `t_now` (1: mains-powered or batteries off)."""
        batteries = self.env.batteries
        if batteries is None:
            return np.ones(len(ids))
        capacity = batteries.spec.capacity_j[ids]
        share = batteries.charge_at(ids, t_now) / capacity
        return np.where(np.isnan(capacity), 1.0, np.clip(share, 0.0, 1.0))

    def _row(self, flight: Flight, server_round: int, status: str, reason: str) -> Row:
        """The metrics row of an update the server took, dropped or gave up on at step `server_round`."""
        row = train_row(
            self.env, flight.reply, server_round, status, reason,
            flight.compute_s, flight.comm_s, flight.bytes_up, flight.bytes_down,
        )  # fmt: skip
        row.update(
            staleness=server_round - flight.version,
            model_version=flight.version,
            local_steps=flight.steps,
            sim_start_s=flight.start_s,
        )
        return row


def _update(reply: Checked) -> AdapterState:
    assert reply.update is not None  # ok replies carry their decoded update
    return reply.update


def _rank(reply: Checked) -> int:
    """The rank of the adapter a reply's update covers (its A factors' rows)."""
    return int(next(iter(factors(_update(reply), "A").values())).shape[0])


__all__ = ["AsyncClock", "Flight"]
