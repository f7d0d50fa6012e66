"""What every fedsim strategy shares: a global adapter at rank r_max, clients at their own ranks.

Each strategy is a Flower Message-API strategy (a `FedAvg`), driven by fedsim's round loop
through Flower's hooks. This base class owns the rank plumbing; a subclass states its rule in
`aggregate` (the math lives in `strategies.lora_math`, tested against direct formulas).

Downlink. The server keeps the global adapter at r_max = `lora.rank`, scaling s_g = α / r_max.
fedsim assigns each sampled node a rank (`assign_ranks`, from the scenario or the controller); a
client of rank r_k trains a PEFT adapter whose scaling is PEFT's own s_k = α / r_k, and receives
the first r_k ranks with B folded so that it starts from the global update's truncation:

    A_k = A[:r_k, :],   B_k = (s_g / s_k) B[:, :r_k],   hence  s_k B_k A_k = s_g B[:, :r_k] A[:r_k, :].

Uplink. Each reply's adapter (rank r_k, read from its shapes) reaches `aggregate` as a
`ClientAdapter` with s_k and the client's example count; the rules fold s_k back
(B'_k = (s_k / s_g) B_k) and so aggregate the updates the clients actually made, s_k B_k A_k.
Averaging raw factors instead weights a rank-r client's product by α/r — the scaling pitfall of
public FLoRA code, which stacks raw B_k and applies one α/Σr to the stack.

Mixed ranks (`strategies.lora_math`, "Mixed ranks"). How a reply's missing ranks are read is the
strategy's `padding`: "zeros" (they are zeros the client holds) or "holders" (each rank coordinate
is averaged over the clients that hold it, a rank nobody held this round stays as it was). Each
strategy's `paper_padding` is what its paper does or, where the paper assumes one rank for all,
"holders"; the scenario's `strategy.rank_padding` overrides it.

Which factors travel is per strategy (`downloads`, `uploads`); what the client must do differently
(freeze A, keep a personal B, add a penalty) travels in the message's config (`instructions`).
Strategies that merge into the frozen base add `<layer>.base_delta` tensors to the global state
(see `fedsim.model.adapter`); they travel to clients with the adapter, dense, and their bytes count.

Pruned clients (`fedsim.pruning`). The global adapter keeps the unpruned shape. A pruned node
(`assign_pruning`) receives the slice of its rank's state that matches the heads and channels it
kept (`slicing.slice_adapter`) and its pruning order in the config (`fedsim.fleet.keeps`); its reply
names the keep it ended the round with, and the client's adapter is scattered back to the unpruned
shape with a coverage mask (`ClientAdapter.mask`). Strategies that average factors coordinate by
coordinate (FedIT, HetLoRA, FFA-LoRA, FedSA-LoRA) fill each client's uncovered coordinates with the
weighted mean of those that covered them (`slicing.fill_uncovered`), so their own rule yields the
mask-aware mean, and a coordinate nobody kept stays as it was. The others set `pruning_refused` to
the reason.

State across rounds. What a strategy carries from one round to the next besides the global state
is its `state_dict` (named arrays), saved with every round's checkpoint and put back on resume
(`load_state_dict`, `fedsim.server.resume`). Only FedIT with a Flower server optimiser keeps any
(`strategies.flower_optimizers`): the ranks, pruning orders and `current` adapter are set afresh
every round; base deltas (FLoRA, FedEx-LoRA) are in the global state; HetLoRA's kept ranks are the
server's books (`fedsim.fleet.ranks`); FedSA-LoRA's personal B lives on the clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.model.adapter import AdapterState, factors, from_record, split_state
from fedsim.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    FINAL_KEEP,
    LORA_FREEZE,
    LORA_PERSONAL_B,
    LORA_RANK,
    LORA_UPLOADS,
    METRICS_RECORD,
    NUM_EXAMPLES,
    PRUNE_RECORD,
)
from fedsim.pruning.slicing import fill_uncovered, scatter_adapter, slice_adapter
from fedsim.pruning.structure import Keep
from strategies.lora_math import RANK_PADDINGS, fedit, layer_pairs, truncate, update_stack, zero_pad

# fedsim picks the participants itself (seeded, by client id) and hands a strategy a grid that
# holds only them, so a strategy must take every node it sees and never wait for more.
SAMPLING: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 0,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 0,
}
# The record names and weight key Flower's FedAvg reads and writes, spelled as fedsim's protocol
# spells them (they are FedAvg's defaults; naming them keeps both sides on `fedsim.protocol`).
RECORD_KEYS: dict[str, Any] = {
    "weighted_by_key": NUM_EXAMPLES,
    "arrayrecord_key": ARRAYS_RECORD,
    "configrecord_key": CONFIG_RECORD,
}


def with_content(message: Message, content: RecordDict) -> Message:
    """A new message to `message`'s node (same type, group and TTL) carrying `content`, built as
    Flower's `Grid.create_message` builds one; `message` is left as it is."""
    meta = message.metadata
    return Message(content, meta.dst_node_id, meta.message_type, ttl=meta.ttl, group_id=meta.group_id)


def with_config(message: Message, entries: Mapping[str, Any]) -> Message:
    """`with_content(message, …)` of its records with `entries` added to its config record (a
    simulation's client id, a pack, a device's steps); `message` is left as it is."""
    records = dict(message.content.items())
    records[CONFIG_RECORD] = ConfigRecord({**message.content.config_records[CONFIG_RECORD], **entries})
    return with_content(message, RecordDict(records))


@dataclass(frozen=True)
class ClientAdapter:
    """One client's adapter after local training, as a strategy aggregates it."""

    state: AdapterState  # LoRA tensors at the client's rank (the factors it did not upload: as sent)
    rank: int
    scale: float  # s_k = α / r_k
    weight: float  # its number of training examples
    mask: AdapterState | None = None  # pruned client: True where `state` holds what it trained


class LoraStrategy(FedAvg):
    """Base of fedsim's LoRA strategies: per-node ranks, per-node messages, scale folding."""

    downloads: ClassVar[str] = "AB"  # factors sent to a client ("A" alone: it keeps its own B)
    uploads: ClassVar[str] = "AB"  # factors a client sends back
    freeze: ClassVar[str] = ""  # factors the client must not train
    pruning_refused: ClassVar[str] = ""  # why this rule cannot aggregate pruned clients ("" = it can)
    paper_padding: ClassVar[str] = "holders"  # how the paper reads a reply's missing ranks (RANK_PADDINGS)

    def __init__(self, rank: int, alpha: float, seed: int = 0, padding: str | None = None) -> None:
        super().__init__(**SAMPLING, **RECORD_KEYS)
        if padding is not None and (padding not in RANK_PADDINGS or self.paper_padding not in RANK_PADDINGS):
            allowed = (
                f"one of {RANK_PADDINGS} or None (the paper's, {self.paper_padding!r})"
                if self.paper_padding in RANK_PADDINGS
                else "None"
            )
            raise ValueError(f"{type(self).__name__}: `padding` must be {allowed}, got {padding!r}")
        self.r_max, self.alpha, self.seed = rank, alpha, seed
        self.padding = padding or self.paper_padding
        self.ranks: dict[int, int] = {}
        self.pruning: dict[int, tuple[Keep | None, dict[str, Any]]] = {}
        self.current: AdapterState = {}

    # --- ranks ------------------------------------------------------------------------------

    def assign_ranks(self, ranks: Mapping[int, int]) -> None:
        """node id → LoRA rank for the coming messages (unassigned nodes train at r_max)."""
        bad = {n: r for n, r in ranks.items() if not 1 <= r <= self.r_max}
        if bad:
            raise ValueError(
                f"ranks {bad} outside [1, {self.r_max}]: the global adapter (rank {self.r_max}) cannot serve them"
            )
        self.ranks = dict(ranks)

    def assign_pruning(self, orders: Mapping[int, tuple[Keep | None, dict[str, Any]]]) -> None:
        """node id → (the keep of the model it holds, None = unpruned; the config entries of its
        pruning order) for the coming messages; nodes absent are not pruned."""
        if orders and self.pruning_refused:
            raise ValueError(f"{type(self).__name__} cannot aggregate pruned clients: {self.pruning_refused}")
        self.pruning = dict(orders)

    def scale(self, rank: int) -> float:
        return self.alpha / rank

    def client_state(self, state: AdapterState, rank: int) -> AdapterState:
        """What a rank-`rank` client receives: the truncated, folded factors it downloads, and
        the base deltas."""
        adapter, deltas = split_state(state)
        out: AdapterState = {f"{prefix}.base_delta": d for prefix, d in deltas.items()}
        fold = self.scale(self.r_max) / self.scale(rank)
        for a_key, b_key in layer_pairs(adapter).values():
            A, B = truncate(adapter[a_key], adapter[b_key], rank)
            if "A" in self.downloads:
                out[a_key] = A
            if "B" in self.downloads:
                out[b_key] = B * fold
        return out

    def instructions(self, rank: int) -> dict[str, Any]:
        """Config entries telling the client how to train this strategy's adapter."""
        return {
            LORA_RANK: rank,
            LORA_UPLOADS: self.uploads,
            LORA_FREEZE: self.freeze,
            LORA_PERSONAL_B: "B" not in self.downloads,
        }

    def uploaded(self, sent: AdapterState) -> AdapterState:
        """The tensors of a client's state that its reply's update must cover."""
        return factors(sent, self.uploads)

    def padded(self, client: ClientAdapter) -> AdapterState:
        """A client's adapter at r_max with its scaling folded into B (s_g B' A = s_k B A)."""
        out = dict(client.state)
        fold = client.scale / self.scale(self.r_max)
        for a_key, b_key in layer_pairs(client.state).values():
            A, B = zero_pad(client.state[a_key], client.state[b_key], self.r_max)
            out[a_key], out[b_key] = A, B * fold
        return out

    def padded_mask(self, client: ClientAdapter) -> AdapterState | None:
        """Which coordinates of `padded(client)` the client holds (None: all). A padded rank is held
        under "zeros" (a zero, in the rows and columns the client kept), not under "holders"."""
        if client.mask is None and (client.rank == self.r_max or self.padding == "zeros"):
            return None
        mask = (
            client.mask
            if client.mask is not None
            else {k: torch.ones(v.shape, dtype=torch.bool) for k, v in client.state.items()}
        )
        return {  # A (r_k, in): pad rows; B (out, r_k): pad columns; other tensors as they are
            k: self.padded_rows_mask(m) if ".lora_A." in k else self.padded_rows_mask(m.T).T if ".lora_B." in k else m
            for k, m in mask.items()
        }

    def padded_rows_mask(self, A: torch.Tensor) -> torch.Tensor:
        """An A factor's coverage (r_k, in) at r_max rows: a padded rank covers the columns the
        client kept under "zeros", nothing under "holders"."""
        tail = A[:1].expand(self.r_max - A.shape[0], -1)
        return torch.cat([A, tail if self.padding == "zeros" else torch.zeros_like(tail)])

    def aligned(self, clients: list[ClientAdapter], weights: list[float]) -> list[AdapterState]:
        """Each client's `padded` adapter, the coordinates it pruned away filled for a
        `weights`-weighted mean (`slicing.fill_uncovered`; the global value where nobody kept them)."""
        states = [self.padded(c) for c in clients]
        previous = {k: v for k, v in split_state(self.current)[0].items() if k in states[0]}
        return fill_uncovered(states, [self.padded_mask(c) for c in clients], weights, previous)

    def mean_factors(self, clients: list[ClientAdapter]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer prefix → FedIT's (A, B): the example-weighted means of the clients' `aligned`
        factors (padded per `padding`, B folded to the global scaling s_g)."""
        weights, s_g = [c.weight for c in clients], self.scale(self.r_max)
        aligned = self.aligned(clients, weights)
        folded = [s_g] * len(clients)  # `aligned` already carries each s_k / s_g in B
        return {
            prefix: fedit([s[a] for s in aligned], [s[b] for s in aligned], folded, weights, self.r_max, s_g=s_g)
            for prefix, (a, b) in layer_pairs(split_state(self.current)[0]).items()
        }

    def update_stack(self, clients: list[ClientAdapter], a_key: str, b_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_s, A_s) with B_s A_s = one layer's ideal update ΔW* under `padding` (`lora_math.update_stack`;
        "holders" measures each client's change from what it was sent, the current global adapter)."""
        received = (
            (self.current[a_key], self.current[b_key], self.scale(self.r_max)) if self.padding == "holders" else None
        )
        As, Bs = [c.state[a_key] for c in clients], [c.state[b_key] for c in clients]
        return update_stack(As, Bs, [c.scale for c in clients], [c.weight for c in clients], received)

    # --- state across rounds ----------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """What this strategy carries from one round to the next besides the global state, as named
        arrays in a fixed order (module docstring, "State across rounds"): here nothing, {}."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Put back what `state_dict` returned, so the next round aggregates as it would have;
        ValueError for a state this strategy does not keep (here: anything)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state across rounds, got {sorted(state)[:3]}")

    # --- Flower hooks -----------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = from_record(arrays)
        return self._per_node(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._per_node(super().configure_evaluate(server_round, arrays, config, grid), from_record(arrays))

    def _per_node(self, messages: Iterable[Message], state: AdapterState | None = None) -> list[Message]:
        """Each of Flower's messages rebuilt with its node's slice and instructions. FedAvg builds
        one content for all; here nodes of one rank share one, so it is built, and its bytes
        measured, once per rank."""
        state = self.current if state is None else state
        out, by_part = [], {}
        for m in messages:
            node = m.metadata.dst_node_id
            rank, (keep, order) = self.ranks.get(node, self.r_max), self.pruning.get(node, (None, {}))
            part = (rank, keep.to_json() if keep is not None else "", *sorted(order.items()))
            if part not in by_part:
                config = ConfigRecord({**m.content.config_records[CONFIG_RECORD], **self.instructions(rank), **order})
                sliced = (
                    self.client_state(state, rank)
                    if keep is None
                    else slice_adapter(self.client_state(state, rank), keep)
                )
                by_part[part] = RecordDict({ARRAYS_RECORD: ArrayRecord(sliced), CONFIG_RECORD: config})
            out.append(with_content(m, by_part[part]))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each reply's 'arrays' is the client's adapter (fedsim rebuilds it from the decoded
        update); the rule is `aggregate`, Flower's metric aggregation is kept."""
        replies = list(replies)
        if not replies:
            return None, None
        clients = [self.client_adapter(r) for r in replies]
        state = self.aggregate(server_round, clients)
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return ArrayRecord(state), metrics

    def client_adapter(self, reply: Message) -> ClientAdapter:
        """A reply (client adapter under "arrays") as `aggregate` sees it: scattered to the
        unpruned shape with its coverage mask when the client pruned."""
        state = from_record(reply.content.array_records[ARRAYS_RECORD])
        rank = int(next(iter(factors(state, "A").values())).shape[0])
        value = reply.content.metric_records[METRICS_RECORD][self.weighted_by_key]
        if isinstance(value, list):
            raise TypeError(f"reply metric `{self.weighted_by_key}` must be a single number, got a list: {value!r}")
        weight = float(value)
        if PRUNE_RECORD not in reply.content.config_records:
            return ClientAdapter(state, rank, self.scale(rank), weight)
        keep = Keep.from_json(str(reply.content[PRUNE_RECORD][FINAL_KEEP]))
        full, mask = scatter_adapter(state, keep, {k: self._full_shape(k, rank) for k in state})
        return ClientAdapter(full, rank, self.scale(rank), weight, mask)

    def _full_shape(self, key: str, rank: int) -> tuple[int, ...]:
        """The unpruned shape of a client's tensor at its rank (A: (r_k, in), B: (out, r_k))."""
        shape = list(self.current[key].shape)
        if ".lora_A." in key:
            shape[0] = rank
        elif ".lora_B." in key and key.endswith(".weight"):
            shape[1] = rank
        return tuple(shape)

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        """The new global state (adapter at r_max, plus base deltas if the rule merges)."""
        raise NotImplementedError
