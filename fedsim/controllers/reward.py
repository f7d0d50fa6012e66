"""The reward a controller learns from: how much a client's round moved the model, for the time it held the round.

For client i of a round, with every term computed from what it reported (`Observations`):

    c_i = max(0, contribution)                          the device's contribution to the global
                                                        model: the relative held-out loss decrease
                                                        (L(θ) − L(θ_i)) / L(θ) of the global model
                                                        moved by this client's share of an average
                                                        toward its adapter (`rounds.contributions`,
                                                        scored by the server), 0 if not scored or
                                                        not finite
    ℓ_i = max(0, (ℓ_before − ℓ_after) / ℓ_before)      relative local loss improvement (0 if
                                                        ℓ_before ≤ 0 or either loss is not finite)
    π_i = max(0, min(ratio_reached, ratio_target))      pruning progress: the sparsity attained,
                                                        credited up to the ratio asked for; with
                                                        deploy ratios (`ratio_deployed`, the ratio
                                                        ρ_i its profile deploys), how close that
                                                        sparsity s_i is to ρ_i: max(0, 1 − |s_i −
                                                        ρ_i| / ρ_i), so s_i / ρ_i up to ρ_i, falling
                                                        back to 0 at 2ρ_i (0 where ρ_i = 0)
    ν_i = update_norm                                   the update's norm (0 if not finite)
    e_i = energy_j                                      the joules the client spent on the round
                                                        (`rounds.spend_energy`; 0 if unknown)

    g_i = w_c·c_i/c̄ + w_ℓ·ℓ_i/ℓ̄ + w_π·π_i + w_ν·ν_i/ν̄ − w_E·e_i/ē
                                                        (w_π: `prune_weight`, or `deploy_weight`
                                                        with deploy ratios; w_E: `energy_weight`)
                                                        c̄, ℓ̄, ν̄, ē: the term's mean over the round's
                                                        feasible clients (ē: those whose energy is
                                                        known; a term whose mean is 0 is left as
                                                        is): the weights, not the units, set each
                                                        term's share. π is a share of the model
                                                        already and is not scaled (divided by its
                                                        round mean, a round's lone pruner would
                                                        score n, the round's size). The energy term
                                                        is a cost: a client whose joules outweigh
                                                        its progress has g_i < 0, hence the floor
    s_i = (T / t_i)^α  if t_i > T, else 1               Oort's straggler factor (Lai et al., "Oort:
                                                        Efficient Federated Learning via Guided
                                                        Participant Selection", OSDI 2021); T: the
                                                        round's deadline, else the fastest round
                                                        so far (its slowest feasible client)
    x_i = g_i · s_i                                     time = "round" (Oort's form): progress, less
                                                        for holding the round up
    x_i = g_i / t_i · s_i                               time = "per_second": progress per second,
                                                        stragglers penalised once more

and then normalised across the round, floored, and the clients that could not run penalised:

    round_max:   x̃_i = x_i / max_j x_j                 ∈ [0, 1], UCB1's and EXP3's assumption
    round_mean:  x̃_i = x_i / mean_j x_j                ≈ 1 on average, unbounded above
    baseline:    x̃_i = x_i / λ_t,  λ_t = bias-corrected discounted mean of the rounds' mean x,
                 m_t = β·m_{t−1} + (1 − β)·mean_j x_j, λ_t = m_t / (1 − β^t)   (this round included;
                 FedEx's running baseline, Khodak et al. 2021, arXiv:2106.04502, dividing rather
                 than subtracting, so rewards stay positive and comparable across rounds)
    none:        x̃_i = x_i
    r_i = max(x̃_i, floor)    if the client ran         r_i = infeasible_penalty    otherwise

Normalising per round removes what every client shares that round (loss improvements shrink as
the model converges), so a device's reward measures how good its arm is, not how late the round.
The maxima, means and medians are over feasible clients only. Time t_i is the simulated clock in
simulation and the measured round trip in deployment: the reward does not care which.

Why the defaults (`RewardConfig`):

- c leads (w_c = 1): a client's own loss drop cannot see what its update does to the global
  model, and LoRA trained to recover a pruned model can harm the unpruned one; c scores the update
  where it is applied (FedSpine's "importance of the LoRA update"), on the first
  `contribution_examples` held-out examples, one forward pass per client.
- ℓ (w_ℓ = 0.5): a cheaper, noisier second opinion, and the whole signal where the server cannot
  score (c = 0 for everyone: the term drops out).
- π (w_π = 0.5, unscaled): sparsity counts a little for its own sake (20 % removed adds 0.1, a
  tenth of an average client's contribution); what it saves (time, memory) is already in t and in
  feasibility. With deploy ratios c is scored on the deployed models, so it already says what
  training a device at its deploy ratio buys, and `deploy_weight` is 0. The deploy ratio is the
  user's requirement for the device, not knowledge of its speed, memory or link, which the
  controller still learns.
- ν (w_ν = 0): a diverging or over-compensating client also sends a large update; c measures the
  update's importance instead. Available for runs without a held-out set.
- e (w_E = 0): energy is not weighed unless asked, so a run's rewards do not depend on the
  profiles' power figures; w_E = 0.5 costs an average client half an average contribution.
- time = "round": in a synchronous round the slowest kept client sets the time everybody waits,
  so a device faster than T costs nothing by being slower still; dividing by its own time
  ("per_second") pushes fast devices to the smallest rank.
- T = the round's deadline if it has one, else the fastest round seen so far, i.e. the least,
  over past rounds and this one, of a round's slowest feasible client time (`straggler = "auto"`):
  the round time the fleet has shown it can keep. The round's median would rise with the round's
  own exploration (when half the round tries a costly arm, the costly arm looks free). T only
  falls, so a fleet that slows down penalises every device alike, which the per-round
  normalisation removes.
- α = 2 (as in open-source Oort implementations; the paper leaves α to the developer); round_max;
  floor = 0.01 (a feasible arm never scores 0, so it stays above an infeasible one and is never
  starved); penalty = 0 (no progress).

The weights were chosen on bench/fedspine.py's SmolLM2 runs (docs/results/fedspine.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from fedsim.config.controller import RewardConfig


@dataclass(frozen=True)
class Observations:
    """One round's reports, aligned per client: (n,) arrays, plus the round's deadline."""

    loss_before: np.ndarray  # local training loss at the start of the round
    loss_after: np.ndarray  # local training loss at its end
    time_s: np.ndarray  # the client's round time, seconds (> 0 where feasible)
    feasible: np.ndarray  # bool: False = out of memory / could not run
    ratio_reached: np.ndarray  # pruning ratio the client's model has reached
    ratio_target: np.ndarray  # pruning ratio it was asked for
    update_norm: np.ndarray  # ‖ΔW‖ of its LoRA update
    deadline_s: float = 0.0  # the round's deadline (0 = none)
    contribution: np.ndarray | None = (
        None  # relative held-out loss decrease of the global model from its adapter (None: not scored)
    )
    ratio_deployed: np.ndarray | None = (
        None  # pruning ratio of the model its profile deploys (None: the run has no deploy ratios)
    )
    energy_j: np.ndarray | None = None  # joules it spent on the round (None: not reported; NaN: unknown)

    def __post_init__(self) -> None:
        if self.contribution is None:
            object.__setattr__(self, "contribution", np.full(np.shape(self.loss_before), np.nan))
        arrays = [f.name for f in fields(self) if f.name != "deadline_s" and getattr(self, f.name) is not None]
        for name in arrays:
            object.__setattr__(
                self, name, np.asarray(getattr(self, name), dtype=bool if name == "feasible" else np.float64)
            )
        n = self.loss_before.shape
        problems = [
            f"`{name}` must be 1-D and aligned with loss_before {n}, got {getattr(self, name).shape}"
            for name in arrays
            if getattr(self, name).shape != n or len(n) != 1
        ]
        if not problems:
            bad = np.flatnonzero(self.feasible & ~(np.isfinite(self.time_s) & (self.time_s > 0)))
            problems += [f"`time_s[{i}]` must be > 0 for a feasible client, got {self.time_s[i]}" for i in bad[:3]]
        if not self.deadline_s >= 0:
            problems.append(f"`deadline_s` must be >= 0, got {self.deadline_s}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RewardState:
    """What the reward carries from round to round: the discounted baseline of `normalise =
    "baseline"` (m_t and 1 − β^t, its bias correction) and the fastest round seen so far (the
    straggler threshold of `straggler = "fastest"`)."""

    mean: float = 0.0
    weight: float = 0.0
    fastest_s: float = math.inf


def rewards(
    obs: Observations, config: RewardConfig, state: RewardState | None = None
) -> tuple[np.ndarray, RewardState]:
    """(n,) reward of each client, and the state for the next round (the baseline moves with
    `config.normalise == "baseline"`, the fastest round with every round some client ran)."""
    state = state or RewardState()
    ok = obs.feasible
    time = np.where(ok, obs.time_s, 1.0)
    if ok.any():
        state = replace(state, fastest_s=min(state.fastest_s, float(time[ok].max())))
    x = progress(obs, config, ok) * straggler_factor(time, ok, obs.deadline_s, config, state.fastest_s)
    if config.time == "per_second":
        x = x / time
    x, state = normalise(x, ok, config, state)
    return np.where(ok, np.maximum(x, config.floor), config.infeasible_penalty), state


def progress(obs: Observations, config: RewardConfig, ok: np.ndarray) -> np.ndarray:
    """(n,) g_i: the weighted sum of contribution, loss and update-norm progress (each scaled by its round mean)
    and pruning progress, less the energy cost (`energy_cost`)."""
    before, after = obs.loss_before, obs.loss_after
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.where(np.isfinite(before) & np.isfinite(after) & (before > 0), (before - after) / before, 0.0)
    prune, prune_weight = np.minimum(obs.ratio_reached, obs.ratio_target), config.prune_weight
    if obs.ratio_deployed is not None:
        prune_weight = config.deploy_weight
        deployed = obs.ratio_deployed
        with np.errstate(divide="ignore", invalid="ignore"):
            prune = np.where(deployed > 0, np.maximum(0.0, 1.0 - np.abs(prune - deployed) / deployed), 0.0)
    norm, contribution = obs.update_norm, obs.contribution
    assert contribution is not None  # `Observations.__post_init__` fills an unscored round with NaN
    total = np.zeros(len(ok))
    terms = (
        (config.contribution_weight, contribution, True),
        (config.loss_weight, loss, True),
        (prune_weight, prune, False),
        (config.norm_weight, norm, True),
    )
    for weight, term, scaled in terms:
        term = np.where(ok & np.isfinite(term), np.maximum(term, 0.0), 0.0)
        scale = term[ok].mean() if scaled and ok.any() else 0.0
        total += weight * (term / scale if scale > 0 else term)
    return total - energy_cost(obs, config, ok)


def energy_cost(obs: Observations, config: RewardConfig, ok: np.ndarray) -> np.ndarray:
    """(n,) w_E·e_i/ē, the energy term of g_i (0 with `energy_weight` 0 or no energy reported; 0 for an unknown e_i)."""
    energy = obs.energy_j
    if config.energy_weight == 0 or energy is None:
        return np.zeros(len(ok))
    known = ok & np.isfinite(energy)
    term = np.where(known, np.maximum(energy, 0.0), 0.0)
    scale = term[known].mean() if known.any() else 0.0
    return config.energy_weight * (term / scale if scale > 0 else term)


def straggler_factor(
    time: np.ndarray, ok: np.ndarray, deadline_s: float, config: RewardConfig, fastest_s: float = math.inf
) -> np.ndarray:
    """(n,) (T / t)^α where t > T, else 1; T per `config.straggler` (1 everywhere with none)."""
    mode = config.straggler
    if mode == "auto":
        mode = "deadline" if deadline_s > 0 else "fastest"
    if mode == "none" or (mode == "deadline" and deadline_s <= 0) or not ok.any():
        return np.ones(len(time))
    threshold = {"deadline": deadline_s, "median": float(np.median(time[ok])), "fastest": fastest_s}[mode]
    return np.where(time > threshold, (threshold / time) ** config.straggler_alpha, 1.0)


def normalise(
    x: np.ndarray, ok: np.ndarray, config: RewardConfig, state: RewardState
) -> tuple[np.ndarray, RewardState]:
    """(n,) x̃ per `config.normalise`, and the state with the baseline updated."""
    if config.normalise == "none" or not ok.any():
        return x, state
    if config.normalise == "baseline":
        beta = config.baseline_discount
        state = replace(
            state,
            mean=beta * state.mean + (1.0 - beta) * float(x[ok].mean()),
            weight=beta * state.weight + (1.0 - beta),
        )
        scale = state.mean / state.weight
    else:
        scale = float(x[ok].max() if config.normalise == "round_max" else x[ok].mean())
    return (x / scale if scale > 0 else x), state
