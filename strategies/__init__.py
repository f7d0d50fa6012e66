"""Aggregation strategies for federated LoRA, each a Flower Message-API strategy.

`STRATEGIES` maps the scenario's `strategy.name` to a factory taking the validated scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.serverapp.strategy import Strategy

from strategies.fedit import FedIT

if TYPE_CHECKING:
    from fedsim.scenario import Scenario

STRATEGIES: dict[str, Callable[[Scenario], Strategy]] = {
    "fedit": lambda scenario: FedIT(),
}


def build_strategy(scenario: Scenario) -> Strategy:
    """The strategy the scenario names (validated at load, so the name is known)."""
    return STRATEGIES[scenario.strategy.name](scenario)


__all__ = ["STRATEGIES", "FedIT", "build_strategy"]
