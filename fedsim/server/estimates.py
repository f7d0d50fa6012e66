"""What the server expects a client's round to cost before it happens: FLOPs and memory of its
training step at its rank, on the model it holds (`fedsim.fleet.costs`), and the price of a
controller's arm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedsim.config.scenario import Scenario
from fedsim.fleet.costs import ModelShape, lora_params, train_memory, train_step_flops
from fedsim.fleet.keeps import pruned_shape
from fedsim.pruning.select import select_keep
from fedsim.pruning.structure import Keep, LayerGeometry, Scores


@dataclass(frozen=True)
class Estimates:
    """What the server expects one client's training to cost, before it happens."""

    flops: float  # local_steps full batches at max_seq_len
    memory: int  # bytes of one training step (fedsim.fleet.costs.train_memory)


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
    (rank, ratio), each computed once: the controller's pace screen (`fedsim.server.control`). The model
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
