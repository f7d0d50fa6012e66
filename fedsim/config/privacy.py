"""The `privacy` section: client-level differential privacy of the released global adapter.

Written in the scenario's style (`fedsim.config.scenario`): a pydantic section that forbids
unknown keys, is frozen and strict, carries a help text per field, and whose own checks name
their dotted path (`privacy.clip`). The mechanism, its accounting and the rules behind the
checks below are in `fedsim.privacy`; this module stays torch- and dp_accounting-free, so the
check that a target ε is reachable is `fedsim.privacy.plan_problems`, run at preflight.

Defaults: δ = 1 / n^1.1 for n = `clients.num_clients`, resolved by `fedsim.privacy.plan`: below
1/n, since publishing one random client's data whole is already (0, 1/n)-DP;
adaptive clipping's target quantile γ = 0.5, clip learning rate η_C = 0.2 and indicator noise
σ_b = expected clients / 20 are those of Andrew et al. (2021, arXiv:1905.03871).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedsim.config.names import STRATEGIES
from fedsim.config.section import Section

# Strategies that cannot run with differential privacy on, and why (the scenario check quotes the
# reason). DP-FedAvg privatises a sum of clipped client updates; a rule is allowed when the global
# adapter is a function of that sum alone, with each client's influence bounded by the clip.
DP_REFUSED = {
    "hetlora": "its weights p_k ∝ ‖s_k B_k A_k‖_F are normalised by the round's sum of norms, so one client can "
    "carry up to the whole average (its influence is not bounded by clip / expected clients), and a client's "
    "self-pruned rank is sent in the clear",
    "flexlora": "it averages the clients' products s_k B_k A_k, which are not a sum of the uploaded factors: noise on "
    "the sum of the factors does not cover them",
    "flora": "it stacks every client's factors into the global adapter as they are (a concatenation, not a sum), so "
    "no noise on a sum can cover them",
    "fedex_lora": "its residual ΔW* − s_g B A needs the mean of the clients' products s_k B_k A_k, which noise on the "
    "sum of the factors does not cover",
    "lora_fair": "its correction needs the mean of the clients' products s_k B_k A_k, which noise on the sum of the "
    "factors does not cover",
    "fedspeed": "each client's correction term ĝ carries its un-noised updates into the next rounds' uploads "
    "(x̂ = x_K − λĝ), which this accounting does not cover",
    "afa_cd": "it aggregates stale updates as they arrive, each scaled by its own step count, not a sampled round's "
    "clipped sum that the accountant covers",
    "afa_cs": "it re-uses each device's last update in every later step, so one update is released many times",
}

PrivacyMode = Literal["off", "central", "local"]


class PrivacyConfig(Section):
    """Client-level DP-FedAvg (McMahan et al., 2018, arXiv:1710.06963), optionally with adaptive
    clipping (Andrew et al., 2021, arXiv:1905.03871): `fedsim.privacy`."""

    mode: PrivacyMode = Field(
        "off",
        description="off; central: clients clip, the server adds noise to the sum; local: each client also adds its "
        "own noise before encoding.",
    )
    clip: float | None = Field(
        None, gt=0, description="L2 bound C on a client's update (the initial C with adaptive clipping)."
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="z: noise std z·C on the sum (central) or on each update (local)."
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="Instead of noise_multiplier: the ε to reach after all rounds; z is calibrated."
    )
    delta: float | None = Field(None, gt=0, lt=1, description="δ of the (ε, δ) guarantee; default 1 / num_clients^1.1.")
    adaptive: bool = Field(False, description="Central: the clip follows a quantile of the update norms.")
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive: γ, the share of updates the clip aims to leave unclipped."
    )
    clip_lr: float = Field(0.2, gt=0, description="adaptive: η_C of the geometric step C ← C·exp(−η_C (b̃ − γ)).")
    indicator_noise: float | Literal["auto"] = Field(
        "auto", description="adaptive: std σ_b of the noise on the count of unclipped updates; auto: expected / 20."
    )
    secure_noise: bool = Field(
        False,
        description="Draw the noise from the OS's entropy instead of the scenario seed (required on real devices); "
        "runs are then not reproducible.",
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        problems = own_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def own_problems(p: PrivacyConfig) -> list[str]:
    """What makes the section unusable on its own (nothing while `mode` is "off", so that a
    scenario can switch privacy off with `--set privacy.mode=off` and keep its settings)."""
    problems = []
    if p.indicator_noise != "auto" and not p.indicator_noise > 0:
        problems.append(f"`privacy.indicator_noise` must be > 0 or 'auto', got {p.indicator_noise}")
    if not p.enabled:
        return problems
    if p.clip is None:
        problems.append(f"`privacy.clip` is required with privacy.mode = {p.mode!r}: the L2 bound of every update")
    if p.noise_multiplier is None and p.target_epsilon is None:
        problems.append(
            f"`privacy.noise_multiplier`: privacy.mode = {p.mode!r} needs noise: give noise_multiplier or "
            "target_epsilon"
        )
    if p.noise_multiplier is not None and p.target_epsilon is not None:
        problems.append(
            f"`privacy.target_epsilon` = {p.target_epsilon} and `privacy.noise_multiplier` = {p.noise_multiplier} "
            "both set the noise: give one"
        )
    if p.mode == "local" and p.adaptive:
        problems.append(
            "`privacy.adaptive` needs privacy.mode = 'central': the count of unclipped updates is noised on the "
            "server, which local mode does not trust"
        )
    return problems


def privacy_problems(s: Any) -> list[str]:
    """Rules that span the privacy section and the others. Takes any object with the scenario's
    section attributes (a Scenario, or the sections that validated on their own); a missing one
    is skipped, as `fedsim.config.scenario._cross_field_problems` does."""
    p: PrivacyConfig | None = getattr(s, "privacy", None)
    if p is None or not p.enabled:
        return []
    strategy, fleet, pruning = (getattr(s, name, None) for name in ("strategy", "fleet", "pruning"))
    problems = []
    if strategy is not None and strategy.name in DP_REFUSED:
        allowed = ", ".join(n for n in STRATEGIES if n not in DP_REFUSED)
        problems.append(
            f"`strategy.name` = {strategy.name!r} cannot run with privacy.mode = {p.mode!r}: "
            f"{DP_REFUSED[strategy.name]}; use {allowed}, or set privacy.mode = 'off'"
        )
    if p.mode == "central" and fleet is not None and fleet.overcommit > 0:
        problems.append(
            f"`fleet.overcommit` = {fleet.overcommit} must be 0 with privacy.mode = 'central': the accountant's "
            "amplification assumes each client takes part with probability per_round / num_clients"
        )
    if fleet is not None and fleet.clock == "measured" and not p.secure_noise:
        problems.append(
            "`privacy.secure_noise` must be true on real devices (fleet.clock = 'measured'): noise drawn from the "
            "scenario's seed can be recomputed by anyone who knows it"
        )
    if getattr(s, "controller", None) is not None:
        problems.append(
            "`controller` cannot run with privacy on: its rewards read each client's own loss and update, and the "
            "arms it picks from them are not covered by the accountant"
        )
    if pruning is not None and pruning.where == "client" and _clients_prune(s):
        problems.append(
            "`pruning.where` = 'client' cannot run with privacy on: each client picks the heads and channels it keeps "
            "from its own data and sends them in the clear; set pruning.where = 'server' or the ratios to 0"
        )
    return problems


def _clients_prune(s: Any) -> bool:
    prunes = getattr(s, "prunes", None)
    if isinstance(prunes, bool):
        return prunes
    pruning = getattr(s, "pruning", None)
    return pruning is not None and bool(pruning.enabled)
