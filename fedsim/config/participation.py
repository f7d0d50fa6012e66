"""The `participation` section: who decides when a device trains, and on which clock.

"sync" is fedsim's round: the server samples the clients, waits for them up to the
deadline and aggregates (`fedsim.server.rounds`). "async" is anarchic participation on an
asynchronous clock (Yang et al., ICML 2022, `fedsim.server.asynchronous`): each device decides
*whether* to start (online, charged, and a draw of `join_probability`) and *how many local steps*
to run (`steps_policy` between `min_steps` and `max_steps`); the server aggregates every
`clients.per_round` updates that arrive, each computed on the model version it started from, and
drops those staler than `max_staleness`. Only strategies that aggregate stale, step-normalised
updates run asynchronously (`ASYNC_STRATEGIES`: AFA-CD and AFA-CS, `strategies.afa`), and they run
only so: "auto" (the default) is "async" for them and "sync" for the others, so one scenario
compares both kinds (`fedsim compare --strategies fedit,afa_cd`); `asynchronous` resolves it.

Torch-free, in the scenario's style (`fedsim.config.section`): every check names its dotted path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedsim.config.names import ASYNC_STRATEGIES
from fedsim.config.section import Section

StepsPolicy = Literal["uniform", "battery"]


class ParticipationConfig(Section):
    """How devices take part: server-sampled synchronous rounds, or anarchic and asynchronous."""

    mode: Literal["auto", "sync", "async"] = Field(
        "auto",
        description="sync: the server samples each round and waits for it; async: devices decide when to train and "
        "for how many steps, the server aggregates updates as they arrive (strategy afa_cd or afa_cs); "
        "auto: async for afa_cd and afa_cs, sync for the others.",
    )
    max_staleness: int = Field(
        8, ge=0, description="async: updates started more than this many server steps ago are dropped (τ ≤ bound)."
    )
    concurrency: int = Field(
        0, ge=0, description="async: most devices training at once (0: ⌈clients.per_round·(1 + fleet.overcommit)⌉)."
    )
    join_probability: float = Field(
        1.0,
        gt=0,
        le=1,
        description="async: chance that an idle device, online and charged, chooses to start when the model changes.",
    )
    min_steps: int | None = Field(
        None, ge=1, description="async: fewest local steps a device runs (None: train.local_steps)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="async: most local steps a device runs (None: train.local_steps)."
    )
    steps_policy: StepsPolicy = Field(
        "uniform",
        description="async: how a device picks its steps: uniform in [min_steps, max_steps], or battery "
        "(min + (max − min)·its charge share; mains-powered devices run max_steps).",
    )

    @model_validator(mode="after")
    def _steps_in_order(self) -> ParticipationConfig:
        if self.min_steps is not None and self.max_steps is not None and self.min_steps > self.max_steps:
            raise ValueError(f"`min_steps` ({self.min_steps}) must be <= `max_steps` ({self.max_steps})")
        return self

    def asynchronous(self, strategy: str) -> bool:
        """Whether a run of `strategy` under this section is on the asynchronous clock."""
        return self.mode == "async" or (self.mode == "auto" and strategy in ASYNC_STRATEGIES)

    def steps_range(self, local_steps: int) -> tuple[int, int]:
        """(min, max) local steps a device may choose, `train.local_steps` filling what is unset."""
        low = self.min_steps if self.min_steps is not None else min(local_steps, self.max_steps or local_steps)
        high = self.max_steps if self.max_steps is not None else max(local_steps, low)
        return low, high


def participation_problems(s: Any) -> list[str]:
    """Rules that span `participation` and the other sections (any object with the scenario's
    section attributes; a missing one is skipped, as `fedsim.config.scenario` does)."""
    p: ParticipationConfig | None = getattr(s, "participation", None)
    strategy = getattr(s, "strategy", None)
    if p is None or (strategy is None and p.mode == "auto"):
        return []
    if not p.asynchronous(strategy.name if strategy is not None else ""):
        if strategy is not None and strategy.name in ASYNC_STRATEGIES:
            return [
                f"`strategy.name` = {strategy.name!r} aggregates stale, step-normalised updates as they arrive: "
                "it runs only with participation.mode = 'async' (or 'auto')"
            ]
        return []
    problems = []
    if strategy is not None and strategy.name not in ASYNC_STRATEGIES:
        problems.append(
            f"`participation.mode` = 'async' cannot run {strategy.name!r}, which needs synchronous rounds (every "
            f"update computed on the current model): use {' or '.join(map(repr, sorted(ASYNC_STRATEGIES)))}"
        )
    if strategy is not None and strategy.name in ASYNC_STRATEGIES and strategy.rank_padding == "holders":
        problems.append(
            f"`strategy.rank_padding` = 'holders' does not apply to {strategy.name!r}, which averages updates "
            "(a rank a device does not hold is an update of zero): use 'paper' or 'zeros'"
        )
    fleet, simulation, compression = (getattr(s, n, None) for n in ("fleet", "simulation", "compression"))
    if fleet is not None and fleet.clock == "measured":
        problems.append(
            "`participation.mode` = 'async' runs on the simulated clock: it cannot run with fleet.clock = 'measured'"
        )
    if getattr(s, "controller", None) is not None:
        problems.append(
            "`controller` cannot run with participation.mode = 'async': devices pick their own steps, and its reward "
            "compares the clients of one synchronous round"
        )
    if compression is not None and compression.downlink:
        problems.append(
            "`compression.downlink` cannot run with participation.mode = 'async': it sends each client the change "
            "since the version it holds, and an asynchronous device may start from any recent version"
        )
    if simulation is not None and simulation.packing == "on":
        problems.append(
            "`simulation.packing` = 'on' cannot run with participation.mode = 'async': devices start at different "
            "times with their own step counts; set 'auto' or 'off'"
        )
    return problems


__all__ = ["ParticipationConfig", "StepsPolicy", "participation_problems"]
