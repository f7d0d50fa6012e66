"""Checks that need more than the scenario file: the fleet's files, the data and the model's shape.

Run before anything is written (by `fedsim run`, `fedsim resume`, `fedsim compare` and the
`flwr run` ServerApp), so a bad trace row or profiles entry, a fleet that does not match
`clients.num_clients`, a model that does not load, a data source that cannot be read whole (a
garbled file, no prompt/response columns, an `hf:` dataset neither cached nor reachable), too few
usable rows for the held-out set and one per client, a partitioning that leaves a client without
data, a LoRA rank larger than a layer allows, a deadline no device can meet, or pruning of a model
family the pruner does not know or to a ratio that would empty a layer, or a privacy target ε that
no noise reaches in the planned rounds (`fedsim.privacy.plan_problems`), or `simulation.packing` =
'on' where this machine or the packed trainer cannot serve it (`fedsim.server.packs.packing_problems`:
a round's ClientApps too many for its CPUs, base deltas on a half-precision model), is refused up
front, like any other scenario problem (a ScenarioError: `fedsim` exits 2).

The data is loaded and partitioned here as the run will (`fedsim.data.partitions`, cached per
process, so the server does not load it twice); the scenario check (`fedsim.config`) only looked
at the file's first bytes.
"""

from __future__ import annotations

import functools

import numpy as np

from fedsim.config.devices import CATALOG, ProfilesError
from fedsim.config.errors import InputError
from fedsim.config.scenario import Scenario, ScenarioError
from fedsim.data.partitions import partition_sizes
from fedsim.fleet.availability import TraceError
from fedsim.fleet.clock import comm_seconds
from fedsim.fleet.costs import ModelShape, lora_params
from fedsim.fleet.fleet import Fleet, build_fleet
from fedsim.fleet.keeps import client_ratios, ratio_problems
from fedsim.fleet.ranks import client_ranks, rank_limit_problems
from fedsim.model.loader import load_model
from fedsim.privacy import plan_problems
from fedsim.pruning.structure import LayerGeometry, geometry
from fedsim.results.tracking import missing_trackers
from fedsim.server.estimates import estimates
from fedsim.server.packs import packing_problems


@functools.cache
def model_shape(name: str, dtype: str) -> ModelShape:
    """The base model's shape (loads the model once per process)."""
    return ModelShape.from_model(load_model(name, dtype=dtype)[0])


@functools.cache
def model_layers(name: str, dtype: str) -> list[LayerGeometry] | str:
    """The base model's prunable structures, or why it cannot be pruned."""
    try:
        return geometry(load_model(name, dtype=dtype)[0])
    except ValueError as exc:
        return str(exc)


def pruning_problems(scenario: Scenario, fleet: Fleet) -> list[str]:
    deploy = scenario.pruning.deploy_ratios
    present = set(fleet.device.astype(str))
    problems = [
        f"`pruning.deploy_ratios.{name}`: no device of the fleet has this profile; profiles: "
        f"{', '.join(sorted(present))}"
        for name in deploy
        if name not in present
    ]
    if not scenario.prunes and not any(deploy.values()):
        return problems
    layers = model_layers(scenario.model.name, scenario.model.dtype)
    if isinstance(layers, str):
        return [*problems, f"`pruning`: {layers}"]
    arms = scenario.controller.ratios if scenario.controller is not None else ()
    return problems + [
        f"`pruning`: {p}"
        for p in ratio_problems(layers, scenario, [*client_ratios(scenario, fleet), *arms, *deploy.values()])
    ]


def adapter_bytes(shape: ModelShape, scenario: Scenario) -> int:
    """float32 bytes of the global adapter: what one message carries, roughly."""
    return 4 * lora_params(shape, scenario.lora.rank, scenario.lora.target_modules)


def deadline_problem(fleet: Fleet, scenario: Scenario, shape: ModelShape) -> str | None:
    deadline = scenario.fleet.deadline_s
    if deadline <= 0:
        return None
    ranks = client_ranks(scenario, fleet)
    per_rank = {int(r): estimates(shape, scenario, int(r)).flops for r in np.unique(ranks)}
    flops = np.array([per_rank[int(r)] for r in ranks])
    nbytes = adapter_bytes(shape, scenario)
    seconds = flops / fleet.flops + comm_seconds(nbytes, nbytes, fleet.down_bps, fleet.up_bps)
    best = int(np.argmin(seconds))
    if seconds[best] > deadline:
        return (
            f"`fleet.deadline_s` = {deadline:g} is shorter than any device's estimated round time: "
            f"the fastest, client {best} ({fleet.device[best]}), needs about {seconds[best]:.3g}s"
        )
    return None


def file_problems(exc: InputError) -> list[str]:
    """A fleet file's problems as scenario problems, each naming the key and the file."""
    key = {TraceError: "fleet.trace", ProfilesError: "fleet.profiles_file"}.get(type(exc), "fleet")
    return [f"`{key}`: {exc.source}: {problem}" for problem in exc.problems]


def data_problems(scenario: Scenario) -> list[str]:
    """What keeps the data from giving the held-out set and every client examples to train on:
    the source read whole, its usable rows counted and partitioned as the run will."""
    data, num_clients = scenario.data, scenario.clients.num_clients
    try:
        sizes = partition_sizes(data, num_clients, scenario.seed)
    except ValueError as exc:
        text = str(exc)
        return [text if text.startswith("`") else f"`data.task`: {text}"]
    empty = [i for i, size in enumerate(sizes) if size == 0]
    if not empty:
        return []
    shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
    return [
        f"`data.partitioner` = {data.partitioner!r} leaves {len(empty)} of {num_clients} clients without examples "
        f"(clients {shown}; {sum(sizes)} examples partitioned, {max(sizes)} at most per client): add examples, "
        "use fewer clients, or another partitioner"
    ]


def preflight(scenario: Scenario, source: str) -> None:
    """Raise ScenarioError listing what makes the scenario unable to run on its fleet and data."""
    try:
        fleet = build_fleet(scenario)
    except (TraceError, ProfilesError) as exc:
        raise ScenarioError(source, file_problems(exc)) from None
    except ValueError as exc:
        raise ScenarioError(source, [f"`fleet`: {exc}"]) from None
    known = set(fleet.device.astype(str)) | set(CATALOG) | set(scenario.fleet.profiles)
    unknown = [
        f"`{field}.{n}`: no device of the fleet has that profile"
        for field, names in (
            ("lora.profile_ranks", scenario.lora.profile_ranks),
            ("pruning.profile_ratios", scenario.pruning.profile_ratios),
            ("controller.profile_arms", scenario.controller.profile_arms if scenario.controller else {}),
        )
        for n in sorted(set(names) - known)
    ]
    if unknown:  # profiles from a file or trace: known only now
        raise ScenarioError(source, unknown)
    k = scenario.clients
    privacy = plan_problems(scenario.privacy, k.num_clients, k.per_round, scenario.rounds)
    packing = packing_problems(scenario)
    try:
        shape = model_shape(scenario.model.name, scenario.model.dtype)
    except ValueError as exc:  # ModelError: a folder that holds no model, an id not in the cache, ...
        raise ScenarioError(source, [f"`model.name`: {exc}", *data_problems(scenario), *privacy, *packing]) from None
    problems = rank_limit_problems(shape, scenario, client_ranks(scenario, fleet)) + pruning_problems(scenario, fleet)
    problem = deadline_problem(fleet, scenario, shape)
    problems += ([problem] if problem else []) + data_problems(scenario) + privacy + packing
    problems += missing_trackers(scenario.tracking)
    if problems:
        raise ScenarioError(source, problems)
