"""Packs: which clients of a round train together on the packed trainer (`clients.packing`).

Rule: with packing on (`packing_on`), round t's train messages, in client-id order, are cut into
consecutive chunks of `simulation.max_clients_per_step` clients; chunk k is pack "r{t}-p{k}". Each
message's config gains the pack's id and size and the trainer's memory budget and wait
(`protocol.PACK_*`), added after the message's bytes are measured, like the simulation's client id:
a device would not receive them. A packed update depends on its pack's composition at float-rounding
level (`fedsim.model.packed`), so packs are a pure function of the round's clients, never of the
order in which Ray runs them: the same seed gives the same packs, and the same metrics.

Not packed (`alone_reason`): a deployment (its messages name no client: each device trains its own
job), runs whose clients are pruned (each holds a model of its own shape), FedSpeed's, asynchronous
runs (devices join a few at a time, `fedsim.server.asynchronous`), and those
whose base deltas the packed trainer cannot serve (`unservable`: a strategy that merges into the
base, `BASE_MERGING`, on a half-precision model): they train alone.

A packed round runs all its ClientApps at once (`clients.packing`), each on a CPU share of this
machine (`client_resources`). `packing_problems` is what makes `packing = "on"` unable to run here,
refused before the run (`fedsim.server.preflight`); `auto` packs only where none applies.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence

import torch
from flwr.app import Message

from fedsim.config.scenario import Scenario
from fedsim.protocol import CLIENT_ID, CONFIG_RECORD, PACK_ID, PACK_MEMORY, PACK_SIZE, PACK_TIMEOUT_S
from strategies.lora_strategy import with_config

logger = logging.getLogger(__name__)
GIB = 2**30
MIN_CPU_SHARE = 0.01  # the smallest CPU share a ClientApp of a packed round gets (100 per CPU)
BASE_MERGING = ("flora", "fedex_lora")  # strategies whose global state carries base deltas (`adapter.BASE_DELTA`)


def unservable(scenario: Scenario) -> str | None:
    """Why the packed trainer cannot train `scenario`'s clients (`fedsim.model.packed_jobs.check_job`), or None."""
    if scenario.strategy.name in BASE_MERGING and scenario.model.dtype != "float32":
        return (
            f"strategy {scenario.strategy.name!r} merges into the frozen base, and base deltas on a half-precision "
            f"base (`model.dtype` = {scenario.model.dtype!r}) are computed in float32 by a client alone "
            "(`fedsim.model.adapter.apply_base_delta`)"
        )
    return None


def alone_reason(scenario: Scenario) -> str | None:
    """Why every client of `scenario` trains alone even with packing on, or None."""
    if scenario.prunes:
        return "pruned clients hold models of their own shapes: they train alone"
    if scenario.strategy.name == "fedspeed":
        return "FedSpeed's clients train by its own local rule (`fedsim.model.fedspeed`): they train alone"
    if scenario.asynchronous:
        return (
            "asynchronous devices start when they choose, a few at a time (`fedsim.server.asynchronous`): "
            "they train alone"
        )
    if (reason := unservable(scenario)) is not None:
        return f"{reason}: they train alone"
    return None


def packing_on(scenario: Scenario, gpu_visible: bool | None = None, cpus: int | None = None) -> bool:
    """Whether a simulation of `scenario` on `cpus` CPUs (None: this machine's) trains in packs:
    `simulation.packing` = 'on', or 'auto' with a GPU visible here (None: look) and nothing 'on'
    would refuse (`fedsim.config.scenario`, `packing_problems`), and no `alone_reason`."""
    sim, mode = scenario.simulation, scenario.simulation.packing
    if mode == "off" or alone_reason(scenario) is not None:
        return False
    if mode == "on":
        return True
    gpu = torch.cuda.is_available() if gpu_visible is None else gpu_visible
    servable = scenario.lora.dropout == 0 and sim.num_gpus_per_client == 0 and not sim.ray_address
    fits = cpu_share(scenario, cpus) >= MIN_CPU_SHARE
    return gpu and servable and fits and scenario.train.device != "cpu"


def packing_problems(scenario: Scenario, cpus: int | None = None) -> list[str]:
    """What keeps `simulation.packing` = 'on' from running `scenario` on `cpus` CPUs (None: this
    machine's), each naming the fields and the fix; [] for 'auto' and 'off' (auto packs only where
    nothing applies)."""
    if scenario.simulation.packing != "on":
        return []
    problems = []
    if (reason := unservable(scenario)) is not None:
        problems.append(
            f"`simulation.packing` = 'on' cannot pack this run: {reason}; set model.dtype = 'float32', "
            "or packing = 'auto' (its clients then train alone) or 'off'"
        )
    if packing_on(scenario, cpus=cpus) and (problem := _crowded(scenario, cpus)) is not None:
        problems.append(problem)
    return problems


def _crowded(scenario: Scenario, cpus: int | None) -> str | None:
    if cpu_share(scenario, cpus) >= MIN_CPU_SHARE:
        return None
    return (
        f"`simulation.packing` = 'on' runs all {clientapps_at_once(scenario)} ClientApps of a round at once (a pack "
        f"waits for all its clients), more than {_cpus(cpus)} CPUs host at a share of at least {MIN_CPU_SHARE} CPU "
        "each: lower clients.per_round (or fleet.overcommit) or set packing = 'off'"
    )


def cpu_share(scenario: Scenario, cpus: int | None = None) -> float:
    """The CPU share of each ClientApp of a packed round: all of the round's at once on `cpus` CPUs
    (None: this machine's), at most `simulation.num_cpus_per_client`, in Ray's steps of 1e-4."""
    share = math.floor(_cpus(cpus) / clientapps_at_once(scenario) * 1e4) / 1e4
    return min(scenario.simulation.num_cpus_per_client, share)


def client_resources(scenarios: Sequence[Scenario], cpus: int | None = None) -> dict[str, float]:
    """Ray resources of each ClientApp of a simulation that runs `scenarios` on `cpus` CPUs (None:
    this machine's): the largest need of any of them. Unpacked, `simulation.num_cpus_per_client`
    and `num_gpus_per_client`; packed (`packing_on`), the smallest `cpu_share` of the packed ones
    and no GPU (the trainer holds it). ValueError when that share is below `MIN_CPU_SHARE`
    (`packing_problems` refuses such a run before it starts)."""
    sim = scenarios[0].simulation
    packed = [s for s in scenarios if packing_on(s, cpus=cpus)]
    if not packed:
        return {"num_cpus": sim.num_cpus_per_client, "num_gpus": sim.num_gpus_per_client}
    crowded = [p for s in packed if (p := _crowded(s, cpus)) is not None]
    if crowded:
        raise ValueError(crowded[0])
    return {"num_cpus": min(cpu_share(s, cpus) for s in packed), "num_gpus": 0.0}


def _cpus(cpus: int | None) -> int:
    return cpus if cpus is not None else os.cpu_count() or 1


def packs(cids: Sequence[int], size: int) -> list[list[int]]:
    """`cids` sorted, in consecutive chunks of at most `size`."""
    ordered = sorted(int(c) for c in cids)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def with_packs(scenario: Scenario, messages: list[Message], server_round: int) -> list[Message]:
    """`messages` (train, each naming its client) with their packs' entries when packing is on;
    else, or when they name no client (a deployment), as they are."""
    named = [m for m in messages if CLIENT_ID in m.content.config_records[CONFIG_RECORD]]
    if scenario.simulation.packing != "off" and (reason := alone_reason(scenario)) is not None:
        _log_once(reason)
    if not packing_on(scenario) or not named or len(named) != len(messages):
        return messages
    sim = scenario.simulation
    by_client = {int(m.content.config_records[CONFIG_RECORD][CLIENT_ID]): m for m in messages}  # type: ignore[arg-type]
    out = []
    for k, pack in enumerate(packs(list(by_client), sim.max_clients_per_step)):
        entries: dict[str, int | float | str] = {
            PACK_ID: f"r{server_round}-p{k}",
            PACK_SIZE: len(pack),
            PACK_MEMORY: int(sim.pack_memory_gib * GIB),
            PACK_TIMEOUT_S: sim.pack_timeout_s,
        }
        for cid in pack:
            out.append(with_config(by_client[cid], entries))
    return out


@functools.cache
def _log_once(reason: str) -> None:
    logger.warning("packing: %s", reason)


def clientapps_at_once(scenario: Scenario) -> int:
    """ClientApps a packed round needs running at once: every train message of the round (a pack
    waits for all its clients, and Ray starts a round's messages in any order): ⌈per_round·(1 +
    overcommit)⌉, and every client under central DP (Poisson sampling has no bound below the fleet)."""
    n, k = scenario.clients.num_clients, scenario.clients
    if scenario.privacy.mode == "central":
        return n
    return min(n, max(math.ceil(k.per_round * (1 + scenario.fleet.overcommit)), 1))
