"""Checks that need more than the scenario file: the fleet's files and the model's shape.

Run before anything is written (by `fedsim run` and the `flwr run` ServerApp), so a bad trace
row, a fleet that does not match `clients.num_clients`, a LoRA rank larger than a layer allows,
a deadline no device can meet, or pruning of a model family the pruner does not know or to a
ratio that would empty a layer, is refused up front, like any other scenario problem.
"""

from __future__ import annotations

import functools

import numpy as np

from fedsim.config.devices import CATALOG
from fedsim.config.scenario import Scenario, ScenarioError
from fedsim.fleet.clock import comm_seconds
from fedsim.fleet.costs import ModelShape, lora_params
from fedsim.fleet.fleet import Fleet, build_fleet
from fedsim.fleet.keeps import client_ratios, ratio_problems
from fedsim.fleet.ranks import client_ranks, rank_limit_problems
from fedsim.model.loader import load_model
from fedsim.pruning.structure import LayerGeometry, geometry
from fedsim.server.estimates import estimates


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


def preflight(scenario: Scenario, source: str) -> None:
    """Raise ScenarioError listing what makes the scenario unable to run on its fleet."""
    try:
        fleet = build_fleet(scenario)
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
    shape = model_shape(scenario.model.name, scenario.model.dtype)
    problems = rank_limit_problems(shape, scenario, client_ranks(scenario, fleet)) + pruning_problems(scenario, fleet)
    problem = deadline_problem(fleet, scenario, shape)
    if problems or problem:
        raise ScenarioError(source, problems + ([problem] if problem else []))
