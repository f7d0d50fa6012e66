"""Run a scenario on Flower's Simulation Runtime with the Ray backend, in this process.

The clients are played by Flower virtual SuperNodes: one per client when clients keep state between
rounds, else a pool as large as a round (`fedsim.server.roster.node_pool_size`). Ray runs them on
a pool of actors, `simulation.num_cpus_per_client` CPUs each, so the pool size (and the
parallelism) is the CPU count divided by that. Every virtual client gets the same Ray resources:
device heterogeneity is modelled by fedsim itself, not by Ray.

To use an existing Ray cluster, set `simulation.ray_address` (passed to `ray.init(address=...)`
through Flower's `backend_config["init_args"]`); GPUs: `simulation.num_gpus_per_client`. With
packing on (`fedsim.server.packs.packing_on`) a round's clients train together on one shared
trainer actor (`clients.packing`), and each ClientApp gets the CPU share that lets all of a round's
run at once, and no GPU. Several runs in one simulation (`run_simulations`) share one pool, sized
for the largest need among them (`fedsim.server.packs.client_resources`). Flower's Simulation
Runtime runs no more messages at once than its executor has threads, min(32, CPUs + 4) whatever the
actor count; with packing on it gets one thread per actor (`every_actor_at_once`), else a pack
larger than that would wait for its last clients until `simulation.pack_timeout_s` cut it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation as flwr_run_simulation

from clients.app import app
from fedsim.config.scenario import Scenario
from fedsim.results.rundir import RunDir
from fedsim.server.federation import ProgressFn, run_federation
from fedsim.server.packs import client_resources, packing_on
from fedsim.server.resume import ResumePoint
from fedsim.server.roster import node_pool_size

MAX_WORKERS = 4096  # the executor's thread cap with packing on: it starts one per actor (Flower submits one each)


@contextlib.contextmanager
def every_actor_at_once() -> Iterator[None]:
    """Inside the block, Flower's Simulation Runtime feeds every actor of its pool at once: its
    executor (a `ThreadPoolExecutor()` in Flower 1.41's `vce_api.run_api`, min(32, CPUs + 4)
    threads, each running one message at a time) is made with `MAX_WORKERS`."""
    from flwr.server.superlink.fleet.vce import vce_api

    executor = vce_api.ThreadPoolExecutor
    vce_api.ThreadPoolExecutor = functools.partial(executor, max_workers=MAX_WORKERS)  # type: ignore[assignment, misc]
    try:
        yield
    finally:
        vce_api.ThreadPoolExecutor = executor  # type: ignore[misc]


def backend_config(scenarios: Sequence[Scenario]) -> dict[str, Any]:
    """Flower's Ray backend config for one simulation of `scenarios` (which share [simulation]):
    each ClientApp's resources sized for the largest need among them (`client_resources`: packed, a
    round's ClientApps all at once, no GPU)."""
    sim = scenarios[0].simulation
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    return {
        "client_resources": client_resources(scenarios),
        "init_args": init_args,
    }


def run_simulation(
    scenario: Scenario,
    run_dir: RunDir,
    progress: ProgressFn | None = None,
    client_app: ClientApp | None = None,
    resume: ResumePoint | None = None,
) -> None:
    """Run `scenario` to the end (from `resume`'s round, if given); exceptions from the server
    loop propagate to the caller. `client_app` replaces fedsim's own ClientApp (tests inject
    misbehaving clients this way)."""
    run_simulations([(scenario, run_dir)], progress, client_app, keep_going=False, resume=resume)


def run_simulations(
    jobs: Sequence[tuple[Scenario, RunDir]],
    progress: ProgressFn | None = None,
    client_app: ClientApp | None = None,
    keep_going: bool = True,
    resume: ResumePoint | None = None,
) -> list[tuple[RunDir, Exception]]:
    """Run several scenarios one after the other in ONE Flower simulation, so Ray, the client
    actors and their model load are paid once (`fedsim compare`: a run per strategy and seed).
    They must share the fleet size and the simulation settings. Clients keep nothing from one
    run to the next (`clients.app` resets a node's state when the run changes). With
    `keep_going`, a run that raises is recorded in its run directory (`RunDir.fail`: the
    `run_failed` event and error.log) and the next one starts; each failed run is returned with
    its exception."""
    client_app = client_app or app
    first = jobs[0][0]
    for scenario, _ in jobs[1:]:
        if scenario.clients.num_clients != first.clients.num_clients or scenario.simulation != first.simulation:
            raise ValueError(f"{scenario.name}: runs of one simulation must share clients.num_clients and [simulation]")

    failures: list[tuple[RunDir, Exception]] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for scenario, run_dir in jobs:
            try:
                run_federation(
                    grid, scenario, run_dir, progress, resume if len(jobs) == 1 else None, assign_clients=True
                )
            except Exception as exc:
                if not keep_going:
                    raise
                run_dir.fail(exc)
                failures.append((run_dir, exc))

    # Ray's worker processes inherit the environment: keep their logs and thread pools quiet.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    packed = any(packing_on(scenario) for scenario, _ in jobs)
    with every_actor_at_once() if packed else contextlib.nullcontext():
        flwr_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=max(node_pool_size(scenario) for scenario, _ in jobs),
            backend_config=backend_config([scenario for scenario, _ in jobs]),
        )
    return failures
