"""Packs: which clients of a round train together on the packed trainer (`clients.packing`).

Rule: with packing on (`packing_on`), round t's train messages, in client-id order, are cut into
consecutive chunks of `simulation.max_clients_per_step` clients; chunk k is pack "r{t}-p{k}". Each
message's config gains the pack's id and size and the trainer's memory budget and wait
(`protocol.PACK_*`), added after the message's bytes are measured, like the simulation's client id:
a device would not receive them. A packed update depends on its pack's composition at float-rounding
level (`fedsim.model.packed`), so packs are a pure function of the round's clients, never of the
order in which Ray runs them: the same seed gives the same packs, and the same metrics.

Not packed (`alone_reason`): a deployment (its messages name no client: each device trains its own
job) and runs whose clients are pruned (each holds a model of its own shape): they train alone.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedsim.config.scenario import Scenario
from fedsim.protocol import CLIENT_ID, CONFIG_RECORD, PACK_ID, PACK_MEMORY, PACK_SIZE, PACK_TIMEOUT_S
from strategies.lora_strategy import with_content

logger = logging.getLogger(__name__)
GIB = 2**30


def alone_reason(scenario: Scenario) -> str | None:
    """Why every client of `scenario` trains alone even with packing on, or None."""
    if scenario.prunes:
        return "pruned clients hold models of their own shapes: they train alone"
    if scenario.strategy.name == "fedspeed":
        return "FedSpeed's clients train by its own local rule (`fedsim.model.fedspeed`): they train alone"
    return None


def packing_on(scenario: Scenario, gpu_visible: bool | None = None) -> bool:
    """Whether a simulation of `scenario` trains in packs: `simulation.packing` = 'on', or 'auto'
    with a GPU visible here and nothing 'on' would refuse (`fedsim.config.scenario`), and no
    `alone_reason`."""
    sim, mode = scenario.simulation, scenario.simulation.packing
    if mode == "off" or alone_reason(scenario) is not None:
        return False
    if mode == "on":
        return True
    gpu = torch.cuda.is_available() if gpu_visible is None else gpu_visible
    servable = scenario.lora.dropout == 0 and sim.num_gpus_per_client == 0 and not sim.ray_address
    return gpu and servable and scenario.train.device != "cpu"


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
            m = by_client[cid]
            records = dict(m.content.items())
            records[CONFIG_RECORD] = ConfigRecord({**m.content.config_records[CONFIG_RECORD], **entries})
            out.append(with_content(m, RecordDict(records)))
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
