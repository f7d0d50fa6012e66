"""The server side of a fedsim run: discover clients, then rounds of train → validate →
aggregate → evaluate → record, on the fleet's simulated clock.

`run_federation` is fedsim's round loop. It follows Flower's `Strategy.start` step for step and
calls the strategy's own Flower hooks (`configure_train`, `aggregate_train`, `configure_evaluate`,
`aggregate_evaluate`), but owns what `start` has no place for: the fleet (who is online, who
fits, how long each client takes: `fedsim.rounds`), sampling by client id with a seeded
generator (Flower's node ids are random, and `sample_nodes` uses the global `random`),
validating each reply on its own before aggregation (Flower raises on one bad reply), and
writing metrics and a PEFT checkpoint after every round. The last round is scored on the whole
held-out set and kept per example (`final_eval.parquet`, `fedsim.rundir`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.adapter import AdapterState, attach_lora, get_state, save_adapter, set_state
from fedsim.control import ArmControl
from fedsim.costs import ModelShape, lora_params, train_memory, train_step_flops
from fedsim.data import central_test_set
from fedsim.deployment import Deployment
from fedsim.downlink import Downlink
from fedsim.export import export_rows
from fedsim.fleet import build_fleet
from fedsim.keeps import PruneBook, client_ratios, pruned_shape
from fedsim.models import load_model
from fedsim.protocol import CLIENT_ID, CONFIG_RECORD, IDENTITY_RECORD, SCENARIO
from fedsim.pruning.importance import importance_scores
from fedsim.pruning.select import select_keep
from fedsim.pruning.structure import Keep, LayerGeometry, Scores, geometry
from fedsim.ranks import client_ranks
from fedsim.resume import ResumePoint
from fedsim.rounds import Estimates, RoundEnv, eval_round, timed_send_and_receive, train_round
from fedsim.rundir import RunDir
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed
from fedsim.training import ExampleResults, collate, evaluate_examples, evaluate_loss, resolve_device
from strategies import build_strategy

log = logging.getLogger(__name__)
ProgressFn = Callable[[dict[str, Any]], None]


def discover_clients(grid: Grid, scenario: Scenario) -> dict[int, int]:
    """client id → node id, by asking every node which partition it holds (a `query` message).

    In deployment SuperNodes connect over time: first wait until `clients.num_clients` nodes
    are connected, or at most $FEDSIM_NODE_WAIT_S seconds (default 120), then go on with those
    there, with a warning. In simulation every node is there at once."""
    expected, wait_s = scenario.clients.num_clients, float(os.environ.get("FEDSIM_NODE_WAIT_S", "120"))
    deadline = time.monotonic() + wait_s
    while len(node_ids := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
    if len(node_ids) < expected:
        log.warning(
            "only %d of %d SuperNodes connected after %g s (FEDSIM_NODE_WAIT_S); going on with them",
            len(node_ids),
            expected,
            wait_s,
        )
    config = ConfigRecord({SCENARIO: scenario.to_json()})
    messages = [
        Message(RecordDict({CONFIG_RECORD: config}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids
    ]
    clients: dict[int, int] = {}
    for reply in timed_send_and_receive(grid, messages, scenario.simulation.round_timeout_s)[0]:
        node = reply.metadata.src_node_id  # the node the query went to, even if the SuperLink answered for it
        if reply.has_error():
            log.warning("node %d did not identify itself: %s", node, reply.error.reason)
            continue
        claimed = reply.content[IDENTITY_RECORD][CLIENT_ID]
        if not isinstance(claimed, int):
            raise TypeError(f"node {node} identified itself with {CLIENT_ID} {claimed!r}, not an integer")
        cid = int(claimed)
        if cid in clients:
            raise RuntimeError(f"two nodes claim client id {cid}: {clients[cid]} and {node}")
        clients[cid] = node
    if not clients:
        raise RuntimeError("no client identified itself; see the client errors above")
    return clients


def cost_model(shape: ModelShape, scenario: Scenario) -> Callable[[int, Keep | None], Estimates]:
    """`estimates` by (rank, keep of the model a client holds), each computed once."""
    cache: dict[tuple[int, Keep | None], Estimates] = {}

    def estimate(rank: int, keep: Keep | None) -> Estimates:
        if (rank, keep) not in cache:
            cache[rank, keep] = estimates(pruned_shape(shape, keep), scenario, rank)
        return cache[rank, keep]

    return estimate


def arm_price(
    estimate: Callable[[int, Keep | None], Estimates],
    shape: ModelShape,
    layers: list[LayerGeometry],
    scenario: Scenario,
) -> Callable[[int, float], tuple[float, float]]:
    """(FLOPs of a round by `estimate`, the run's `cost_model`; LoRA parameters sent) of an arm
    (rank, ratio), each computed once: the controller's pace screen (`fedsim.control`). The model
    is cut to the ratio with equal scores: how much a cut removes, not which structures, sets the cost."""
    equal = Scores(tuple(torch.ones(g.groups) for g in layers), tuple(torch.ones(g.channels) for g in layers))
    cache: dict[tuple[int, float], tuple[float, float]] = {}

    def price(rank: int, ratio: float) -> tuple[float, float]:
        if (rank, ratio) not in cache:
            keep = select_keep(equal, layers, ratio, scenario.pruning.mode) if ratio > 0 else None
            cache[rank, ratio] = (
                float(estimate(rank, keep).flops),
                float(lora_params(pruned_shape(shape, keep), rank, scenario.lora.target_modules)),
            )
        return cache[rank, ratio]

    return price


def estimates(shape: ModelShape, scenario: Scenario, rank: int) -> Estimates:
    """The server's prior for one client's round at LoRA rank `rank`: full batches at max_seq_len."""
    t, targets = scenario.train, scenario.lora.target_modules
    weight_bytes = 2 if scenario.model.dtype != "float32" else 4
    flops = train_step_flops(shape, batch=t.batch_size, seq_len=t.max_seq_len, rank=rank, targets=targets)
    memory = train_memory(
        shape, batch=t.batch_size, seq_len=t.max_seq_len, rank=rank, targets=targets, weight_bytes=weight_bytes
    )
    return Estimates(flops=t.local_steps * flops, memory=memory.total)


class CentralEvaluator:
    """The server's copy of base model + LoRA, for central evaluation and for saving checkpoints.

    `held_out` is the server's whole held-out set (`data.central_test_size`); `examples`, its first
    `eval.central_examples` (0 = all), is what each round, calibration and the deployed models are
    scored on. The run's last round is scored on the whole held-out set."""

    def __init__(self, scenario: Scenario) -> None:
        base, self.tokenizer = load_model(scenario.model.name, dtype=scenario.model.dtype)
        self.shape = ModelShape.from_model(base)
        self.model = attach_lora(base, scenario.lora, derive_seed(scenario.seed, "lora-init")).to(
            resolve_device(scenario.train.device)
        )
        self.held_out = list(central_test_set(scenario.data, scenario.seed))
        self.examples = self.held_out[: scenario.eval.central_examples or None]  # each round's subset
        self.scenario = scenario

    def importance(self, state: AdapterState) -> Scores:
        """`pruning.where = "server"`: the global adapter's importance scores (`pruning.importance`)
        on the first `pruning.calibration_examples` held-out examples."""
        return self._scores(state, self.scenario.pruning.importance)

    def deploy_importance(self, state: AdapterState) -> Scores:
        """The same for the server's cut to a deploy ratio (`pruning.deploy_importance`)."""
        return self._scores(state, self.scenario.pruning.deploy_importance)

    def _scores(self, state: AdapterState, score: str) -> Scores:
        set_state(self.model, state)
        p, t = self.scenario.pruning, self.scenario.train
        batch = collate(self.tokenizer, self.examples[: p.calibration_examples], t.max_seq_len)
        device = next(self.model.parameters()).device
        return importance_scores(
            self.model,
            score,
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        )

    def initial_state(self) -> AdapterState:
        return get_state(self.model)

    def loss(self, state: AdapterState, examples: int = 16) -> float:
        """Held-out response loss on the first `examples` (no generation: cheap enough to
        score several candidate aggregates in a round)."""
        set_state(self.model, state)
        rows = self.examples[:examples]
        return float(
            evaluate_loss(
                self.model,
                self.tokenizer,
                rows,
                batch_size=self.scenario.eval.batch_size,
                max_len=self.scenario.train.max_seq_len,
            )
        )

    def __call__(
        self, state: AdapterState, server_round: int, elapsed: float, sim_time: float, *, final: bool = False
    ) -> tuple[dict[str, Any], ExampleResults]:
        """The round's eval_central row and its per-example results, on `examples`, or on
        `held_out` when `final`."""
        set_state(self.model, state)
        e, t = self.scenario.eval, self.scenario.train
        rows = self.held_out if final else self.examples
        per_example = evaluate_examples(
            self.model,
            self.tokenizer,
            rows,
            max_new_tokens=e.max_new_tokens,
            batch_size=e.batch_size,
            max_len=t.max_seq_len,
        )
        res = per_example.reduce()
        return {
            "round": server_round, "client_id": -1, "kind": "eval_central", "num_examples": res.num_examples,
            "loss": res.loss, "accuracy": res.accuracy, "wall_time_s": elapsed, "sim_time_s": sim_time,
        }, per_example  # fmt: skip


def run_federation(
    grid: Grid,
    scenario: Scenario,
    run_dir: RunDir,
    progress: ProgressFn | None = None,
    resume: ResumePoint | None = None,
) -> AdapterState:
    """Run every round of `scenario` on `grid`, recording into `run_dir` (after `resume`'s round,
    if given: `fedsim.resume`); returns the final adapter."""
    start = time.perf_counter() - (resume.wall_time if resume else 0.0)
    run_dir.event("run_start", scenario=scenario.name, seed=scenario.seed)
    central = CentralEvaluator(scenario)
    fleet = build_fleet(scenario)
    state = resume.state if resume else central.initial_state()
    c = scenario.compression
    downlink = Downlink(c.codec(), fleet.size) if c.downlink else None
    ranks = client_ranks(scenario, fleet)
    layers = geometry(central.model)
    book = PruneBook(scenario, layers, client_ratios(scenario, fleet)) if scenario.prunes else None
    estimate = cost_model(central.shape, scenario)
    control = ArmControl.build(scenario, fleet, arm_price(estimate, central.shape, layers, scenario))
    deploy = (
        Deployment(
            scenario, fleet.device, central.model, central.tokenizer, central.examples, central.deploy_importance
        )
        if any(scenario.pruning.deploy_ratios.values())
        else None
    )
    env = RoundEnv(
        grid, scenario, build_strategy(scenario), fleet, discover_clients(grid, scenario), ranks, estimate,
        score=deploy.loss if deploy else central.loss, downlink=downlink, pruning=book, server_scores=central.importance, control=control,
    )  # fmt: skip

    def evaluated(state: AdapterState, server_round: int, sim_time: float) -> dict[str, Any]:
        """The round's central row, with the fleet's deployed models scored (and planned for the
        next round's contributions); the last round's per-example results go to final_eval.parquet."""
        final = server_round == scenario.rounds
        row, per_example = central(state, server_round, time.perf_counter() - start, sim_time, final=final)
        if final:
            run_dir.save_final_eval(server_round, per_example.loss, per_example.n_tokens, per_example.correct)
        if deploy is not None:
            deploy.plan(state, book)
            # the unpruned model is not scored twice, unless the last round's row is on more examples than deploy's
            unpruned = (row["loss"], row["accuracy"]) if row["num_examples"] == len(deploy.examples) else None
            row["deployed_loss"], row["deployed_accuracy"] = deploy.evaluate(state, unpruned=unpruned)
        return row

    run_dir.event("clients", count=len(env.clients))
    sim_time, first = (resume.sim_time, resume.server_round + 1) if resume else (0.0, 1)
    if resume is not None:
        if book is not None:
            book.load(resume.keeps)
        if control is not None:
            control.load(resume.checkpoint)
        env.kept_ranks.update(resume.kept_ranks)
        if deploy is not None:
            deploy.plan(state, book)
        run_dir.event("run_resumed", after_round=resume.server_round, not_restored=list(resume.lost))
    else:
        row0 = evaluated(state, 0, sim_time)
        run_dir.add_rows([row0])
        _report(progress, run_dir, 0, scenario.rounds, [row0])
    for server_round in range(first, scenario.rounds + 1):
        t_round = time.perf_counter()
        state, rows, duration = train_round(env, state, server_round, sim_time)
        train_time = time.perf_counter() - t_round
        sim_time += duration
        rows += eval_round(env, state, server_round, sim_time)
        rows.append({**evaluated(state, server_round, sim_time), "aggregation_bias": env.last_bias})
        save_adapter(central.model, state, run_dir.checkpoint_path(server_round))
        if book is not None:
            run_dir.save_keeps(book.to_json(), server_round)
        if control is not None:
            control.save(run_dir.checkpoint_path(server_round))
        run_dir.add_rows(rows)
        for r in rows:
            if r.get("status", "ok") not in ("ok", "straggler"):
                run_dir.event(
                    "client_problem",
                    round=server_round,
                    client_id=r["client_id"],
                    kind=r["kind"],
                    status=r["status"],
                    reason=r["reason"],
                )
        _report(progress, run_dir, server_round, scenario.rounds, rows, train_time_s=train_time)
    if run_dir.adapter_path.exists():  # a resumed run that had finished before
        shutil.rmtree(run_dir.adapter_path)
    save_adapter(central.model, state, run_dir.adapter_path)
    if control is not None:
        control.save(run_dir.path)
    if book is not None:  # the final adapter on each ratio's pruned model, as its devices deploy it
        set_state(central.model, state)
        run_dir.add_rows(
            export_rows(central.model, central.tokenizer, central.examples, book, scenario, scenario.rounds)
        )
    run_dir.event("run_end", wall_time_s=time.perf_counter() - start, sim_time_s=sim_time)
    return state


def _report(
    progress: ProgressFn | None,
    run_dir: RunDir,
    server_round: int,
    rounds: int,
    rows: list[dict[str, Any]],
    train_time_s: float = 0.0,
) -> None:
    """Log the round's summary (`train_time_s`: wall time of sending, training and aggregating)."""
    central = next(r for r in rows if r["kind"] == "eval_central")
    train = [r for r in rows if r["kind"] == "train"]
    ok = [r for r in train if r["status"] == "ok"]
    summary = {
        "round": server_round,
        "rounds": rounds,
        "train_loss": float(np.mean([r["loss"] for r in ok])) if ok else float("nan"),
        "clients_ok": len(ok),
        "clients_failed": sum(1 for r in train if r["status"] in ("failed", "rejected")),
        "clients_lost": sum(1 for r in train if r["status"] in ("straggler", "dropped", "infeasible")),
        "central_loss": central["loss"],
        "central_accuracy": central["accuracy"],
        "elapsed_s": central["wall_time_s"],
        "sim_time_s": central["sim_time_s"],
        "train_time_s": train_time_s,
    }
    run_dir.event("round_end", **summary)
    if progress is not None:
        progress(summary)
