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

Which factors travel is per strategy (`downloads`, `uploads`); what the client must do differently
(freeze A, keep a personal B, add a penalty) travels in the message's config (`instructions`).
Strategies that merge into the frozen base add `<layer>.base_delta` tensors to the global state
(see `fedsim.adapter`); they travel to clients with the adapter, dense, and their bytes count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.adapter import AdapterState, factors, from_record, split_state
from strategies.lora_math import layer_pairs, truncate, zero_pad

# fedsim picks the participants itself (seeded, by client id) and hands a strategy a grid that
# holds only them, so a strategy must take every node it sees and never wait for more.
SAMPLING: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 0,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 0,
}


@dataclass(frozen=True)
class ClientAdapter:
    """One client's adapter after local training, as a strategy aggregates it."""

    state: AdapterState  # LoRA tensors at the client's rank (the factors it did not upload: as sent)
    rank: int
    scale: float  # s_k = α / r_k
    weight: float  # its number of training examples


class LoraStrategy(FedAvg):
    """Base of fedsim's LoRA strategies: per-node ranks, per-node messages, scale folding."""

    downloads: ClassVar[str] = "AB"  # factors sent to a client ("A" alone: it keeps its own B)
    uploads: ClassVar[str] = "AB"  # factors a client sends back
    freeze: ClassVar[str] = ""  # factors the client must not train

    def __init__(self, rank: int, alpha: float, seed: int = 0) -> None:
        super().__init__(**SAMPLING)
        self.r_max, self.alpha, self.seed = rank, alpha, seed
        self.ranks: dict[int, int] = {}
        self.current: AdapterState = {}

    # --- ranks ------------------------------------------------------------------------------

    def assign_ranks(self, ranks: Mapping[int, int]) -> None:
        """node id → LoRA rank for the coming messages (unassigned nodes train at r_max)."""
        bad = {n: r for n, r in ranks.items() if not 1 <= r <= self.r_max}
        if bad:
            raise ValueError(f"ranks {bad} outside [1, {self.r_max}]: the global adapter (rank {self.r_max}) cannot serve them")
        self.ranks = dict(ranks)

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
        return {"lora-rank": rank, "lora-uploads": self.uploads, "lora-freeze": self.freeze, "lora-personal-b": "B" not in self.downloads}

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

    # --- Flower hooks -----------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = from_record(arrays)
        return self._per_node(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._per_node(super().configure_evaluate(server_round, arrays, config, grid), from_record(arrays))

    def _per_node(self, messages: Iterable[Message], state: AdapterState | None = None) -> list[Message]:
        """Give each message its node's slice and instructions. FedAvg builds one content for all;
        here nodes of one rank share one, so it is built, and its bytes measured, once per rank."""
        state = self.current if state is None else state
        out, by_rank = [], {}
        for m in messages:
            rank = self.ranks.get(m.metadata.dst_node_id, self.r_max)
            if rank not in by_rank:
                config = ConfigRecord({**m.content["config"], **self.instructions(rank)})
                by_rank[rank] = RecordDict({"arrays": ArrayRecord(self.client_state(state, rank)), "config": config})
            m.content = by_rank[rank]
            out.append(m)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each reply's 'arrays' is the client's adapter (fedsim rebuilds it from the decoded
        update); the rule is `aggregate`, Flower's metric aggregation is kept."""
        replies = list(replies)
        if not replies:
            return None, None
        clients = [self._client(r) for r in replies]
        state = self.aggregate(server_round, clients)
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return ArrayRecord(state), metrics

    def _client(self, reply: Message) -> ClientAdapter:
        state = from_record(reply.content["arrays"])
        rank = int(next(iter(factors(state, "A").values())).shape[0])
        return ClientAdapter(state, rank, self.scale(rank), float(reply.content["metrics"][self.weighted_by_key]))

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        """The new global state (adapter at r_max, plus base deltas if the rule merges)."""
        raise NotImplementedError

