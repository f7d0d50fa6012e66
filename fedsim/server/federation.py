"""The server side of a fedsim run: discover clients, then rounds of train (`fedsim.server.rounds`)
→ evaluate → record, on the fleet's simulated clock.

`run_federation` is fedsim's round loop. It follows Flower's `Strategy.start` step for step and
calls the strategy's own Flower hooks (`configure_train`, `aggregate_train`, `configure_evaluate`,
`aggregate_evaluate`), but owns what `start` has no place for: the fleet (who is online, who
fits, how long each client takes: `fedsim.server.rounds`), sampling by client id with a seeded
generator (Flower's node ids are random, and `sample_nodes` uses the global `random`),
validating each reply on its own before aggregation (Flower raises on one bad reply), and
writing metrics and a PEFT checkpoint after every round. The last round is scored on the whole
held-out set and kept per example (`final_eval.parquet`, `fedsim.results.rundir`). With privacy on,
the round is DP-FedAvg (`fedsim.server.rounds`), its mechanism is stated in a `privacy` event at the
start, and the accountant's and the adaptive clip's state is in every checkpoint (`privacy.json`).
Each round's central row carries the fleet's joules (`energy_j`, `fedsim.server.rounds.spend_energy`)
and their running total (`sim_energy_j`, beside `sim_time_s`); with `fleet.batteries` the devices'
charge is in every checkpoint (`batteries.npz`). On the asynchronous clock (`Scenario.asynchronous`:
AFA-CD, AFA-CS) a round is a server step of `fedsim.server.asynchronous.AsyncClock`, which keeps the
devices in flight from one step to the next.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.compression import codec_config
from fedsim.compression.downlink import Downlink
from fedsim.config.scenario import Scenario
from fedsim.fleet.energy import Batteries
from fedsim.fleet.fleet import build_fleet
from fedsim.fleet.keeps import PruneBook, client_ratios
from fedsim.fleet.ranks import ClientRanks, client_ranks
from fedsim.model.adapter import AdapterState, save_adapter, set_state
from fedsim.privacy import PrivacyBook
from fedsim.protocol import CLIENT_ID, CONFIG_RECORD, IDENTITY_RECORD, SCENARIO
from fedsim.pruning.structure import geometry
from fedsim.results.rundir import RunDir
from fedsim.results.tracking import Trackers, open_trackers
from fedsim.server.asynchronous import AsyncClock
from fedsim.server.central import CentralEvaluator
from fedsim.server.control import ArmControl
from fedsim.server.deployed import Deployment
from fedsim.server.estimates import arm_price, cost_model
from fedsim.server.export import export_rows
from fedsim.server.resume import ResumePoint
from fedsim.server.roster import Roster, node_pool_size
from fedsim.server.rounds import RoundEnv, eval_round, timed_send_and_receive, train_round
from strategies import build_strategy

log = logging.getLogger(__name__)
LOGGED = ("mode", "noise_multiplier", "delta", "sampling", "weighting")  # the privacy event's fields logged at start
ProgressFn = Callable[[dict[str, Any]], None]


def _connected(grid: Grid, expected: int, poll_s: float) -> list[int]:
    """The grid's node ids, sorted, once `expected` nodes are there or $FEDSIM_NODE_WAIT_S seconds
    (default 120) have passed, whichever comes first (nodes register over time, in a simulation too)."""
    wait_s = float(os.environ.get("FEDSIM_NODE_WAIT_S", "120"))
    deadline = time.monotonic() + wait_s
    while len(node_ids := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(poll_s)
    return node_ids


def assign_clients(grid: Grid, scenario: Scenario) -> Roster:
    """The roster of fedsim's own simulation, without a message: every virtual node can play any
    client (its data is `client_data(client id)`) and each message tells its node which client it
    plays (`protocol.CLIENT_ID` in its config), so startup costs no message per node, whatever the
    fleet's size. The simulation has `node_pool_size` nodes: one per client (the i-th node by id
    plays client i) when clients keep state, else a pool seated phase by phase
    (`fedsim.server.roster`)."""
    n, need = scenario.clients.num_clients, node_pool_size(scenario)
    nodes = _connected(grid, need, poll_s=0.2)
    if len(nodes) < need:
        raise RuntimeError(
            f"the simulation registered {len(nodes)} nodes of the {need} that {n} clients need "
            "in $FEDSIM_NODE_WAIT_S seconds"
        )
    return Roster.fixed(dict(enumerate(nodes[:n]))) if need == n else Roster.pooled(n, nodes[:need])


def discover_clients(grid: Grid, scenario: Scenario) -> dict[int, int]:
    """client id → node id, by asking every node which partition it holds (a `query` message). A
    node claiming a client id another node claimed first is left out, with a warning naming both.

    In deployment SuperNodes connect over time: first wait until `clients.num_clients` nodes
    are connected, or at most $FEDSIM_NODE_WAIT_S seconds (default 120), then go on with those
    there, with a warning."""
    expected = scenario.clients.num_clients
    node_ids = _connected(grid, expected, poll_s=1.0)
    if len(node_ids) < expected:
        log.warning(
            "only %d of %d SuperNodes connected after %s s (FEDSIM_NODE_WAIT_S); going on with them",
            len(node_ids),
            expected,
            os.environ.get("FEDSIM_NODE_WAIT_S", "120"),
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
        if cid in clients:  # a misconfigured SuperNode, or one that should not be there
            log.warning(
                "node %d claims client id %d, which node %d claimed first: node %d is left out of the run",
                node, cid, clients[cid], node,
            )  # fmt: skip
            continue
        clients[cid] = node
    if not clients:
        raise RuntimeError("no client identified itself; see the client errors above")
    return clients


@dataclass
class Federation:
    """One run's server: the round environment, its own model (`central`), the deployed models
    it scores (`deploy`, with deploy ratios) and the run directory it records into."""

    env: RoundEnv
    central: CentralEvaluator
    deploy: Deployment | None
    run_dir: RunDir
    start: float  # time.perf_counter() at the run's start (less the wall time before a resume)

    @classmethod
    def build(cls, grid: Grid, scenario: Scenario, run_dir: RunDir, start: float, assign: bool) -> Federation:
        """Load the model, build the fleet and its books, and find the clients: `assign` them to
        nodes (fedsim's simulation: `assign_clients`) or ask each node (`discover_clients`)."""
        central = CentralEvaluator(scenario)
        fleet = build_fleet(scenario)
        c = scenario.compression
        downlink = Downlink(codec_config(c), fleet.size) if c.downlink else None
        ranks = ClientRanks(client_ranks(scenario, fleet))
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
        roster = assign_clients(grid, scenario) if assign else Roster.fixed(discover_clients(grid, scenario))
        k = scenario.clients
        privacy = (
            PrivacyBook.build(scenario.privacy, k.num_clients, k.per_round, scenario.rounds, scenario.seed)
            if scenario.privacy.enabled
            else None
        )
        batteries = Batteries(fleet.battery) if scenario.fleet.batteries else None
        env = RoundEnv(
            grid, scenario, build_strategy(scenario), fleet, roster, ranks, estimate,
            score=deploy.loss if deploy else central.loss, downlink=downlink, pruning=book,
            control=control, server_scores=central.importance, assigned=assign, privacy=privacy, batteries=batteries,
        )  # fmt: skip
        return cls(env, central, deploy, run_dir, start)

    def restore(self, resume: ResumePoint, state: AdapterState) -> None:
        """Take up the books of an interrupted run (`fedsim.server.resume`) after its last round:
        keeps, controller, the strategy's state, kept ranks, the privacy accountant and clip, the batteries."""
        env = self.env
        if env.pruning is not None:
            env.pruning.load(resume.keeps)
        if env.privacy is not None and resume.privacy is not None:
            env.privacy.load_state_dict(resume.privacy)
        if env.batteries is not None and resume.batteries is not None:
            env.batteries.load_state_dict(resume.batteries)
        if env.control is not None:
            env.control.load(resume.checkpoint)
        if resume.strategy is not None:  # None: a checkpoint from before fedsim saved it (in `resume.lost`)
            env.strategy.load_state_dict(resume.strategy)
        env.ranks.kept.update(resume.kept_ranks)
        if self.deploy is not None:
            self.deploy.plan(state, env.pruning)
        self.run_dir.event("run_resumed", after_round=resume.server_round, not_restored=list(resume.lost))

    def evaluate(self, state: AdapterState, server_round: int, sim_time: float) -> dict[str, Any]:
        """The round's central row, with the fleet's deployed models scored (and planned for the
        next round's contributions); the last round's per-example results go to final_eval.parquet."""
        final = server_round == self.env.scenario.rounds
        row, per_example = self.central(state, server_round, time.perf_counter() - self.start, sim_time, final=final)
        if server_round == 0 and self.env.privacy is not None:
            row["dp_epsilon"] = 0.0  # nothing released yet
        if final:
            self.run_dir.save_final_eval(server_round, per_example.loss, per_example.n_tokens, per_example.correct)
        if self.deploy is not None:
            self.deploy.plan(state, self.env.pruning)
            # the unpruned model is not scored twice, unless the last round's row is on more examples than deploy's
            unpruned = (row["loss"], row["accuracy"]) if row["num_examples"] == len(self.deploy.examples) else None
            row["deployed_loss"], row["deployed_accuracy"] = self.deploy.evaluate(state, unpruned=unpruned)
        return row

    def record(self, state: AdapterState, server_round: int, rows: list[dict[str, Any]]) -> None:
        """The round's checkpoint (adapter, keeps, controller, the strategy's state, the privacy state, the
        batteries), then its metric rows and client problems: a round with rows has its whole checkpoint."""
        env, run_dir = self.env, self.run_dir
        save_adapter(self.central.model, state, run_dir.checkpoint_path(server_round))
        if env.pruning is not None:
            run_dir.save_keeps(env.pruning.to_json(), server_round)
        if env.privacy is not None:
            run_dir.save_privacy(env.privacy.state_dict(), server_round)
        if env.batteries is not None:
            run_dir.save_batteries(env.batteries.state_dict(), server_round)
        if env.control is not None:
            env.control.save(run_dir.checkpoint_path(server_round))
        run_dir.save_strategy(env.strategy.state_dict(), server_round)
        run_dir.add_rows(rows)
        for r in rows:
            if r.get("status", "ok") not in ("ok", "straggler"):
                run_dir.event(
                    "client_problem", round=server_round, client_id=r["client_id"], kind=r["kind"],
                    status=r["status"], reason=r["reason"],
                )  # fmt: skip

    def finish(self, state: AdapterState, sim_time: float) -> None:
        """The final adapter, controller, strategy, privacy and battery state; with pruning, the final adapter scored on
        each ratio's pruned model, as its devices deploy it."""
        env, run_dir, central = self.env, self.run_dir, self.central
        if run_dir.adapter_path.exists():  # a resumed run that had finished before
            shutil.rmtree(run_dir.adapter_path)
        save_adapter(central.model, state, run_dir.adapter_path)
        if env.control is not None:
            env.control.save(run_dir.path)
        run_dir.save_strategy(env.strategy.state_dict())
        if env.privacy is not None:
            run_dir.save_privacy(env.privacy.state_dict())
        if env.batteries is not None:
            run_dir.save_batteries(env.batteries.state_dict())
        if env.pruning is not None:
            set_state(central.model, state)
            s = env.scenario
            run_dir.add_rows(export_rows(central.model, central.tokenizer, central.examples, env.pruning, s, s.rounds))
        run_dir.event("run_end", wall_time_s=time.perf_counter() - self.start, sim_time_s=sim_time)


def run_federation(
    grid: Grid,
    scenario: Scenario,
    run_dir: RunDir,
    progress: ProgressFn | None = None,
    resume: ResumePoint | None = None,
    assign_clients: bool = False,
) -> AdapterState:
    """Run every round of `scenario` on `grid`, recording into `run_dir` (after `resume`'s round,
    if given: `fedsim.server.resume`); returns the final adapter. Each round: train
    (`fedsim.server.rounds.train_round`), federated evaluation, central evaluation, record.
    `assign_clients`: the nodes are fedsim's own virtual clients (`assign_clients`), not devices
    that hold a partition of their own (`discover_clients`)."""
    start = time.perf_counter() - (resume.wall_time if resume else 0.0)
    run_dir.event("run_start", scenario=scenario.name, seed=scenario.seed)
    with open_trackers(scenario.tracking, run_dir.path, scenario.model_dump(mode="json")) as trackers:
        state = _run_rounds(grid, scenario, run_dir, progress, resume, assign_clients, start, trackers)
        trackers.log_artifact(run_dir.adapter_path)
    return state


def _run_rounds(
    grid: Grid,
    scenario: Scenario,
    run_dir: RunDir,
    progress: ProgressFn | None,
    resume: ResumePoint | None,
    assign_clients: bool,
    start: float,
    trackers: Trackers,
) -> AdapterState:
    """`run_federation`'s rounds, each round's summary and central row logged to `trackers`."""
    fed = Federation.build(grid, scenario, run_dir, start, assign_clients)
    state = resume.state if resume else fed.central.initial_state()
    run_dir.event("clients", count=len(fed.env.roster.ids), nodes=len(fed.env.roster.nodes))
    if fed.env.privacy is not None:
        said = fed.env.privacy.summary()
        run_dir.event("privacy", **said)
        log.info("privacy: %s DP, z = %.3g, δ = %.3g; sampling: %s; clients weighted %s", *[said[k] for k in LOGGED])
    if resume is not None:
        fed.restore(resume, state)
        sim_time, sim_energy, first = resume.sim_time, resume.sim_energy, resume.server_round + 1
    else:
        sim_time, sim_energy, first = 0.0, 0.0, 1
        row0 = {**fed.evaluate(state, 0, sim_time), "energy_j": 0.0, "sim_energy_j": sim_energy}
        run_dir.add_rows([row0])
        trackers.log_round(0, {**row0, **_report(progress, run_dir, 0, scenario.rounds, [row0])})
    clock = AsyncClock(fed.env) if scenario.asynchronous else None
    for server_round in range(first, scenario.rounds + 1):
        t_round = time.perf_counter()
        trained = (clock.step if clock else partial(train_round, fed.env))(state, server_round, sim_time)
        train_time = time.perf_counter() - t_round
        state, sim_time, sim_energy = trained.state, sim_time + trained.duration, sim_energy + trained.energy_j
        rows = trained.rows + eval_round(fed.env, state, server_round, sim_time)
        rows.append({
            **fed.evaluate(state, server_round, sim_time), "aggregation_bias": trained.bias, **trained.central,
            "energy_j": trained.energy_j, "sim_energy_j": sim_energy,
        })  # fmt: skip
        fed.record(state, server_round, rows)
        summary = _report(progress, run_dir, server_round, scenario.rounds, rows, train_time_s=train_time)
        trackers.log_round(server_round, {**rows[-1], **summary})
    fed.finish(state, sim_time)
    return state


def _report(
    progress: ProgressFn | None,
    run_dir: RunDir,
    server_round: int,
    rounds: int,
    rows: list[dict[str, Any]],
    train_time_s: float = 0.0,
) -> dict[str, Any]:
    """Log the round's summary (`train_time_s`: wall time of sending, training and aggregating), and return it."""
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
    return summary
