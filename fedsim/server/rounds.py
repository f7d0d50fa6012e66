"""One round on the fleet, in named stages that follow Flower's `Strategy.start`:

    sample      clients online now and until they would finish (`Estimates` of their device),
                per_round·(1 + overcommit) of them, seeded by (seed, round) so any scheduling
                order gives the same choice
    plan        the controller's arm per sampled client and the server's cuts (`fedsim.server.control`,
                `fedsim.fleet.keeps`)
    screen      a client whose memory cannot hold the step is `infeasible`, one whose dropout
                draw fires is `dropped`: each gets a row and no message
    configure   the strategy's `configure_train`: each node gets what its rank (and keep) calls for
    send        push, wait, pull; every reply checked on its own (`fedsim.server.replies`)
    time        each reply on the simulated clock (`fedsim.fleet.clock`); the first per_round
                finishers within the deadline are kept, later ones are `straggler`s
    aggregate   the strategy's `aggregate_train` over the kept replies
    record      one metrics row per client
    spend       the joules each client spent on the round on the clock (`spend_energy`: compute, radio
                and idle until the round ends, `fedsim.fleet.energy`); with `fleet.batteries`, its
                battery drained by them, and `sample` leaves out a device at or below its threshold
    observe     the controller's rewards (which may weigh those joules)

then `eval_round`, the federated evaluation (not on the clock: not billed). With `fleet.clock =
"measured"` (real devices) sample and screen skip the fleet model — the devices that are there
answer — and each client is timed by its measured round trip (compute: the training time it
reports; its energy is its profile's power over those seconds).

Differential privacy (`fedsim.privacy`, a `privacy` section that is on): the round is DP-FedAvg.
In central mode sample draws each eligible client with probability q = per_round / num_clients
(Poisson) and every kept client that finishes within the deadline is kept (none is a straggler by
count); each client is told its clip C_t (and, local mode, its noise); aggregate brings each kept
update to the global coordinates, re-clips it (central) and takes the noised mean D̄ with the fixed
denominator m (`private_mean`: one draw of noise per round, on a round with no client too), then
the strategy aggregates one pseudo-client, the global adapter moved by D̄, of weight 1: every
client counts equally (`aggregate_private`). The round's central row gains `dp_epsilon`, `dp_clip`
and, with adaptive clipping, `dp_unclipped` (`RoundResult.central`, `PrivacyBook.step`).

Rank self-pruning (HetLoRA, `strategies.hetlora`): a reply may name a kept rank below the one the
client was sent; its update then covers that rank, and a kept reply caps the client's rank from
then on (`fedsim.fleet.ranks.ClientRanks`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim.compression.downlink import Downlink
from fedsim.config.scenario import Scenario
from fedsim.fleet.availability import dropout_draws
from fedsim.fleet.clock import comm_seconds, keep_first_finishers, payload_bytes, round_duration
from fedsim.fleet.energy import Batteries, client_energy, cut_at, idle_wait, round_energy
from fedsim.fleet.fleet import GIB, Fleet
from fedsim.fleet.keeps import PruneBook, plan_server_keeps
from fedsim.fleet.ranks import ClientRanks
from fedsim.model.adapter import AdapterState, factors, from_record, split_state, to_record
from fedsim.privacy import PrivacyBook, poisson_sample, to_global, update_rank
from fedsim.protocol import (
    ACCURACY,
    ARRAYS_RECORD,
    BELOW_CLIP,
    CLIENT_ID,
    CONFIG_RECORD,
    DOWN_RECORD,
    DP_RECORD,
    FINAL_KEEP,
    FLOPS,
    KEPT_RANK,
    LOSS,
    LOSS_AFTER,
    LOSS_BEFORE,
    METRICS_RECORD,
    NUM_EXAMPLES,
    PRUNE_RATIO,
    PRUNE_RECORD,
    RANK_RECORD,
    SCENARIO,
    SELF_PRUNE,
    TOKENS,
    TRAIN_LOSS,
    TRAIN_METRICS,
    WALL_TIME_S,
)
from fedsim.pruning.slicing import slice_adapter
from fedsim.pruning.structure import Keep, Scores
from fedsim.seeding import derive_seed
from fedsim.server.control import ArmControl
from fedsim.server.estimates import Estimates
from fedsim.server.packs import with_packs
from fedsim.server.replies import Checked, check_eval_reply, check_train_reply, reply_metric
from fedsim.server.roster import Roster
from strategies import LoraStrategy
from strategies.hetlora import drop_tail
from strategies.lora_math import aggregation_bias, layer_pairs
from strategies.lora_strategy import ClientAdapter, with_config, with_content

Row = dict[str, Any]


class Participants(Grid):
    """A view of `grid` that shows only the nodes fedsim sampled, so a Flower strategy's own
    `configure_*` (which samples from `grid.get_node_ids()`) addresses exactly them."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._ids = grid, list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def set_run(self, run: Run) -> None:
        return self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


@dataclass(frozen=True)
class RoundEnv:
    """What every round works with. Its fields are never rebound; the books it holds (`ranks`,
    `pruning`, `downlink`, `control`) carry each client's state from one round to the next."""

    grid: Grid
    scenario: Scenario
    strategy: LoraStrategy
    fleet: Fleet
    roster: Roster  # client id ↔ node id (a node per client, or a pool seated phase by phase)
    ranks: ClientRanks  # each client's LoRA rank (the scenario's or the controller's arm, capped by self-pruning)
    estimate: Callable[[int, Keep | None], Estimates]  # (rank, keep of the model held) → cost
    score: Callable[..., float] | None = (
        None  # held-out loss of an adapter (α tuning, contributions): (state, examples=16)
    )
    downlink: Downlink | None = None  # compressed server → client direction, if enabled
    pruning: PruneBook | None = None  # each client's pruned model, when pruning is on
    control: ArmControl | None = None  # the bandit that picks each sampled client's arm, if any
    server_scores: Callable[[AdapterState], Scores] | None = None  # pruning.where = "server": global importance
    assigned: bool = False  # the server assigned clients to nodes: each message names its client (CLIENT_ID)
    privacy: PrivacyBook | None = None  # DP-FedAvg's books (privacy on: `fedsim.privacy`)
    batteries: Batteries | None = None  # each device's charge (`fleet.batteries` on: `fedsim.fleet.energy`)

    @property
    def measured(self) -> bool:
        """A deployment on real devices: no fleet model, the measured clock."""
        return self.scenario.fleet.clock == "measured"

    def rank(self, cid: int) -> int:
        """The rank client `cid` trains and evaluates at (`ClientRanks.of`)."""
        return self.ranks.of(cid)

    def estimated(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(FLOPs, memory bytes) the server expects of each client in `ids`, at its rank, on the
        model it holds."""
        book = self.pruning
        if book is None:  # the cost depends on the rank only: one estimate per distinct rank
            ranks, where = np.unique(self.ranks.of_many(ids), return_inverse=True)
            each = [self.estimate(int(r), None) for r in ranks]
            flops, memory = np.array([e.flops for e in each], dtype=float), np.array([e.memory for e in each])
            return flops[where], memory[where].astype(np.int64)
        each = [self.estimate(self.rank(int(c)), book.held(int(c))) for c in ids]
        return np.array([e.flops for e in each], dtype=float), np.array([e.memory for e in each], dtype=np.int64)

    def assign_ranks(self, ids: Iterable[int]) -> None:
        """Tell the strategy the rank (and, pruning, the order) of each client it will address."""
        ids = [int(c) for c in ids]
        node = self.roster.node
        self.strategy.assign_ranks({node(c): self.rank(c) for c in ids})
        book = self.pruning
        self.strategy.assign_pruning({node(c): (book.held(c), book.order(c)) for c in ids} if book else {})


@dataclass(frozen=True)
class Outgoing:
    """The round's train messages, as the strategy configured them."""

    messages: list[Message]
    sent: dict[int, AdapterState]  # node id → the adapter its message carries (what its update adds to)
    bytes_down: dict[int, int]  # node id → payload bytes of its message


@dataclass(frozen=True)
class Replies:
    """What came back: each reply checked on its own, sorted by client id (aggregation never
    depends on arrival order)."""

    checked: list[Checked]
    silent: list[int]  # nodes that never answered
    round_trips: dict[int, float]  # node id → measured seconds of its exchange

    @property
    def ok(self) -> list[Checked]:
        return [c for c in self.checked if c.status == "ok"]


@dataclass(frozen=True)
class Timing:
    """The ok replies on the clock, in order: compute and link seconds, which are kept, and the
    payload bytes each sent (measured once, for the clock and the rows)."""

    compute: np.ndarray
    comm: np.ndarray
    kept: np.ndarray  # bool
    bytes_up: np.ndarray  # int64

    @property
    def finish(self) -> np.ndarray:
        return self.compute + self.comm


@dataclass(frozen=True)
class RoundResult:
    """A training round's outcome."""

    state: AdapterState  # the new global adapter (the old one if nothing was kept)
    rows: list[Row]  # one per client the round concerned, by client id
    duration: float  # simulated seconds
    bias: float  # aggregation bias of the kept clients (`round_bias`)
    central: Row = field(default_factory=dict)  # what the round adds to its central row (privacy's figures)
    energy_j: float = 0.0  # the fleet's joules this round (`spend_energy`; NaN: unknown)


def train_round(env: RoundEnv, state: AdapterState, server_round: int, t_now: float) -> RoundResult:
    """One training round at simulated time `t_now` (the stages of the module docstring)."""
    s = env.scenario
    chosen = sample(env, state, server_round, t_now)
    plan(env, state, chosen, server_round)
    chosen, rows = screen(env, chosen, server_round)
    base = env.downlink.advance(state, server_round) if env.downlink else state  # what clients start from
    out = configure(env, base, chosen, server_round)
    replies = send(env, out.messages, lambda r: check_train(env, r, out.sent))
    if env.downlink:
        received = [env.roster.client(_node(c)) for c in replies.checked if c.status != "failed"]
        env.downlink.mark_received(np.array(received, dtype=np.int64))
    rows += problem_rows(env, replies, server_round, "train")
    ok = replies.ok
    timing = time_replies(env, ok, out.bytes_down, replies.round_trips)
    kept = [c for c, k in zip(ok, timing.kept) if k]
    noised = private_mean(env, base, kept, server_round) if env.privacy is not None else None

    def combined(factor: float) -> AdapterState | None:
        """The new global state, the updates scaled by `factor` (None: nothing to aggregate)."""
        if noised is not None:
            return aggregate_private(env, base, noised, server_round, factor)
        return aggregate(env, out.sent, kept, server_round, factor)

    tune = s.compression.alpha_auto and (bool(kept) or noised is not None)
    factor = best_alpha(env, combined) if tune else 1.0
    scoring = env.control is not None and env.control.scores_contributions
    # Each reply's adapter as the strategy aggregates it: the kept ones for the bias, every one when scored.
    adapters = {
        i: env.strategy.client_adapter(_as_adapter_reply(c, out.sent, factor))
        for i, c in enumerate(ok)
        if timing.kept[i] or scoring
    }
    gains = contributions(env, state, list(adapters.values())) if scoring else np.full(len(ok), np.nan)
    rows += record(env, ok, timing, out.bytes_down, gains, factor, server_round)
    bias = round_bias(
        [adapters[int(i)].state for i in np.flatnonzero(timing.kept)],
        [float(reply_metric(c.message, NUM_EXAMPLES)) for c in kept],
        s,
    )
    state = combined(factor) or state
    central = env.privacy.step(indicator_bits(kept), server_round) if env.privacy is not None else {}
    duration = round_duration(timing.finish, timing.kept, s.fleet.deadline_s)
    # A round that kept nothing still costs time: the server waits before it samples again.
    duration = duration if timing.kept.any() else max(duration, s.fleet.idle_step_s)
    energy = spend_energy(env, rows, duration, t_now)
    if env.control is not None:
        env.control.observe(rows)
    return RoundResult(state, sorted(rows, key=lambda r: r["client_id"]), duration, bias, central, energy)


# --- sample, plan, screen ----------------------------------------------------------------------


def sample_clients(available: Iterable[int], k: int, seed: int, server_round: int, purpose: str) -> list[int]:
    """k client ids drawn without replacement, a pure function of (seed, round, purpose)."""
    pool = sorted(int(c) for c in available)
    rng = np.random.default_rng(derive_seed(seed, server_round, purpose))
    k = min(k, len(pool))
    return sorted(int(c) for c in rng.choice(pool, size=k, replace=False)) if k else []


def eligible_clients(env: RoundEnv, state: AdapterState, t_now: float, server_round: int) -> np.ndarray:
    """Clients online now and, by their device's estimated round time (its FLOPs, and `state` with the
    train config as the bytes each way), until they finish; with batteries, only those whose charge is
    above their threshold now (`Batteries.available`)."""
    est_bytes = payload_bytes(RecordDict({ARRAYS_RECORD: to_record(state), CONFIG_RECORD: _train_config(env)}))
    ids = env.roster.ids
    f = env.fleet
    est_s = env.estimated(ids)[0] / f.flops[ids] + comm_seconds(est_bytes, est_bytes, f.down_bps[ids], f.up_bps[ids])
    eligible = f.availability.online_through(ids, t_now, t_now + est_s, server_round)
    if env.batteries is not None:
        eligible &= env.batteries.available(ids, t_now)
    return ids[eligible]


def sample(env: RoundEnv, state: AdapterState, server_round: int, t_now: float) -> np.ndarray:
    """The round's per_round·(1 + overcommit) clients, among the eligible (all of them when measured);
    central DP: each eligible client with probability q (`fedsim.privacy.poisson_sample`)."""
    s = env.scenario
    k = math.ceil(s.clients.per_round * (1 + s.fleet.overcommit))
    if env.measured:
        pool = env.roster.ids
    else:
        pool = eligible_clients(env, state, t_now, server_round)
    book = env.privacy
    if book is not None and book.central:
        n, q = s.clients.num_clients, book.plan.sampling_rate
        return np.array(poisson_sample(pool, n, q, s.seed, server_round), dtype=np.int64)
    return np.array(sample_clients(pool, k, s.seed, server_round, "train"), dtype=np.int64)


def plan(env: RoundEnv, state: AdapterState, chosen: np.ndarray, server_round: int) -> None:
    """What the chosen clients will train: the controller's arms, then the server's cuts."""
    if env.control is not None:
        env.control.assign(chosen, server_round, env.ranks.assigned, env.pruning)
    if env.pruning is not None and env.scenario.pruning.where == "server":
        server_scores = env.server_scores
        assert server_scores is not None
        plan_server_keeps(env.pruning, chosen, lambda: server_scores(state))


def screen(env: RoundEnv, chosen: np.ndarray, server_round: int) -> tuple[np.ndarray, list[Row]]:
    """The chosen clients less the infeasible and the dropped, and a row for each of those
    (nothing is screened when measured: a real device that cannot train fails for real)."""
    if env.measured:
        return chosen, []
    s, f = env.scenario, env.fleet
    need = env.estimated(chosen)[1]
    infeasible = f.memory[chosen] < need
    rows = [
        _base_row(
            env,
            int(c),
            server_round,
            "train",
            "infeasible",
            f"needs {m / GIB:.2f} GiB at rank {env.rank(int(c))}{_pruned(env, int(c))}, device has "
            f"{f.memory[c] / GIB:.2f} GiB",
        )
        for c, m in zip(chosen[infeasible], need[infeasible])
    ]
    chosen = chosen[~infeasible]
    dropped = dropout_draws(chosen, server_round, derive_seed(s.seed, "dropout"), s.fleet.dropout)
    rows += [
        _base_row(
            env, int(c), server_round, "train", "dropped", f"dropped out mid-round (fleet.dropout = {s.fleet.dropout})"
        )
        for c in chosen[dropped]
    ]
    return chosen[~dropped], rows


def _pruned(env: RoundEnv, cid: int) -> str:
    book = env.pruning
    if book is None:
        return ""
    note = f", pruned {book.ratio(book.held(cid)):.2f}"
    if env.scenario.pruning.where == "client" and book.targets[cid] > book.ratio(book.held(cid)):
        note += (
            f" (it would prune toward {book.targets[cid]:g} on the device; "
            "pruning.where = 'server' cuts before sending)"
        )
    return note


# --- configure, send, check ---------------------------------------------------------------


def configure(env: RoundEnv, base: AdapterState, chosen: np.ndarray, server_round: int) -> Outgoing:
    """The train messages of the chosen clients, through the strategy's `configure_train` (each
    node gets what its rank calls for; with the downlink, the record it needs). With privacy on the
    strategy is configured on a round without clients too: its noised step starts from `base`."""
    if not len(chosen) and env.privacy is None:
        return Outgoing([], {}, {})
    env.roster.seat(chosen)
    nodes = [env.roster.node(int(c)) for c in chosen]
    env.assign_ranks(chosen)
    messages = list(
        env.strategy.configure_train(server_round, to_record(base), _train_config(env), Participants(env.grid, nodes))
    )
    sent = _sent_states(messages)
    if env.downlink:  # one rank for all (checked at load): what each node holds is `base`
        messages = [_down_message(env.downlink, env.roster.client(m.metadata.dst_node_id), m) for m in messages]
    sizes = _bytes_by_node(messages)  # what a device is sent: without the simulation's client id
    return Outgoing(with_packs(env.scenario, _named(env, messages), server_round), sent, sizes)  # packing on: packs


def send(env: RoundEnv, messages: Iterable[Message], check: Callable[[Message], Checked]) -> Replies:
    """Send, wait for the replies or the round timeout, check each."""
    sent = list(messages)
    if not sent:
        return Replies([], [], {})
    replies, round_trips = timed_send_and_receive(env.grid, sent, env.scenario.simulation.round_timeout_s)
    checked = sorted((check(r) for r in replies), key=lambda c: env.roster.client(_node(c)))
    answered = {_node(c) for c in checked}
    silent = [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]
    return Replies(checked, silent, round_trips)


def timed_send_and_receive(
    grid: Grid, messages: list[Message], timeout: float, poll_s: float = 0.1
) -> tuple[list[Message], dict[int, float]]:
    """Flower's `Grid.send_and_receive` (push, then pull until all replied or `timeout`), also
    returning each replying node's round trip in seconds (to within `poll_s`): the measured
    clock of a deployment."""
    start = time.monotonic()
    sent = {i: m for i, m in zip(grid.push_messages(messages), messages) if i}
    pending = set(sent)
    replies, seconds = [], {}
    while pending and time.monotonic() - start < timeout:
        for pulled in grid.pull_messages(pending):
            asked = sent.get(pulled.metadata.reply_to_message_id)
            reply = pulled if asked is None else _from_addressee(pulled, asked)
            replies.append(reply)
            seconds[reply.metadata.src_node_id] = time.monotonic() - start
            pending.discard(pulled.metadata.reply_to_message_id)
        if pending:
            time.sleep(poll_s)
    return replies, seconds


def _from_addressee(reply: Message, sent: Message) -> Message:
    """`reply` as from the node `sent` went to. The SuperLink answers for a node that went away
    ("node unavailable") under its own id (1); such a reply is rebuilt, with the same error or
    content, as that node's reply to `sent` (Flower's reply constructor), so every reply names
    the node it is about. Any other reply is returned as it is."""
    if reply.metadata.src_node_id == sent.metadata.dst_node_id:
        return reply
    if reply.has_error():
        return Message(reply.error, reply_to=sent)
    return Message(reply.content, reply_to=sent)


def _named(env: RoundEnv, messages: list[Message]) -> list[Message]:
    """With clients assigned to nodes (`RoundEnv.assigned`), each message with its client's id in
    its config record; else the messages as they are."""
    if not env.assigned:
        return messages
    return [with_config(m, {CLIENT_ID: env.roster.client(m.metadata.dst_node_id)}) for m in messages]


def _down_message(downlink: Downlink, cid: int, message: Message) -> Message:
    """`message` with the adapter replaced by the downlink record client `cid` needs (the delta
    or the whole adapter)."""
    content = RecordDict({DOWN_RECORD: downlink.record_for(cid), CONFIG_RECORD: message.content[CONFIG_RECORD]})
    return with_content(message, content)


def check_train(env: RoundEnv, reply: Message, sent: dict[int, AdapterState]) -> Checked:
    """Validate a train reply. A pruned client may end its round holding less than it was sent:
    its update then covers the slice of its final keep, which must lie within the one it was
    sent, and the rank it kept if it self-pruned (`sent` is updated to that slice and rank, what
    the update adds to)."""
    node = reply.metadata.src_node_id
    if problem := _identity_problem(env, reply):
        return Checked(reply, "rejected", problem)
    if not reply.has_error() and env.pruning is not None and PRUNE_RECORD in reply.content.config_records:
        held = env.pruning.held(env.roster.client(node))
        try:
            keep = Keep.from_json(str(reply.content[PRUNE_RECORD][FINAL_KEEP]))
            sent[node] = slice_adapter(sent[node], keep.within(held) if held is not None else keep)
        except (KeyError, ValueError) as err:
            return Checked(reply, "rejected", f"bad pruning keep in the reply: {err}")
    if not reply.has_error() and RANK_RECORD in reply.content.config_records:
        problem = _kept_rank_problem(env, reply, sent)
        if problem:
            return Checked(reply, "rejected", problem)
    if not reply.has_error() and env.privacy is not None and env.privacy.adaptive is not None:
        bit = reply.content.config_records[DP_RECORD].get(BELOW_CLIP) if DP_RECORD in reply.content else None
        if isinstance(bit, bool) or bit not in (0, 1):
            return Checked(
                reply, "rejected", f"adaptive clipping needs the reply's {DP_RECORD}.{BELOW_CLIP}, 0 or 1: got {bit!r}"
            )
    return check_train_reply(reply, env.strategy.uploaded(sent[node]))


def check_eval(env: RoundEnv, reply: Message) -> Checked:
    """Validate an evaluation reply (`check_eval_reply`) from the client its message was for."""
    problem = _identity_problem(env, reply)
    return Checked(reply, "rejected", problem) if problem else check_eval_reply(reply)


def _identity_problem(env: RoundEnv, reply: Message) -> str:
    """What is wrong with the client a reply says it is ("" if nothing): a reply's CLIENT_ID, when it
    has one, must be the client its node was addressed as (a node that played another client, or
    trained another partition, would be aggregated as the wrong client)."""
    if reply.has_error() or METRICS_RECORD not in reply.content.metric_records:
        return ""
    claimed = reply.content.metric_records[METRICS_RECORD].get(CLIENT_ID)
    addressed = env.roster.client(reply.metadata.src_node_id)
    if claimed is None or claimed == addressed:
        return ""
    return f"the reply says it is from client {claimed!r}, but its node was addressed as client {addressed}"


def _kept_rank_problem(env: RoundEnv, reply: Message, sent: dict[int, AdapterState]) -> str:
    """What is wrong with a reply's kept rank ("" if nothing): it must be an integer in [1, the rank
    the client was sent], from a client the strategy asked to self-prune. A smaller one cuts
    `sent[node]` to it (`strategies.hetlora.drop_tail`), as the client cut what it received."""
    node = reply.metadata.src_node_id
    if not env.strategy.instructions(env.rank(env.roster.client(node))).get(SELF_PRUNE, False):
        return (
            f"the reply names a kept rank (its {RANK_RECORD!r} record), but "
            f"{type(env.strategy).__name__} asks for no rank self-pruning"
        )
    sent_rank = next(iter(factors(sent[node], "A").values())).shape[0]
    kept = reply.content[RANK_RECORD].get(KEPT_RANK)
    if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= sent_rank:
        return (
            f"bad kept rank in the reply: {RANK_RECORD}.{KEPT_RANK} must be an integer in [1, {sent_rank}] "
            f"(the rank the client was sent), got {kept!r}"
        )
    if kept < sent_rank:
        sent[node] = drop_tail(sent[node], kept)
    return ""


def _sent_states(messages: list[Message]) -> dict[int, AdapterState]:
    """node id → the state its message carries (decoded once per distinct record)."""
    decoded: dict[int, AdapterState] = {}
    for m in messages:
        record = m.content[ARRAYS_RECORD]
        if not isinstance(record, ArrayRecord):
            raise TypeError(
                f"{ARRAYS_RECORD!r} of the message to node {m.metadata.dst_node_id} "
                f"is a {type(record).__name__}, not an ArrayRecord"
            )
        if id(record) not in decoded:
            decoded[id(record)] = from_record(record)
    return {m.metadata.dst_node_id: decoded[id(m.content[ARRAYS_RECORD])] for m in messages}


def problem_rows(env: RoundEnv, replies: Replies, server_round: int, kind: str) -> list[Row]:
    """A row for each node that never answered and each reply that is not ok."""
    rows = [
        _base_row(env, env.roster.client(n), server_round, kind, "failed", "no reply before the round timeout")
        for n in replies.silent
    ]
    return rows + [
        _base_row(env, env.roster.client(_node(c)), server_round, kind, c.status, c.reason)
        for c in replies.checked
        if c.status != "ok"
    ]


# --- time, aggregate, record ---------------------------------------------------------------


def time_replies(env: RoundEnv, ok: list[Checked], bytes_down: dict[int, int], round_trips: dict[int, float]) -> Timing:
    """Each ok reply's compute and link seconds — from its device (simulated) or its measured
    round trip (measured) — and the first per_round finishers within the deadline, kept (central
    DP: every one within the deadline; the Poisson sample has no fixed size)."""
    s = env.scenario
    up = np.array([payload_bytes(c.message.content) for c in ok], dtype=np.int64)
    if env.measured:  # the client's reported training time, the rest of the round trip
        compute = np.array([float(reply_metric(c.message, WALL_TIME_S)) for c in ok])
        trips = np.array([round_trips.get(_node(c), 0.0) for c in ok])
        comm = np.maximum(trips - compute, 0.0)
    else:
        cids = np.array([env.roster.client(_node(c)) for c in ok], dtype=np.int64)
        down = np.array([bytes_down[_node(c)] for c in ok], dtype=np.int64)
        compute = np.array([float(reply_metric(c.message, FLOPS)) for c in ok]) / env.fleet.flops[cids]
        comm = comm_seconds(down, up, env.fleet.down_bps[cids], env.fleet.up_bps[cids])
    k = len(ok) if env.privacy is not None and env.privacy.central else s.clients.per_round
    return Timing(compute, comm, keep_first_finishers(compute + comm, k, s.fleet.deadline_s), up)


def aggregate(
    env: RoundEnv, sent: dict[int, AdapterState], replies: list[Checked], server_round: int, factor: float
) -> AdapterState | None:
    """The strategy's `aggregate_train` over `replies` (updates scaled by `factor`); None without any."""
    if not replies:
        return None
    arrays, _ = env.strategy.aggregate_train(server_round, [_as_adapter_reply(c, sent, factor) for c in replies])
    return from_record(arrays) if arrays is not None else None


def best_alpha(env: RoundEnv, combined: Callable[[float], AdapterState | None]) -> float:
    """ComPEFT's α tuned by the server: clients encode with α = 1, so their kept entries are ±σ
    and a decoded update times α is exactly what they would have sent with α. Each α of the
    grid is aggregated (`combined(α)`; with privacy on, the global adapter moved by α·D̄) and
    scored by the held-out loss (`RoundEnv.score`); the best is returned."""
    assert env.score is not None
    losses = {
        a: env.score(combined(a) or {}) for a in env.scenario.compression.alpha_grid
    }  # never {}: asked with updates
    return min(losses, key=lambda a: (losses[a], a))


def private_mean(env: RoundEnv, base: AdapterState, kept: list[Checked], server_round: int) -> AdapterState:
    """DP-FedAvg's noised mean D̄ of the kept updates (`PrivacyBook.noised_mean`), each in the global
    adapter's coordinates (`fedsim.privacy.to_global`: B folded to s_g, ranks zero-padded to r_max, a
    pruned client's slice scattered back, zeros where it holds nothing), over the factors the strategy
    collects."""
    book, strategy = env.privacy, env.strategy
    assert book is not None
    like = {k: torch.zeros_like(v) for k, v in strategy.uploaded(split_state(base)[0]).items()}
    s_g, updates = strategy.scale(strategy.r_max), []
    for c in kept:
        assert c.update is not None  # ok replies carry their decoded update
        updates.append(to_global(c.update, strategy.scale(update_rank(c.update)), s_g, like, _reply_keep(c.message)))
    return book.noised_mean(updates, like, server_round)


def aggregate_private(
    env: RoundEnv, base: AdapterState, mean: AdapterState, server_round: int, factor: float
) -> AdapterState | None:
    """The strategy's `aggregate_train` over one pseudo-client: the global adapter `base` moved by
    factor·D̄ (`mean`), at r_max, unpruned, of weight 1. FedIT (and Flower's optimisers on it),
    FFA-LoRA and FedSA-LoRA then apply exactly factor·D̄: their rule over one client of weight 1 is
    that client's adapter (an optimiser steps by it minus the current one)."""
    moved = {k: v + factor * mean[k] if k in mean else v for k, v in split_state(base)[0].items()}
    metrics = MetricRecord({**{k: 0.0 for k in TRAIN_METRICS}, NUM_EXAMPLES: 1.0})
    content = RecordDict({ARRAYS_RECORD: to_record(moved), METRICS_RECORD: metrics})
    meta = Metadata(
        run_id=0, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id="", group_id=str(server_round),
        created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN,
    )  # fmt: skip
    arrays, _ = env.strategy.aggregate_train(server_round, [make_message(meta, content)])
    return from_record(arrays) if arrays is not None else None


def indicator_bits(kept: list[Checked]) -> list[float]:
    """Adaptive clipping's bits b_k of the kept replies (`check_train` validated them; [] without)."""
    records = [c.message.content.config_records.get(DP_RECORD) for c in kept]
    return [1.0 if r[BELOW_CLIP] == 1 else 0.0 for r in records if r is not None]


def record(
    env: RoundEnv,
    ok: list[Checked],
    timing: Timing,
    bytes_down: dict[int, int],
    gains: np.ndarray,
    factor: float,
    server_round: int,
) -> list[Row]:
    """A row per ok reply, kept or straggler; a kept reply's kept rank and final keep become the
    client's (`ClientRanks.keep`, `PruneBook.record`)."""
    s = env.scenario
    rows = []
    for i, c in enumerate(ok):
        cid, kept = env.roster.client(_node(c)), bool(timing.kept[i])
        status, reason = ("ok", "") if kept else ("straggler", _straggler_reason(float(timing.finish[i]), s))
        row = train_row(
            env, c, server_round, status, reason,
            float(timing.compute[i]), float(timing.comm[i]), int(timing.bytes_up[i]), int(bytes_down[_node(c)]),
        )  # fmt: skip
        row["contribution"] = float(gains[i])
        if kept and row["rank_kept"] < row["lora_rank"]:
            env.ranks.keep(cid, row["rank_kept"])
        if kept and s.compression.method == "compeft":
            row["alpha"] = factor if s.compression.alpha_auto else s.compression.alpha
        if env.pruning is not None:
            row["prune_ratio"] = float(reply_metric(c.message, PRUNE_RATIO, row["prune_ratio"]))
            if kept:
                env.pruning.record(cid, _reply_keep(c.message), s.train.local_steps)
        rows.append(row)
    return rows


BILLED = ("ok", "straggler", "stale")  # a train row's statuses that ran on the clock (stale: asynchronous)


def spend_energy(env: RoundEnv, rows: list[Row], round_s: float, t_start: float) -> float:
    """Bill a round's energy: set `energy_j` on each train row whose status ran on the clock (`BILLED`),
    drain those clients' batteries (`env.batteries`, when on), and return the fleet's total Σ_k E_k over them
    (`fedsim.fleet.energy.round_energy`: NaN when any E_k is unknown, 0 without such a row).

    Contract, for any round loop with its own timing: each billed row is one client (ids distinct)
    that received its message at simulated time `t_start`, and holds `client_id`, `sim_compute_s`,
    `sim_comm_s`, `bytes_up` and `bytes_down` (as `record` writes them); for it, the round ends at
    t_start + `round_s`. E_k is `client_energy` of its compute seconds and bytes and its idle wait
    max(0, round_s − finish_k), finish_k = compute + comm, at its device's figures (`client_joules`).
    On the simulated clock a client not done by round_s (a straggler) is cut there, when the server
    may address it again: it is billed what it got through (`fedsim.fleet.energy.cut_at`), its
    compute up to the cut, and no idle wait. On the measured clock nothing is cut (a real device ran
    to its finish) and E_k is its profile's power over its measured seconds: an estimate, not a
    meter's reading. Each battery is drained at t_start + min(finish_k, round_s) (measured: + finish_k),
    which must not come before that client's last drain, and no later round may ask a battery about a
    time before it (`Batteries.charge_at` refuses). Other rows (dropped, infeasible, failed, rejected;
    federated evaluation, which is not on the clock) are not billed and left as they are. `rows` are
    filled in place."""
    billed = [r for r in rows if r["kind"] == "train" and r["status"] in BILLED]
    if not billed:
        return 0.0
    cids = np.array([r["client_id"] for r in billed], dtype=np.int64)
    compute, comm, up, down = (
        np.array([float(r[k]) for r in billed]) for k in ("sim_compute_s", "sim_comm_s", "bytes_up", "bytes_down")
    )
    joules, stop_s = client_joules(env.fleet, cids, compute, comm, up, down, round_s, cut=not env.measured)
    for r, e in zip(billed, joules):
        r["energy_j"] = float(e)
    if env.batteries is not None:
        for t in np.unique(stop_s):  # each client once, in time order
            at = stop_s == t
            env.batteries.drain(cids[at], joules[at], t_start + float(t))
    return round_energy(joules)


def client_joules(
    fleet: Fleet,
    cids: np.ndarray,
    compute_s: np.ndarray,
    comm_s: np.ndarray,
    bytes_up: np.ndarray,
    bytes_down: np.ndarray,
    round_s: float,
    cut: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(E_k, the second of the round client k stopped at), elementwise over `cids` (`spend_energy`):
    `cut`, a client not done by `round_s` is billed what it got through by then, its link seconds
    split into download (its bytes over its downlink, the clock's) then upload."""
    finish = compute_s + comm_s
    wait = idle_wait(finish, round_s)
    if cut:
        down_s = np.minimum(comm_seconds(bytes_down, 0, fleet.down_bps[cids], fleet.up_bps[cids]), comm_s)
        compute_s, share_down, share_up = cut_at(round_s, down_s, compute_s, comm_s - down_s)
        bytes_down, bytes_up = bytes_down * share_down, bytes_up * share_up
        finish = np.minimum(finish, round_s)
    joules = client_energy(
        compute_s, bytes_up, bytes_down, wait,
        fleet.train_watts[cids], fleet.idle_watts[cids], fleet.radio_j_per_mb_up[cids], fleet.radio_j_per_mb_down[cids],
    )  # fmt: skip
    return joules, finish


def train_row(
    env: RoundEnv,
    checked: Checked,
    server_round: int,
    status: str,
    reason: str,
    compute_s: float,
    comm_s: float,
    bytes_up: int,
    bytes_down: int,
) -> Row:
    """The metrics row of an ok train reply on the clock (its client's row, its reported metrics,
    its seconds and bytes, the rank it kept, the norm of its decoded update), whichever loop timed it."""
    msg = checked.message
    row = _base_row(env, env.roster.client(_node(checked)), server_round, "train", status, reason)
    update = checked.update or {}
    row.update(
        _train_metrics(msg),
        flops=float(reply_metric(msg, FLOPS)),
        sim_compute_s=compute_s,
        sim_comm_s=comm_s,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        rank_kept=_reply_rank(msg, row["lora_rank"]),
        update_norm=math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values())),
    )
    return row


def contributions(env: RoundEnv, state: AdapterState, clients: list[ClientAdapter]) -> np.ndarray:
    """(n,) each client's contribution to the global model, for the controller's reward: the
    relative held-out loss decrease (L(θ) − L(θ_i)) / L(θ) of the global state moved by this
    client's share of an average, θ_i = θ + w_i·(a_i − θ) on the adapter, with a_i its adapter as
    the strategy aligns it for aggregation (padded to r_max, pruned-away coordinates at the
    global value; `LoraStrategy.aligned`) and w_i its example weight over the clients'.

    It sees what an update does to the global model, which the client's own loss cannot: LoRA
    trained on a pruned model can harm the unpruned one. The share w_i, not the whole a_i, is
    scored because with non-IID clients any one client's adapter alone soon scores worse on the
    mixed held-out set than the average does, whatever its arm, while the direction it pulls the
    average in stays informative. One held-out forward pass per client, over the first
    `controller.reward.contribution_examples` of the central set."""
    assert env.score is not None and env.scenario.controller is not None  # only a controller's reward asks for them
    if not clients:
        return np.zeros(0)
    total = sum(c.weight for c in clients)
    examples = env.scenario.controller.reward.contribution_examples
    before = env.score(state, examples)
    out = np.full(len(clients), np.nan)
    for i, client in enumerate(clients):
        mine = env.strategy.aligned([client], [1.0])[0]  # adapter keys, all of them in the global state
        share = client.weight / total if total > 0 else 1.0 / len(clients)
        after = env.score({**state, **{k: state[k] + share * (v - state[k]) for k, v in mine.items()}}, examples)
        if math.isfinite(before) and math.isfinite(after) and before > 0:
            out[i] = (before - after) / before
    return out


def round_bias(adapters: list[AdapterState], weights: list[float], s: Scenario) -> float:
    """The aggregation bias of this round's kept clients, ‖mean(s_k B_k)·mean(A_k) −
    mean(s_k B_k·A_k)‖_F / ‖mean(s_k B_k·A_k)‖_F (example-weighted means, ranks zero-padded,
    s_k = α / r_k), averaged over the adapted layers; NaN with fewer than two clients or when
    the server never sees B (fedsa_lora). It is what averaging LoRA factors (FedIT) gets wrong."""
    if len(adapters) < 2 or not factors(adapters[0], "B"):
        return float("nan")
    first_a = next(iter(factors(adapters[0], "A")))
    scales = [s.lora.alpha / a[first_a].shape[0] for a in adapters]
    per_layer = [
        aggregation_bias([a[ka] for a in adapters], [a[kb] for a in adapters], scales, weights)
        for ka, kb in layer_pairs(adapters[0]).values()
    ]
    return float(np.mean(per_layer))


def _client_adapter(checked: Checked, sent: dict[int, AdapterState], factor: float = 1.0) -> AdapterState:
    """The client's adapter: the LoRA tensors it was sent plus its (rescaled) decoded update on
    the factors it uploads."""
    assert checked.update is not None  # ok replies carry their decoded update
    start = split_state(sent[checked.message.metadata.src_node_id])[0]
    return {k: v + factor * checked.update[k] if k in checked.update else v for k, v in start.items()}


def _as_adapter_reply(checked: Checked, sent: dict[int, AdapterState], factor: float = 1.0) -> Message:
    """The reply as strategies see it, a new message (the received one is left as it is): the
    client's adapter (what it was sent + factor·decoded update) as its arrays, its checked metrics
    as its metrics — whatever codec carried it — and its pruning and kept-rank records, if any.
    Strategies read a reply's content only. It is built with Flower's reply constructor
    (`reply_to` the received reply), so its metadata is not the client's: the client's node is
    `checked.message.metadata.src_node_id`."""
    local = _client_adapter(checked, sent, factor)
    msg = checked.message
    # exactly the checked metrics: Flower averages them and refuses replies whose keys differ
    metrics = MetricRecord({k: reply_metric(msg, k) for k in TRAIN_METRICS})
    records = {r: msg.content[r] for r in (PRUNE_RECORD, RANK_RECORD) if r in msg.content.config_records}
    return Message(RecordDict({ARRAYS_RECORD: to_record(local), METRICS_RECORD: metrics, **records}), reply_to=msg)


def _reply_rank(msg: Message, trained: int) -> int:
    """The rank of the adapter a client sent back: the one it kept if it self-pruned (validated by
    `check_train`), else the rank it trained at."""
    if RANK_RECORD not in msg.content.config_records:
        return trained
    kept = msg.content[RANK_RECORD][KEPT_RANK]
    if not isinstance(kept, int):
        raise TypeError(f"the reply's kept rank {RANK_RECORD}.{KEPT_RANK} must be an integer, got {kept!r}")
    return int(kept)


def _reply_keep(msg: Message) -> Keep | None:
    """The keep a pruned client ended its round with (validated by `check_train`)."""
    return (
        Keep.from_json(str(msg.content[PRUNE_RECORD][FINAL_KEEP]))
        if PRUNE_RECORD in msg.content.config_records
        else None
    )


def _bytes_by_node(messages: list[Message]) -> dict[int, int]:
    """Payload bytes of each message; messages sharing one content are measured once."""
    sizes: dict[int, int] = {}
    for m in messages:
        if id(m.content) not in sizes:
            sizes[id(m.content)] = payload_bytes(m.content)
    return {m.metadata.dst_node_id: sizes[id(m.content)] for m in messages}


def _straggler_reason(finish_s: float, s: Scenario) -> str:
    if s.fleet.deadline_s > 0 and finish_s > s.fleet.deadline_s:
        return f"finished at {finish_s:.1f}s, after the {s.fleet.deadline_s:g}s deadline"
    return f"not among the first {s.clients.per_round} to finish (over-commitment)"


def _train_metrics(msg: Message) -> Row:
    return {
        "num_examples": int(reply_metric(msg, NUM_EXAMPLES)),
        "loss": float(reply_metric(msg, TRAIN_LOSS)),
        "loss_before": float(reply_metric(msg, LOSS_BEFORE)),
        "loss_after": float(reply_metric(msg, LOSS_AFTER)),
        "tokens": int(reply_metric(msg, TOKENS)),
        "wall_time_s": float(reply_metric(msg, WALL_TIME_S)),
    }


def _node(checked: Checked) -> int:
    """The node a checked reply is from."""
    return checked.message.metadata.src_node_id


def _base_row(env: RoundEnv, cid: int, server_round: int, kind: str, status: str, reason: str = "") -> Row:
    row = {
        "round": server_round, "client_id": cid, "kind": kind, "status": status, "reason": reason,
        "device": str(env.fleet.device[cid]), "lora_rank": env.rank(cid),
    }  # fmt: skip
    if env.pruning is not None:
        row.update(prune_target=float(env.pruning.targets[cid]), prune_ratio=env.pruning.ratio(env.pruning.held(cid)))
    return row


def _config(scenario: Scenario) -> ConfigRecord:
    return ConfigRecord({SCENARIO: scenario.to_json()})


def _train_config(env: RoundEnv) -> ConfigRecord:
    """A train message's config: the scenario and, privacy on, the round's DP entries (`PrivacyBook.client_config`)."""
    book, strategy = env.privacy, env.strategy
    extra = book.client_config(strategy.scale(strategy.r_max)) if book is not None else {}
    return ConfigRecord({SCENARIO: env.scenario.to_json(), **extra})


# --- federated evaluation ------------------------------------------------------------------


def eval_round(env: RoundEnv, state: AdapterState, server_round: int, t_now: float) -> list[Row]:
    """Federated evaluation on clients online at `t_now` (and, with batteries, charged above their threshold).
    It is not on the simulated clock, and not billed energy."""
    s = env.scenario
    if s.clients.eval_per_round == 0:
        return []
    ids = env.roster.ids
    online = ids if env.measured else ids[env.fleet.availability.online(ids, t_now, server_round)]
    if env.batteries is not None:
        online = online[env.batteries.available(online, t_now)]
    chosen = sample_clients(online, s.clients.eval_per_round, s.seed, server_round, "eval")
    if not chosen:
        return []
    env.roster.seat(chosen)
    nodes = [env.roster.node(c) for c in chosen]
    env.assign_ranks(chosen)
    messages = env.strategy.configure_evaluate(
        server_round, to_record(state), _config(s), Participants(env.grid, nodes)
    )
    replies = send(env, _named(env, list(messages)), lambda r: check_eval(env, r))
    rows = problem_rows(env, replies, server_round, "eval_client")
    for c in replies.ok:
        m = c.message
        row = _base_row(env, env.roster.client(_node(c)), server_round, "eval_client", "ok")
        row.update(
            num_examples=int(reply_metric(m, NUM_EXAMPLES)),
            loss=float(reply_metric(m, LOSS)),
            accuracy=float(reply_metric(m, ACCURACY)),
            wall_time_s=float(reply_metric(m, WALL_TIME_S)),
        )
        rows.append(row)
    return sorted(rows, key=lambda r: r["client_id"])
