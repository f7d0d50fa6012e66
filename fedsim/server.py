"""The server side of a fedsim run: discover clients, then rounds of train → validate →
aggregate → evaluate → record.

`run_federation` is fedsim's round loop. It follows Flower's `Strategy.start` step for step and
calls the strategy's own Flower hooks (`configure_train`, `aggregate_train`, `configure_evaluate`,
`aggregate_evaluate`), but owns what `start` has no place for: sampling by client id with a
seeded generator (Flower's node ids are random, and `sample_nodes` uses the global `random`),
validating each reply on its own before aggregation (Flower raises on one bad reply), and writing
metrics and a PEFT checkpoint after every round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.adapter import AdapterState, attach_lora, from_record, get_state, save_adapter, set_state, to_record
from fedsim.data import central_test_set
from fedsim.models import load_model
from fedsim.replies import Checked, check_eval_reply, check_train_reply
from fedsim.rundir import RunDir
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed
from fedsim.training import evaluate
from strategies import build_strategy

log = logging.getLogger(__name__)
ProgressFn = Callable[[dict[str, Any]], None]


class Participants(Grid):
    """A view of `grid` that shows only the nodes fedsim sampled, so a Flower strategy's own
    `configure_*` (which samples from `grid.get_node_ids()`) addresses exactly them."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._ids = grid, list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def set_run(self, run):  # type: ignore[no-untyped-def]
        return self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return self._grid.send_and_receive(messages, timeout=timeout)


def discover_clients(grid: Grid, scenario: Scenario) -> dict[int, int]:
    """client id → node id, by asking every node which partition it holds (a `query` message)."""
    config = ConfigRecord({"scenario": scenario.to_json()})
    node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    clients: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=scenario.simulation.round_timeout_s):
        if reply.has_error():
            log.warning("node %d did not identify itself: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        cid = int(reply.content["identity"]["client-id"])
        if cid in clients:
            raise RuntimeError(f"two nodes claim client id {cid}: {clients[cid]} and {reply.metadata.src_node_id}")
        clients[cid] = reply.metadata.src_node_id
    if not clients:
        raise RuntimeError("no client identified itself; see the client errors above")
    return clients


def sample_clients(available: list[int], k: int, seed: int, server_round: int, purpose: str) -> list[int]:
    """k client ids drawn without replacement, a pure function of (seed, round, purpose)."""
    rng = np.random.default_rng(derive_seed(seed, server_round, purpose))
    k = min(k, len(available))
    return sorted(int(c) for c in rng.choice(sorted(available), size=k, replace=False))


def _sorted_by_client(checked: list[Checked], node_to_client: dict[int, int]) -> list[Checked]:
    return sorted(checked, key=lambda c: node_to_client[c.message.metadata.src_node_id])


def _train_row(c: Checked, cid: int, server_round: int) -> dict[str, Any]:
    row: dict[str, Any] = {"round": server_round, "client_id": cid, "kind": "train", "status": c.status, "reason": c.reason}
    if c.status == "ok":
        m = c.message.content["metrics"]
        row.update(
            num_examples=int(m["num-examples"]),
            loss=float(m["train-loss"]),
            loss_before=float(m["loss-before"]),
            loss_after=float(m["loss-after"]),
            tokens=int(m["tokens"]),
            wall_time_s=float(m["wall-time-s"]),
        )
    return row


def _eval_row(c: Checked, cid: int, server_round: int) -> dict[str, Any]:
    row: dict[str, Any] = {"round": server_round, "client_id": cid, "kind": "eval_client", "status": c.status, "reason": c.reason}
    if c.status == "ok":
        m = c.message.content["metrics"]
        row.update(
            num_examples=int(m["num-examples"]),
            loss=float(m["loss"]),
            accuracy=float(m["accuracy"]),
            wall_time_s=float(m["wall-time-s"]),
        )
    return row


def _missing_rows(sent: list[int], got: list[Checked], node_to_client: dict[int, int], server_round: int, kind: str) -> list[dict[str, Any]]:
    """Rows for clients that never answered within the round's timeout."""
    answered = {c.message.metadata.src_node_id for c in got}
    return [
        {"round": server_round, "client_id": node_to_client[n], "kind": kind, "status": "failed", "reason": "no reply before the round timeout"}
        for n in sent
        if n not in answered
    ]


class CentralEvaluator:
    """The server's copy of base model + LoRA, for central evaluation and for saving checkpoints."""

    def __init__(self, scenario: Scenario) -> None:
        base, self.tokenizer = load_model(scenario.model.name, dtype=scenario.model.dtype)
        self.model = attach_lora(base, scenario.lora, derive_seed(scenario.seed, "lora-init"))
        test = list(central_test_set(scenario.data, scenario.seed))
        self.examples = test[: scenario.eval.central_examples or None]
        self.scenario = scenario

    def initial_state(self) -> AdapterState:
        return get_state(self.model)

    def __call__(self, state: AdapterState, server_round: int, elapsed: float) -> dict[str, Any]:
        set_state(self.model, state)
        e, t = self.scenario.eval, self.scenario.train
        res = evaluate(self.model, self.tokenizer, self.examples, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, max_len=t.max_seq_len)
        return {"round": server_round, "client_id": -1, "kind": "eval_central", "num_examples": res.num_examples, "loss": res.loss, "accuracy": res.accuracy, "wall_time_s": elapsed}


def _train_round(
    strategy: Strategy, grid: Grid, scenario: Scenario, state: AdapterState, clients: dict[int, int], server_round: int
) -> tuple[AdapterState, list[dict[str, Any]]]:
    node_to_client = {n: c for c, n in clients.items()}
    chosen = sample_clients(list(clients), scenario.clients.per_round, scenario.seed, server_round, "train")
    nodes = [clients[c] for c in chosen]
    config = ConfigRecord({"scenario": scenario.to_json()})
    messages = strategy.configure_train(server_round, to_record(state), config, Participants(grid, nodes))
    replies = list(grid.send_and_receive(messages, timeout=scenario.simulation.round_timeout_s))
    checked = _sorted_by_client([check_train_reply(r, state) for r in replies], node_to_client)
    rows = [_train_row(c, node_to_client[c.message.metadata.src_node_id], server_round) for c in checked]
    rows += _missing_rows(nodes, checked, node_to_client, server_round, "train")
    valid = [c.message for c in checked if c.status == "ok"]
    if valid:
        arrays, _ = strategy.aggregate_train(server_round, valid)
        if arrays is not None:
            state = from_record(arrays)
    return state, rows


def _eval_round(
    strategy: Strategy, grid: Grid, scenario: Scenario, state: AdapterState, clients: dict[int, int], server_round: int
) -> list[dict[str, Any]]:
    if scenario.clients.eval_per_round == 0:
        return []
    node_to_client = {n: c for c, n in clients.items()}
    chosen = sample_clients(list(clients), scenario.clients.eval_per_round, scenario.seed, server_round, "eval")
    nodes = [clients[c] for c in chosen]
    config = ConfigRecord({"scenario": scenario.to_json()})
    messages = strategy.configure_evaluate(server_round, to_record(state), config, Participants(grid, nodes))
    replies = list(grid.send_and_receive(messages, timeout=scenario.simulation.round_timeout_s))
    checked = _sorted_by_client([check_eval_reply(r) for r in replies], node_to_client)
    rows = [_eval_row(c, node_to_client[c.message.metadata.src_node_id], server_round) for c in checked]
    return rows + _missing_rows(nodes, checked, node_to_client, server_round, "eval_client")


def run_federation(grid: Grid, scenario: Scenario, run_dir: RunDir, progress: ProgressFn | None = None) -> AdapterState:
    """Run every round of `scenario` on `grid`, recording into `run_dir`; returns the final adapter."""
    start = time.perf_counter()
    run_dir.event("run_start", scenario=scenario.name, seed=scenario.seed)
    central = CentralEvaluator(scenario)
    state = central.initial_state()
    strategy = build_strategy(scenario)
    clients = discover_clients(grid, scenario)
    run_dir.event("clients", count=len(clients))
    row0 = central(state, 0, time.perf_counter() - start)
    run_dir.add_rows([row0])
    _report(progress, run_dir, 0, scenario.rounds, [row0])
    for server_round in range(1, scenario.rounds + 1):
        t_round = time.perf_counter()
        state, rows = _train_round(strategy, grid, scenario, state, clients, server_round)
        train_time = time.perf_counter() - t_round
        rows += _eval_round(strategy, grid, scenario, state, clients, server_round)
        rows.append(central(state, server_round, time.perf_counter() - start))
        save_adapter(central.model, state, run_dir.checkpoint_path(server_round))
        run_dir.add_rows(rows)
        for r in rows:
            if r.get("status", "ok") != "ok":
                run_dir.event("client_problem", round=server_round, client_id=r["client_id"], kind=r["kind"], status=r["status"], reason=r["reason"])
        _report(progress, run_dir, server_round, scenario.rounds, rows, train_time_s=train_time)
    save_adapter(central.model, state, run_dir.adapter_path)
    run_dir.event("run_end", wall_time_s=time.perf_counter() - start)
    return state


def _report(
    progress: ProgressFn | None, run_dir: RunDir, server_round: int, rounds: int, rows: list[dict[str, Any]], train_time_s: float = 0.0
) -> None:
    """Log the round's summary (`train_time_s`: wall time of sending, training and aggregating)."""
    central = next(r for r in rows if r["kind"] == "eval_central")
    train = [r for r in rows if r["kind"] == "train" and r.get("status", "ok") == "ok"]
    summary = {
        "round": server_round,
        "rounds": rounds,
        "train_loss": float(np.mean([r["loss"] for r in train])) if train else float("nan"),
        "clients_ok": len(train),
        "clients_failed": sum(1 for r in rows if r["kind"] == "train" and r.get("status") != "ok"),
        "central_loss": central["loss"],
        "central_accuracy": central["accuracy"],
        "elapsed_s": central["wall_time_s"],
        "train_time_s": train_time_s,
    }
    run_dir.event("round_end", **summary)
    if progress is not None:
        progress(summary)
