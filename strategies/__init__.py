"""Aggregation strategies for federated LoRA, each a Flower Message-API strategy (a `FedAvg`).

`STRATEGIES` maps the scenario's `strategy.name` to a factory taking the validated scenario.
Every strategy serves clients of mixed LoRA ranks (`strategies.lora_strategy`); the per-layer
math is in `strategies.lora_math`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedsim.config.names import SERVER_OPTIMIZERS
from strategies.afa import AFA, AFACS
from strategies.fedex_lora import FedExLoRA
from strategies.fedit import FedIT
from strategies.fedsa_lora import FedSALoRA
from strategies.fedspeed import FedSpeed
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.flower_optimizers import fedprox, server_optimizer
from strategies.hetlora import HetLoRA
from strategies.lora_fair import LoRAFAIR
from strategies.lora_strategy import ClientAdapter, LoraStrategy

if TYPE_CHECKING:
    from fedsim.config.scenario import Scenario


def _base(scenario: Scenario) -> tuple[int, float, int]:
    return scenario.lora.rank, scenario.lora.alpha, scenario.seed


def _padding(scenario: Scenario) -> str | None:
    """The scenario's `strategy.rank_padding`; None ("paper") leaves the strategy's `paper_padding`."""
    return None if scenario.strategy.rank_padding == "paper" else scenario.strategy.rank_padding


def _optimizer(name: str) -> Callable[[Scenario], LoraStrategy]:
    def build(scenario: Scenario) -> LoraStrategy:
        s = scenario.strategy
        optimizer = server_optimizer(name, s.server_lr, s.server_momentum, s.beta_1, s.beta_2, s.tau)
        return FedIT(*_base(scenario), optimizer=optimizer, padding=_padding(scenario))

    return build


def _afa(cls: type[AFA]) -> Callable[[Scenario], LoraStrategy]:
    def build(scenario: Scenario) -> LoraStrategy:
        low, high = scenario.participation.steps_range(scenario.train.local_steps)
        lr = scenario.strategy.afa_server_lr
        return cls(*_base(scenario), padding=_padding(scenario), server_lr=lr if lr is not None else (low + high) / 2)

    return build


STRATEGIES: dict[str, Callable[[Scenario], LoraStrategy]] = {
    "fedit": lambda scenario: FedIT(*_base(scenario), padding=_padding(scenario)),
    "fedprox": lambda scenario: FedIT(
        *_base(scenario), optimizer=fedprox(scenario.strategy.proximal_mu), padding=_padding(scenario)
    ),
    **{name: _optimizer(name) for name in SERVER_OPTIMIZERS},
    "hetlora": lambda scenario: HetLoRA(
        *_base(scenario),
        gamma=scenario.strategy.rank_gamma,
        lam=scenario.strategy.rank_lambda,
        padding=_padding(scenario),
    ),
    "flexlora": lambda scenario: FlexLoRA(*_base(scenario), padding=_padding(scenario)),
    "flora": lambda scenario: FLoRA(*_base(scenario)),
    "ffa_lora": lambda scenario: FFALoRA(*_base(scenario), padding=_padding(scenario)),
    "fedsa_lora": lambda scenario: FedSALoRA(*_base(scenario), padding=_padding(scenario)),
    "fedex_lora": lambda scenario: FedExLoRA(*_base(scenario), padding=_padding(scenario)),
    "lora_fair": lambda scenario: LoRAFAIR(
        *_base(scenario), lam=scenario.strategy.fair_lambda, padding=_padding(scenario)
    ),
    "fedspeed": lambda scenario: FedSpeed(
        *_base(scenario),
        padding=_padding(scenario),
        rho=scenario.strategy.fedspeed_rho,
        merge=scenario.strategy.fedspeed_alpha,
        lam=scenario.strategy.fedspeed_lambda,
    ),
    "afa_cd": _afa(AFA),
    "afa_cs": _afa(AFACS),
}


def build_strategy(scenario: Scenario) -> LoraStrategy:
    """The strategy the scenario names (validated at load, so the name is known)."""
    return STRATEGIES[scenario.strategy.name](scenario)


__all__ = [
    "STRATEGIES", "ClientAdapter", "FFALoRA", "FLoRA", "FedExLoRA", "FedIT", "FedSALoRA", "FedSpeed", "FlexLoRA",
    "HetLoRA",
    "LoRAFAIR", "LoraStrategy", "build_strategy",
]  # fmt: skip
