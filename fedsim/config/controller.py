"""The controller's configuration: which algorithm, over which arms, with which constants.

Written in the scenario's style (`fedsim.config.scenario`): a pydantic section that forbids unknown
keys, is frozen and strict, carries a help text per field, and whose own checks name the field,
the value received and what is allowed. `validate_controller` reports every problem at once as a
`ControllerConfigError`, each line naming its dotted path.

The reasoning behind the less obvious defaults (the reward's are in `fedsim.controllers.reward`):

- `ranks` = (4, 8, 16, 32), `ratios` = (0.0, 0.2, 0.4, 0.6): doublings of the LoRA rank around
  the scenario's usual 8–16, and pruning from none to 60 % in steps of 20 %: 16 arms, few enough
  to explore in a handful of rounds per device. Accuracy per ratio: bench/pruning.py
  (docs/results/pruning.md).
- `ucb_c` = 1: the width B of the reward range; the reward module normalises rewards into
  [floor, 1] by default (`reward.normalise = "round_max"`), which is UCB1's assumption.
- `discount` = 0.99, `window` = 100: Garivier & Moulines' tunings γ = 1 − √(Υ/T)/(4B) and
  τ = 2B·√(T·ln T / Υ) for a device pulled T ≈ 1000 times whose best arm changes Υ ≈ 2 times
  (0.989 and 117): both remember about 100 pulls, ~6 per arm of the default grid. Shorter
  memories keep a 16-arm device exploring all the time.
- `xi` = 0.6: ξ > 1/2 is what their bounds require.
- `ts_noise_std` = 0.5: a reward bounded in [0, 1] is 1/2-sub-Gaussian (Hoeffding's lemma),
  so 0.5 is the largest noise a normalised reward can have.
- `sucb_depth` = 4: the tree's 16 leaves are then the default grid, refined from the whole box
  down; a device takes part in tens of rounds of a run, about what 16 points need, and a deeper
  tree (finer ranks and ratios) is still exploring when such a run ends.
- `sucb_rho` = 2^(−1/2): the tree splits the two axes in turn, so a cell's diameter halves every
  two levels; with a Lipschitz reward, HOO's smoothness term ν·ρ^h then shrinks with the cell.
- `pool` = "none": pooling a profile's statistics (`base`) assumes its devices behave alike, and
  biases the ones that do not; turn it on (`pool = "profile"`) for federated runs whose profiles
  are real hardware classes. `pool_pulls` = 10 is the C that bench/pooling.py's sweep favours:
  near the best where a profile's devices are alike, little bias where they differ
  (docs/results/pooling.md).
- `pool_spread` = true: with rewards divided by the round's max (the default), a profile whose
  devices all take the same point learns nothing that round; spreading their picks (`base`) lowers
  the regret of the controller tests' synthetic fleets (`sparse_regret`, tests/fedsim/controllers).
- `screen_slack` = 1.25: an arm predicted at 1.25·T scores the reward's straggler factor
  (T/t)² = 0.64, so it would need 1.56 times the progress of an arm that keeps the pace, and it
  holds every other device of the round too; a wrongly tried arm costs a whole round, a wrongly
  screened one at most a quarter of one. Chosen on bench/fedspine.py's runs
  (docs/results/fedspine.md).
- `commit_rounds` = 0: a bandit that knows its horizon gains nothing from exploring in the last
  round, but an exploit on few pulls can send a whole profile to one poorly supported point, with
  nothing left to spread them; on bench/fedspine.py's runs committing did not pay
  (docs/results/fedspine.md). An option for fleets whose devices play often enough for their means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedsim.config.errors import InputError, describe
from fedsim.config.names import CONTROLLERS, MAX_RATIO
from fedsim.config.section import Section


class ControllerConfigError(InputError):
    """A controller configuration that cannot be used; `problems` names every field at fault."""

    what = "controller config"


class RewardConfig(Section):
    """How one round's observations become rewards (`fedsim.controllers.reward`)."""

    contribution_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the client's contribution: the relative held-out loss decrease its share of an "
        "average gives the global model.",
    )
    contribution_examples: int = Field(
        16,
        ge=1,
        description="Held-out examples the contribution is scored on "
        "(the first of the central set; one forward pass per client).",
    )
    loss_weight: float = Field(
        0.5, ge=0, description="Weight of the relative local loss improvement (ℓ_before − ℓ_after)/ℓ_before."
    )
    prune_weight: float = Field(
        0.5,
        ge=0,
        description="Weight of the pruning progress min(ratio_reached, ratio_target), unscaled; with "
        "`pruning.deploy_ratios`, deploy_weight instead.",
    )
    deploy_weight: float = Field(
        0.0,
        ge=0,
        description="With `pruning.deploy_ratios`: weight of the closeness max(0, 1 − |s − ρ|/ρ) of the client's "
        "sparsity s to its profile's deploy ratio ρ.",
    )
    norm_weight: float = Field(0.0, ge=0, description="Weight of the update norm ‖ΔW‖.")
    energy_weight: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Weight of the energy cost E/Ē subtracted from the progress: the client's joules over the "
        "round's mean (0: energy is not weighed).",
    )
    time: Literal["round", "per_second"] = Field(
        "round",
        description="round: progress times the straggler factor "
        "(Oort); per_second: also divided by the client's own time.",
    )
    straggler: Literal["auto", "deadline", "fastest", "median", "none"] = Field(
        "auto",
        description="Threshold T of the straggler factor (T/t)^α: the deadline, the fastest round so far, the "
        "round's median client time, or none; auto: the deadline if any, else fastest.",
    )
    straggler_alpha: float = Field(2.0, ge=0, description="Exponent α of the straggler factor.")
    normalise: Literal["round_max", "round_mean", "baseline", "none"] = Field(
        "round_max",
        description="Divide rewards by the round's max, its mean, a discounted baseline of past rounds' means "
        "(FedEx), or nothing.",
    )
    baseline_discount: float = Field(
        0.9, ge=0, lt=1, description="normalise = baseline: discount β of the running mean of rounds' mean rewards."
    )
    floor: float = Field(0.01, ge=0, description="Least reward of a client that ran.")
    infeasible_penalty: float = Field(
        0.0, description="Reward of a client that could not run (out of memory); at most floor."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> RewardConfig:
        if self.contribution_weight + self.loss_weight + self.prune_weight + self.norm_weight <= 0:
            raise ValueError(
                "at least one of contribution_weight, loss_weight, prune_weight, norm_weight must be > 0, got all 0"
            )
        if self.infeasible_penalty > self.floor:
            raise ValueError(
                f"infeasible_penalty must be <= floor ({self.floor}) so that a feasible arm always beats an "
                f"infeasible one, got {self.infeasible_penalty}"
            )
        return self


Arm = tuple[int, float]


class ControllerConfig(Section):
    """Which bandit algorithm assigns each device its (LoRA rank, pruning ratio), and its constants."""

    name: str = Field(
        "sucb",
        description="Algorithm (`fedsim.controllers.CONTROLLERS`); "
        "sucb: FedSpine's smooth UCB over the (ratio, rank) box.",
    )
    ranks: tuple[int, ...] = Field(
        (4, 8, 16, 32), min_length=1, description="LoRA ranks of the arm grid, each >= 1; sucb spans [min, max]."
    )
    ratios: tuple[float, ...] = Field(
        (0.0, 0.2, 0.4, 0.6),
        min_length=1,
        description="Pruning ratios of the arm grid, each in [0, 0.95]; sucb spans [min, max].",
    )
    infer_infeasible: bool = Field(
        True, description="When (r, p) does not fit a device, also rule out every arm with rank >= r and ratio <= p."
    )
    ucb_c: float = Field(
        1.0,
        ge=0,
        description="ucb1, discounted_ucb, sliding_window_ucb, "
        "sucb: exploration scale c, the width of the reward range.",
    )
    discount: float = Field(0.99, gt=0, le=1, description="discounted_ucb: discount γ per pull of the device.")
    window: int = Field(100, ge=1, description="sliding_window_ucb: the device's last τ pulls are remembered.")
    xi: float = Field(
        0.6, gt=0, description="discounted_ucb, sliding_window_ucb: ξ in the bonus √(ξ log n / N), > 1/2."
    )
    exp3_gamma: float | Literal["auto"] = Field(
        "auto",
        description="exp3: share γ of uniform exploration, in (0, 1]; auto: γ_t = min(1, √(K ln K / ((e − 1) t))).",
    )
    exp3_update: Literal["exp3", "fedex"] = Field(
        "exp3", description="exp3: Auer et al.'s estimate r/p, or FedEx's baseline-corrected (r − λ)/p."
    )
    fedex_discount: float = Field(
        0.9, ge=0, lt=1, description="exp3_update = fedex: discount of the device's baseline λ."
    )
    ts_prior_mean: float = Field(0.5, description="thompson: prior mean of every arm.")
    ts_prior_std: float = Field(1.0, gt=0, description="thompson: prior standard deviation.")
    ts_noise_std: float = Field(0.5, gt=0, description="thompson: reward noise σ of the Gaussian likelihood.")
    pool: Literal["none", "profile"] = Field(
        "none",
        description="ucb1, discounted_ucb, sliding_window_ucb, thompson, sucb: score each device on its own "
        "statistics, or also on what its profile's peers lend (`controllers.base`).",
    )
    pool_pulls: float = Field(
        10.0,
        ge=0,
        description="pool = profile: C, the most pulls' worth per "
        "point a device borrows from its peers (0: no pooling).",
    )
    pool_spread: bool = Field(
        True,
        description="pool = profile: a profile's devices of one round "
        "pick in turn, each counting its peers' earlier picks as pulls.",
    )
    linucb_alpha: float = Field(1.0, ge=0, description="linucb: width α of the confidence bonus α√(xᵀA⁻¹x).")
    linucb_ridge: float = Field(1.0, gt=0, description="linucb: ridge λ, A starts at λI.")
    linucb_share: Literal["profile", "global"] = Field(
        "profile", description="linucb: one model per (device profile, arm), or one per arm for the whole fleet."
    )
    sucb_depth: int = Field(4, ge=1, le=10, description="sucb: depth D of the partition tree (2^D leaf cells).")
    sucb_nu: float = Field(
        1.0, ge=0, description="sucb: smoothness ν: the reward varies by at most ν·ρ^h inside a depth-h cell."
    )
    sucb_rho: float = Field(2**-0.5, gt=0, lt=1, description="sucb: shrink factor ρ of the smoothness term per level.")
    sucb_snap: Literal["integer", "grid"] = Field(
        "integer",
        description="sucb: a cell's rank is the nearest integer "
        "in [min(ranks), max(ranks)], or the nearest of `ranks`.",
    )
    screen: bool = Field(
        True,
        description="Skip, for a round, the arms a device's observed pace predicts to take over screen_slack × the "
        "straggler threshold (`controllers.pace`); not for fixed.",
    )
    screen_slack: float = Field(
        1.25,
        ge=1,
        allow_inf_nan=False,
        description="screen: how much slower than the threshold, or than its fastest arm, an arm may be predicted to "
        "be and still be tried.",
    )
    commit_rounds: int = Field(
        0,
        ge=0,
        description="The run's last N rounds explore no more: each device plays its best point so far; not for fixed.",
    )
    fixed_arm: Arm | None = Field(
        None, description="fixed: (rank, ratio) for every device, on the grid; default (max rank, min ratio)."
    )
    profile_arms: dict[str, Arm] = Field(
        {}, description="fixed: (rank, ratio) per device profile name, on the grid; overrides fixed_arm."
    )
    reward: RewardConfig = Field(
        RewardConfig(), description="How each round's reports become rewards (`fedsim.controllers.reward`)."
    )

    @field_validator("ranks", "ratios", "fixed_arm", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # TOML gives lists

    @field_validator("profile_arms", mode="before")
    @classmethod
    def _arms_to_tuples(cls, value: Any) -> Any:
        return (
            {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()} if isinstance(value, dict) else value
        )

    @field_validator("name")
    @classmethod
    def _known_controller(cls, value: str) -> str:
        if value not in CONTROLLERS:
            raise ValueError(f"unknown controller {value!r}; known: {', '.join(sorted(CONTROLLERS))}")
        return value

    @field_validator("ranks")
    @classmethod
    def _valid_ranks(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        problems = [f"values must be >= 1, got {r}" for r in value if r < 1]
        problems += _duplicates(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("ratios")
    @classmethod
    def _valid_ratios(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        problems = [
            f"values must be in [0, {MAX_RATIO}], got {p}"
            for p in value
            if not (math.isfinite(p) and 0 <= p <= MAX_RATIO)
        ]
        problems += _duplicates(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("exp3_gamma")
    @classmethod
    def _valid_gamma(cls, value: float | Literal["auto"]) -> float | Literal["auto"]:
        if value != "auto" and not 0 < value <= 1:
            raise ValueError(f"must be in (0, 1] or 'auto', got {value}")
        return value

    @field_validator("fixed_arm")
    @classmethod
    def _fixed_on_grid(cls, value: Arm | None, info: ValidationInfo) -> Arm | None:
        if value is not None and (msg := _off_grid(value, info)) is not None:
            raise ValueError(f"{value} is off the grid: {msg}")
        return value

    @field_validator("profile_arms")
    @classmethod
    def _profile_arms_on_grid(cls, value: dict[str, Arm], info: ValidationInfo) -> dict[str, Arm]:
        problems = [
            f"{name} = {arm} is off the grid: {msg}"
            for name, arm in value.items()
            if (msg := _off_grid(arm, info)) is not None
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return value


def _duplicates(values: tuple[Any, ...]) -> list[str]:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    return [f"duplicate value {v}" for v in dict.fromkeys(seen)]


def _off_grid(arm: Arm, info: ValidationInfo) -> str | None:
    """Why `arm` is not on the grid of the already-validated ranks and ratios (None if it is, or
    if those fields failed themselves: their own errors are reported)."""
    ranks, ratios = info.data.get("ranks"), info.data.get("ratios")
    if ranks is None or ratios is None:
        return None
    rank, ratio = arm
    if rank not in ranks:
        return f"rank {rank} is not one of ranks {list(ranks)}"
    if not any(abs(ratio - p) <= 1e-6 for p in ratios):
        return f"ratio {ratio} is not one of ratios {list(ratios)}"
    return None


def validate_controller(raw: Mapping[str, Any], source: str = "<dict>") -> ControllerConfig:
    """Validate a raw mapping (a TOML table); raise ControllerConfigError listing every problem."""
    try:
        return ControllerConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ControllerConfigError(source, [line for err in exc.errors() for line in describe(err)]) from None
