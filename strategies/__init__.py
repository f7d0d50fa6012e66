"""Aggregation strategies for federated LoRA, each a Flower Message-API strategy.

`STRATEGIES` maps the scenario's `strategy.name` to a factory taking the validated scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.serverapp.strategy import Strategy

from strategies.fedit import FedIT
from strategies.flower_optimizers import STATEFUL, fedprox, server_optimizer

if TYPE_CHECKING:
    from fedsim.scenario import Scenario

def _optimizer(name: str) -> Callable[[Scenario], Strategy]:
    def build(scenario: Scenario) -> Strategy:
        s = scenario.strategy
        return server_optimizer(name, s.server_lr, s.server_momentum, s.beta_1, s.beta_2, s.tau)

    return build


STRATEGIES: dict[str, Callable[[Scenario], Strategy]] = {
    "fedit": lambda scenario: FedIT(),
    "fedprox": lambda scenario: fedprox(scenario.strategy.proximal_mu),
    **{name: _optimizer(name) for name in STATEFUL},
}


def build_strategy(scenario: Scenario) -> Strategy:
    """The strategy the scenario names (validated at load, so the name is known)."""
    return STRATEGIES[scenario.strategy.name](scenario)


__all__ = ["STRATEGIES", "FedIT", "build_strategy"]
