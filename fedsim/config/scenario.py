"""Scenario files: the typed, validated description of one federated run.

A scenario is a TOML file (see `scenarios/`). It is validated at the boundary, before anything
runs or is written, and every problem is reported at once by its dotted path
("`train.lr` must be greater than 0, got -5"), in the manner of torchtune's `ConfigError`.

We use pydantic for the schema rather than hand-checked dataclasses (PEFT's style): it already
collects every error with its location, forbids unknown keys and checks types strictly, which is
what the hand-written `__post_init__` checks would re-implement. Each field still carries its help
text (`description`), as PEFT's config fields do.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedsim.config.availability import Availability
from fedsim.config.controller import ControllerConfig
from fedsim.config.devices import CATALOG, DeviceProfile
from fedsim.config.errors import InputError, describe, read_toml
from fedsim.config.names import ATTENTION, MLP, PRUNING_REFUSED, SERVER_OPTIMIZERS, STRATEGIES, ImportanceScore
from fedsim.config.participation import ParticipationConfig, participation_problems
from fedsim.config.privacy import PrivacyConfig, privacy_problems
from fedsim.config.section import Section
from fedsim.config.sources import check_data_source, check_model_name, data_file_problems
from fedsim.config.tracking import TrackingConfig


class ScenarioError(InputError):
    """A scenario that cannot run; `problems` lists every reason, each naming its dotted path."""

    what = "scenario"


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="Registry name (`fedsim models`), local path, or HF id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str, info: ValidationInfo) -> str:
        if info.context and info.context.get("on_client"):  # see DataConfig._known_source
            return value
        if (msg := check_model_name(value)) is not None:
            raise ValueError(msg)
        return value


class DataConfig(Section):
    task: str = Field(
        "mixed", description="Built-in task (`fedsim tasks`), a .jsonl/.json/.csv/.parquet path, or hf:<name>[:split]."
    )
    num_examples: int = Field(
        2000, ge=0, description="Built-in tasks: examples generated; user data: row cap (0 = all)."
    )
    prompt_field: str | None = Field(None, description="Prompt column; default prompt or instruction(+input).")
    response_field: str | None = Field(None, description="Response column; default response or output.")
    domain_field: str | None = Field(None, description="Domain column; default domain, else 'default'.")
    partitioner: Literal["iid", "dirichlet", "pathological", "natural"] = Field(
        "iid", description="flwr-datasets partitioner."
    )
    partition_by: str = Field("domain", description="Column the non-IID partitioners split on.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; small is more skewed.")
    classes_per_client: int = Field(2, ge=1, description="Pathological: distinct values of partition_by per client.")
    test_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of each client's data kept for its own test split."
    )
    central_test_size: int = Field(
        256,
        ge=1,
        description="Held-out examples the server evaluates on, "
        "taken before partitioning; all of them after the last round.",
    )

    @field_validator("task")
    @classmethod
    def _known_source(cls, value: str, info: ValidationInfo) -> str:
        # A client re-validates the scenario it receives; on a real device the data file lives
        # elsewhere or not at all, so only the server checks that the source exists.
        if info.context and info.context.get("on_client"):
            return value
        if (msg := check_data_source(value)) is not None:
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _readable_file(self, info: ValidationInfo) -> DataConfig:
        # A look at the file's start only (`sources.data_file_problems`); preflight reads it whole.
        if info.context and info.context.get("on_client"):  # see _known_source
            return self
        problems = data_file_problems(self.task, self.prompt_field, self.response_field, self.domain_field)
        if problems:
            raise ValueError("\n".join(f"`data.task`: {p}" for p in problems))
        return self


class ClientsConfig(Section):
    num_clients: int = Field(4, ge=1, description="Virtual clients (Flower SuperNodes) in the federation.")
    per_round: int = Field(2, ge=1, description="Clients sampled for training each round.")
    eval_per_round: int = Field(2, ge=0, description="Clients sampled for federated evaluation each round (0 = none).")


class TrainConfig(Section):
    local_steps: int = Field(10, ge=1, description="Optimizer steps per client per round.")
    batch_size: int = Field(8, ge=1, description="Examples per step.")
    max_seq_len: int = Field(
        64, ge=8, description="Prompt+response tokens kept per example (prompt truncated from the left)."
    )
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 = no clipping).")
    threads: int = Field(1, ge=1, description="torch threads per client process (fixed for reproducibility).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: CUDA when this process sees a GPU (Ray shows one to a client only if "
        "simulation.num_gpus_per_client > 0).",
    )


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"), min_length=1, description="Module names LoRA wraps.")
    profile_ranks: dict[str, int] = Field(
        {}, description="Rank per device profile, e.g. {phone = 4}; the global adapter keeps `rank` (the maximum)."
    )
    client_ranks: dict[str, int] = Field(
        {}, description='Rank per client id (a string key, e.g. {"3" = 2}); overrides profile_ranks.'
    )

    @model_validator(mode="after")
    def _ranks_within_global(self) -> LoraConfig:
        problems = []
        for field in ("profile_ranks", "client_ranks"):
            for key, r in getattr(self, field).items():
                if not 1 <= r <= self.rank:
                    problems.append(
                        f"`lora.{field}.{key}` = {r} must be in [1, lora.rank = {self.rank}] (the global adapter's "
                        "rank serves every client)"
                    )
                if field == "client_ranks" and not key.isdigit():
                    problems.append(f"`lora.client_ranks` keys are client ids, got {key!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @field_validator("target_modules", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        # TOML gives a list; a tuple keeps the frozen config hashable (a cache key in clients).
        return tuple(value) if isinstance(value, list) else value


class StrategyConfig(Section):
    name: str = Field("fedit", description="Aggregation strategy (see `strategies`).")
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: weight μ of the proximal term μ/2·‖θ − θ_global‖².")
    server_lr: float = Field(0.1, gt=0, description="fedadam/fedyogi/fedadagrad/fedavgm: server learning rate η.")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: server momentum β.")
    beta_1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi: first-moment decay.")
    beta_2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="fedadam/fedyogi/fedadagrad: adaptivity τ.")
    rank_gamma: float = Field(
        0.99,
        gt=0,
        le=1,
        description="hetlora: a client's tail is ranks ⌊γ·r_k⌋..r_k: the penalty acts on it, self-pruning drops it "
        "(r_k ← max(1, ⌊γ·r_k⌋)); 1 = neither.",
    )
    rank_lambda: float = Field(0.01, ge=0, description="hetlora: weight λ of the tail penalty λ‖B_tail·A_tail‖_F.")
    fair_lambda: float = Field(0.01, ge=0, description="lora_fair: weight λ of ‖ΔB‖_F in the residual correction.")
    fedspeed_rho: float = Field(0.1, ge=0, allow_inf_nan=False, description="fedspeed: ascent step ρ (0: no ascent).")
    fedspeed_alpha: float = Field(
        1.0, ge=0, le=1, description="fedspeed: merge α of the gradients at x and at the ascent point."
    )
    fedspeed_lambda: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="fedspeed: λ of the prox term (x − x^t)/λ and its correction."
    )
    afa_server_lr: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="afa_cd/afa_cs: server learning rate η on the mean step-normalised update (None: the mean of "
        "participation's step range, so equal steps without staleness give FedAvg of the updates).",
    )
    rank_padding: Literal["paper", "holders", "zeros"] = Field(
        "paper",
        description="Mixed ranks: 'holders' averages each rank over the clients that hold it, 'zeros' zero-pads; "
        "'paper': the strategy's paper (zeros for hetlora and flexlora, holders for the others).",
    )

    @field_validator("name")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; known: {', '.join(sorted(STRATEGIES))}")
        return value


class EvalConfig(Section):
    central_examples: int = Field(
        0,
        ge=0,
        description="Held-out examples evaluated each round but "
        "the last, which uses the whole set (0 = the whole set).",
    )
    client_examples: int = Field(16, ge=1, description="Max test examples a client evaluates.")
    max_new_tokens: int = Field(10, ge=1, description="Greedy generation length for exact match.")
    batch_size: int = Field(16, ge=1, description="Evaluation batch size.")


class SimulationConfig(Section):
    num_cpus_per_client: float = Field(1.0, gt=0, description="Ray CPUs per virtual client (sets parallelism).")
    num_gpus_per_client: float = Field(0.0, ge=0, description="Ray GPUs per virtual client (0 = CPU).")
    ray_address: str | None = Field(None, description="Existing Ray cluster to join (ray.init address), e.g. 'auto'.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Seconds the server waits for a round's replies.")
    packing: Literal["auto", "off", "on"] = Field(
        "auto",
        description="Train each round's clients in packs on one shared trainer (`clients.packing`); "
        "auto: when a GPU is visible.",
    )
    max_clients_per_step: int = Field(16, ge=1, description="packing: most clients in one pack.")
    pack_memory_gib: float = Field(0.0, ge=0, description="packing: GiB a packed step may use (0 = 90 % of free).")
    pack_timeout_s: float = Field(
        300.0, gt=0, description="packing: seconds a pack waits for its clients, then trains those that came."
    )


class CompressionConfig(Section):
    """How client updates (local − global adapter) travel: always through `fedsim.compression`.
    The default, `none` in float32, is lossless."""

    method: Literal["none", "topk", "compeft"] = Field(
        "none", description="none: plain tensors; topk: top-k values; compeft: top-k signs × α·σ."
    )
    density: float = Field(0.1, gt=0, le=1, description="Share d of entries kept by topk/compeft: ceil(d·n).")
    alpha: float | Literal["auto"] = Field(
        "auto",
        description="ComPEFT scale multiplier (kept entries become sign·α·σ), > 0; 'auto': the server picks it from "
        "alpha_grid each round.",
    )
    alpha_grid: tuple[float, ...] = Field(
        (1.0, 2.0, 4.0, 8.0, 16.0), min_length=1, description="Candidates for alpha = 'auto', scored by held-out loss."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Value dtype of none/topk.")
    per_tensor: bool = Field(False, description="Select top-k and σ per tensor instead of over the whole update.")
    error_feedback: bool = Field(False, description="Client adds what it did not send last time to its next update.")
    downlink: bool = Field(
        False, description="Also compress the server → client direction: send the global adapter's change."
    )

    @property
    def alpha_auto(self) -> bool:
        """Whether the server tunes ComPEFT's α (clients then encode with α = 1)."""
        return self.method == "compeft" and self.alpha == "auto"

    @field_validator("alpha_grid", mode="before")
    @classmethod
    def _grid_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _positive_alphas(self) -> CompressionConfig:
        problems = [f"`compression.alpha_grid` values must be > 0, got {a}" for a in self.alpha_grid if not a > 0]
        if self.alpha != "auto" and not self.alpha > 0:
            problems.append(f"`compression.alpha` must be > 0 or 'auto', got {self.alpha}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class PruningConfig(Section):
    """Structured pruning of each client's model (`fedsim.pruning`): whole KV groups and MLP
    channels go, so a weak device computes and holds less; LoRA trains on what is left, and the
    server aggregates each coordinate over the clients that kept it. Off while every ratio is 0."""

    ratio: float = Field(
        0.0,
        ge=0,
        le=0.95,
        description="Target share of the prunable parameters "
        "(q,k,v,o,gate,up,down of every layer) each client removes.",
    )
    profile_ratios: dict[str, float] = Field(
        {}, description="Target ratio per device profile, e.g. {jetson-tx2 = 0.5}; overrides `ratio`."
    )
    client_ratios: dict[str, float] = Field(
        {}, description="Target ratio per client id (string key); overrides profile_ratios."
    )
    importance: ImportanceScore = Field(
        "lora_grad",
        description="Importance score (`fedsim.pruning.importance`); "
        "lora_grad needs LoRA on an attention and an MLP projection.",
    )
    mode: Literal["per_layer", "global"] = Field(
        "per_layer", description="Budget per decoder layer, or one budget over the model."
    )
    where: Literal["client", "server"] = Field(
        "client",
        description="client: each client scores its own data between its LoRA steps; server: the server cuts by the "
        "global adapter's importance between rounds.",
    )
    interval_steps: int = Field(20, ge=1, description="Local LoRA steps between prune events (FedSpine: about 20).")
    events: int = Field(
        4,
        ge=1,
        description="Prune events to reach the target ratio (cubic schedule; 1 = prune once, before the first step).",
    )
    ema_beta: float = Field(
        0.9, ge=0, lt=1, description="Moving average of lora_grad scores over the steps before an event."
    )
    score_steps: int = Field(
        5, ge=1, description="lora_grad: training steps before an event whose gradients are averaged."
    )
    calibration_examples: int = Field(
        8, ge=1, description="Examples of the batch a score without training gradients reads."
    )
    deploy_ratios: dict[str, float] = Field(
        {},
        description="Pruning ratio of the model each device profile deploys, e.g. {jetson-tx2 = 0.2}; scored as "
        "`deployed_loss` (`fedsim.server.deployed`).",
    )
    deploy_importance: ImportanceScore = Field(
        "first_order",
        description="Importance score of the server's one-shot cut of the global adapter to a deploy ratio.",
    )
    deploy_panel: int = Field(
        4,
        ge=1,
        description="Devices per profile with a deploy ratio that the deployed scores average over (a seeded sample).",
    )

    @property
    def enabled(self) -> bool:
        return any(r > 0 for r in (self.ratio, *self.profile_ratios.values(), *self.client_ratios.values()))

    @model_validator(mode="after")
    def _ratios_in_range(self) -> PruningConfig:
        problems = [
            f"`pruning.{field}.{key}` = {r} must be in [0, 0.95]"
            for field in ("profile_ratios", "client_ratios", "deploy_ratios")
            for key, r in getattr(self, field).items()
            if not 0 <= r <= 0.95
        ]
        problems += [
            f"`pruning.client_ratios` keys are client ids, got {key!r}"
            for key in self.client_ratios
            if not key.isdigit()
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self


class FleetGroup(Section):
    profile: str = Field(..., min_length=1, description="Device profile (catalog name, or one of fleet.profiles).")
    count: int = Field(..., ge=1, description="Clients of this profile; client ids follow the group order.")
    availability: Availability | None = Field(None, description="Overrides the profile's availability for this group.")


class FleetConfig(Section):
    """Which device each client is. Without groups or a trace, every client is `default_profile`."""

    profiles: dict[str, DeviceProfile] = Field({}, description="Your own profiles, by name (override the catalog's).")
    profiles_file: str | None = Field(None, description="A TOML file of [name] profile tables.")
    groups: tuple[FleetGroup, ...] = Field(
        (), description="Mix of profiles with counts, e.g. [{profile='jetson-tx2', count=30}]."
    )
    trace: str | None = Field(
        None, description="FedScale-style CSV: client_id,profile,windows[,figures]; replaces groups."
    )
    default_profile: str = Field("laptop-cpu", description="Profile of every client when no groups or trace are given.")
    jitter: float = Field(0.1, ge=0, le=1, description="Per-client log-normal spread (sigma) of speed and bandwidths.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Probability that a sampled client drops out mid-round.")
    overcommit: float = Field(
        0.0, ge=0, le=4, description="Sample per_round*(1+overcommit) and keep the first per_round to finish."
    )
    deadline_s: float = Field(
        0.0, ge=0, description="Round deadline in simulated seconds; later clients are stragglers (0 = none)."
    )
    idle_step_s: float = Field(
        60.0,
        gt=0,
        description="Simulated seconds a round lasts when no update could be kept (nobody online, all lost).",
    )
    clock: Literal["simulated", "measured"] = Field(
        "simulated",
        description="simulated: the fleet model's clock; measured (real devices): the server's measured round trips, "
        "without modelled availability, memory or dropout.",
    )
    batteries: bool = Field(
        False,
        description="Drain each battery-powered device by the energy it spends; it takes part only while its charge "
        "is above its threshold (`fedsim.fleet.energy`).",
    )

    @field_validator("groups", mode="before")
    @classmethod
    def _groups_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("groups", "default_profile")
    @classmethod
    def _known_profiles(cls, value: Any, info: ValidationInfo) -> Any:
        # Fields validate in order: `profiles` and `profiles_file` are known here, unless they
        # failed themselves (then their own errors are reported and this check waits).
        if "profiles" not in info.data or info.data.get("profiles_file") or "profiles_file" not in info.data:
            return value
        known = {*CATALOG, *info.data["profiles"]}
        names = [g.profile for g in value] if info.field_name == "groups" else [value]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"unknown device profile(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> FleetConfig:
        if self.groups and self.trace:
            raise ValueError("`fleet`: give either groups or a trace, not both")
        if self.batteries and self.clock == "measured":
            raise ValueError(
                "`fleet.batteries` simulates batteries on the fleet model's clock: not with clock = 'measured'"
            )
        return self


class Scenario(Section):
    name: str = Field("run", min_length=1, description="Run name; the run directory is <out>/<name>.")
    seed: int = Field(0, ge=0, description="Seeds data, sampling and training: same seed, same metrics.")
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    clients: ClientsConfig = ClientsConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    strategy: StrategyConfig = StrategyConfig()
    eval: EvalConfig = EvalConfig()
    simulation: SimulationConfig = SimulationConfig()
    fleet: FleetConfig = FleetConfig()
    compression: CompressionConfig = CompressionConfig()
    pruning: PruningConfig = PruningConfig()
    controller: ControllerConfig | None = Field(
        None,
        description="Bandit that picks each sampled client's (LoRA rank, pruning ratio) every round "
        "(`fedsim.controllers`); absent: static ranks and ratios.",
    )
    privacy: PrivacyConfig = PrivacyConfig()
    participation: ParticipationConfig = Field(
        ParticipationConfig(),
        description="Who decides when a device trains: server-sampled synchronous rounds, or anarchic devices on an "
        "asynchronous clock (`fedsim.config.participation`).",
    )
    tracking: TrackingConfig = Field(
        TrackingConfig(), description="Experiment trackers the server logs to (`fedsim.results.tracking`)."
    )

    @property
    def prunes(self) -> bool:
        """Whether any client may be pruned (a ratio above 0, or a controller arm with one)."""
        return self.pruning.enabled or (self.controller is not None and max(self.controller.ratios) > 0)

    @property
    def asynchronous(self) -> bool:
        """Whether the run is on the asynchronous clock (`fedsim.config.participation`)."""
        return self.participation.asynchronous(self.strategy.name)

    @model_validator(mode="after")
    def _cross_checks(self) -> Scenario:
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def to_json(self) -> str:
        """The resolved scenario, as it travels to clients inside a Flower ConfigRecord. A default
        `privacy` section (off) is left out: its bytes would be on the clock of every message; so are
        the packing settings, always (how a simulation trains, not what: a pack's message carries its own), and
        the trackers and `participation` (the server's alone: a device is told its steps, LOCAL_STEPS)."""
        exclude: dict[str, Any] = {"simulation": set(PACKING_FIELDS), "tracking": True, "participation": True}
        if self.privacy == PrivacyConfig():
            exclude["privacy"] = True
        if not self.fleet.batteries:  # off, left out likewise (clients never read it)
            exclude["fleet"] = {"batteries"}
        return self.model_dump_json(exclude=exclude)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        """The scenario a client received (JSON turns tuples into lists, hence not strict)."""
        return cls.model_validate(json.loads(text), strict=False, context={"on_client": True})


def _cross_field_problems(s: Scenario | _Sections) -> list[str]:
    """Rules that span sections. Takes any object with the section attributes (a Scenario, or
    the sections that validated on their own when others did not); a missing one is skipped."""
    clients, data, eval_ = (getattr(s, name, None) for name in ("clients", "data", "eval"))
    problems = []
    if clients is not None:
        for field in ("per_round", "eval_per_round"):
            value = getattr(clients, field)
            if value > clients.num_clients:
                problems.append(
                    f"`clients.{field}` must be <= clients.num_clients ({clients.num_clients}), got {value}"
                )
    strategy, compression = getattr(s, "strategy", None), getattr(s, "compression", None)
    if (
        strategy is not None
        and compression is not None
        and compression.alpha_auto
        and strategy.name in SERVER_OPTIMIZERS
    ):
        problems.append(
            f"`compression.alpha` = 'auto' cannot be used with the stateful server optimiser {strategy.name!r} "
            "(it aggregates several candidates per round): set a number"
        )
    if strategy is not None and strategy.name == "flora" and strategy.rank_padding != "paper":
        problems.append(
            f"`strategy.rank_padding` = {strategy.rank_padding!r} does not apply to 'flora', which stacks every "
            "client's factors at their own rank: leave it 'paper'"
        )
    problems += _rank_problems(getattr(s, "lora", None), clients, getattr(s, "fleet", None), strategy, compression)
    problems += _pruning_problems(
        getattr(s, "pruning", None),
        getattr(s, "lora", None),
        clients,
        getattr(s, "fleet", None),
        strategy,
        compression,
        getattr(s, "controller", None),
    )
    problems += _controller_problems(
        getattr(s, "controller", None), getattr(s, "lora", None), getattr(s, "fleet", None)
    )
    problems += privacy_problems(s)
    problems += participation_problems(s)
    problems += _packing_problems(getattr(s, "simulation", None), getattr(s, "lora", None))
    if data is not None and eval_ is not None and eval_.central_examples > data.central_test_size:
        problems.append(
            f"`eval.central_examples` must be <= data.central_test_size ({data.central_test_size}), got "
            f"{eval_.central_examples}"
        )
    return problems


def _unknown_names(
    client_field: str,
    by_client: dict[str, Any],
    profile_field: str,
    by_profile: dict[str, Any],
    clients: ClientsConfig | None,
    fleet: FleetConfig | None,
) -> list[str]:
    """Keys of a per-client table that are not client ids, and of a per-profile table that are
    not profiles (profiles from a file or a trace are known only at preflight)."""
    problems = []
    if clients is not None:
        problems += [
            f"`{client_field}.{key}`: client {key} does not exist (clients 0..{clients.num_clients - 1})"
            for key in by_client
            if key.isdigit() and int(key) >= clients.num_clients
        ]
    if fleet is not None and not fleet.profiles_file and not fleet.trace:
        known = {*CATALOG, *fleet.profiles}
        problems += [
            f"`{profile_field}.{name}`: unknown device profile; known: {', '.join(sorted(known))}"
            for name in by_profile
            if name not in known
        ]
    return problems


def _rank_problems(
    lora: LoraConfig | None,
    clients: ClientsConfig | None,
    fleet: FleetConfig | None,
    strategy: StrategyConfig | None,
    compression: CompressionConfig | None,
) -> list[str]:
    """Per-client ranks name real clients and profiles, and fit the strategy and the downlink."""
    if lora is None:
        return []
    problems = _unknown_names(
        "lora.client_ranks", lora.client_ranks, "lora.profile_ranks", lora.profile_ranks, clients, fleet
    )
    mixed = bool(lora.client_ranks or lora.profile_ranks) and any(
        r != lora.rank for r in (*lora.client_ranks.values(), *lora.profile_ranks.values())
    )
    if compression is not None and compression.downlink and strategy is not None:
        if mixed:
            problems.append(
                "`compression.downlink` needs one rank for every client "
                "(lora.profile_ranks / client_ranks differ from lora.rank)"
            )
        if strategy.name in ("flora", "fedex_lora", "fedsa_lora"):
            problems.append(
                f"`compression.downlink` cannot carry {strategy.name!r}'s "
                "state (base-weight merges or personal factors)"
            )
        if strategy.name == "hetlora" and strategy.rank_gamma < 1:
            problems.append(
                "`compression.downlink` needs one rank for every client, but hetlora's clients self-prune their ranks "
                f"(`strategy.rank_gamma` = {strategy.rank_gamma} < 1): set rank_gamma = 1 or turn the downlink off"
            )
    if strategy is not None and strategy.name == "fedsa_lora" and clients is not None and clients.eval_per_round == 0:
        problems.append(
            "`strategy.name` = 'fedsa_lora' keeps a personal B on each client: its accuracy is measured on the "
            "clients' own test splits, so `clients.eval_per_round` must be >= 1"
        )
    return problems


def _pruning_problems(
    pruning: PruningConfig | None,
    lora: LoraConfig | None,
    clients: ClientsConfig | None,
    fleet: FleetConfig | None,
    strategy: StrategyConfig | None,
    compression: CompressionConfig | None,
    controller: ControllerConfig | None = None,
) -> list[str]:
    """Pruning names real clients and profiles, and fits the strategy, the adapter and the downlink
    (clients prune when a ratio or a controller's arm is above 0; the server scores importance
    for that and for deploy ratios)."""
    if pruning is None:
        return []
    problems = _unknown_names(
        "pruning.client_ratios", pruning.client_ratios, "pruning.profile_ratios", pruning.profile_ratios, clients, fleet
    )
    problems += _unknown_names(
        "pruning.client_ratios", {}, "pruning.deploy_ratios", pruning.deploy_ratios, clients, fleet
    )
    clients_prune = pruning.enabled or (controller is not None and max(controller.ratios) > 0)
    if not clients_prune and not any(pruning.deploy_ratios.values()):
        return problems
    if clients_prune and strategy is not None and strategy.name in PRUNING_REFUSED:
        problems.append(
            f"`strategy.name` = {strategy.name!r} cannot aggregate pruned clients: {PRUNING_REFUSED[strategy.name]}; "
            "use fedit, hetlora, ffa_lora or fedsa_lora, or set the pruning ratios to 0"
        )
    scores = {
        "importance": clients_prune,
        "deploy_importance": any(pruning.deploy_ratios.values()),
    }  # the scores in use
    lora_grad = [field for field, used in scores.items() if used and getattr(pruning, field) == "lora_grad"]
    if lora is not None and lora_grad:
        attention, mlp = set(ATTENTION), set(MLP)
        missing = [
            what for what, names in (("attention", attention), ("MLP", mlp)) if not names & set(lora.target_modules)
        ]
        if missing:
            problems += [
                f"`pruning.{field}` = 'lora_grad' scores heads and channels from the LoRA gradients, but "
                f"`lora.target_modules` {list(lora.target_modules)} has no {' and no '.join(missing)} projection: add "
                "one (e.g. gate_proj) or choose magnitude, activation or first_order"
                for field in lora_grad
            ]
    if clients_prune and compression is not None and compression.downlink:
        problems.append(
            "`compression.downlink` sends every client the same adapter; "
            "pruned clients each need their own slice: turn one off"
        )
    return problems


def _controller_problems(
    controller: ControllerConfig | None, lora: LoraConfig | None, fleet: FleetConfig | None
) -> list[str]:
    """Every arm's rank fits the global adapter; profile arms name real profiles."""
    if controller is None:
        return []
    problems = []
    if lora is not None and max(controller.ranks) > lora.rank:
        problems.append(
            f"`controller.ranks` go up to {max(controller.ranks)} but `lora.rank` = {lora.rank}: the global adapter "
            f"(rank lora.rank) serves every arm, so set lora.rank >= {max(controller.ranks)}"
        )
    return problems + _unknown_names("", {}, "controller.profile_arms", controller.profile_arms, None, fleet)


PACKING_FIELDS = ("packing", "max_clients_per_step", "pack_memory_gib", "pack_timeout_s")


def _packing_problems(simulation: SimulationConfig | None, lora: LoraConfig | None) -> list[str]:
    """`simulation.packing` = 'on' only where a packed trainer can serve the run (`clients.packing`)."""
    if simulation is None or simulation.packing != "on":
        return []
    problems = []
    if lora is not None and lora.dropout > 0:
        problems.append(
            f"`simulation.packing` = 'on' cannot pack `lora.dropout` = {lora.dropout} (its masks follow the order "
            "layers run): set lora.dropout = 0 or packing = 'off'"
        )
    if simulation.num_gpus_per_client > 0:
        problems.append(
            f"`simulation.packing` = 'on' runs a round's clients at once on ClientApps that hold no GPU (the packed "
            f"trainer holds it), got `simulation.num_gpus_per_client` = {simulation.num_gpus_per_client}: set it to 0"
        )
    if simulation.ray_address:
        problems.append(
            "`simulation.packing` = 'on' sizes the ClientApp pool from this machine's CPUs, which an existing Ray "
            f"cluster (`simulation.ray_address` = {simulation.ray_address!r}) does not have: unset one"
        )
    return problems


class _Sections:
    """The sections of a raw scenario that are valid on their own (for cross-field checks
    while other sections have errors, so that every problem is reported at once)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        for name, field in Scenario.model_fields.items():
            section = field.annotation
            if isinstance(section, type) and issubclass(section, BaseModel) and isinstance(raw.get(name, {}), dict):
                try:
                    setattr(self, name, section.model_validate(raw.get(name, {})))
                except ValidationError:
                    pass


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "data.task=units"]` → nested dict; values parse as TOML, else as strings."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ScenarioError("overrides", [f"override {pair!r} must look like dotted.key=value"])
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ScenarioError("overrides", [f"override {pair!r} sets a key under a value"])
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def validate_scenario(raw: dict[str, Any], source: str = "<dict>") -> Scenario:
    """Validate a raw mapping; raise ScenarioError listing every problem."""
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        problems = [line for err in exc.errors() for line in describe(err)]
        if not any(not err["loc"] for err in exc.errors()):  # the cross-field checks did not run
            problems += _cross_field_problems(_Sections(raw))
        raise ScenarioError(source, problems) from None


def load_scenario(path: str | Path, overrides: Iterable[str] = (), seed: int | None = None) -> Scenario:
    """Read, override and validate a scenario file. The run name defaults to the file's stem."""
    path = Path(path)
    raw = read_toml(path, ScenarioError)
    raw.setdefault("name", path.stem)
    raw = _merge(raw, parse_overrides(overrides))
    raw = _anchor_paths(raw, path.parent)
    if seed is not None:
        raw["seed"] = seed
    return validate_scenario(raw, str(path))


# Keys that hold file paths; a relative one is read relative to the scenario file's folder.
PATH_KEYS: tuple[tuple[str, str], ...] = (("data", "task"), ("fleet", "trace"), ("fleet", "profiles_file"))


def _anchor_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make relative file paths that exist next to the scenario file absolute, so the run does
    not depend on the working directory (and the resolved scenario names the real file)."""
    out = dict(raw)
    for section, key in PATH_KEYS:
        value = out.get(section, {}).get(key) if isinstance(out.get(section), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).is_file():
            out[section] = {**out[section], key: str((folder / value).resolve())}
    return out


def scenario_toml(scenario: Scenario) -> str:
    """The resolved scenario as TOML (None fields omitted: they are the defaults)."""
    import tomli_w

    return tomli_w.dumps(scenario.model_dump(mode="json", exclude_none=True))
