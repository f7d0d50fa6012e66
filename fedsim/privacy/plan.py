"""A DP run's numbers, resolved before it starts from the scenario's `privacy` section
(`fedsim.config.privacy`): δ, the sampling rate, the noise multiplier (calibrated when a target ε
is given), adaptive clipping's split of it, and the ε the planned rounds will spend.

`plan` is what the round loop reads; `plan_problems` is the preflight check, each problem naming
its dotted path (a target ε that no noise reaches, indicator noise too small for adaptive
clipping's split).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.config.privacy import PrivacyConfig
from fedsim.privacy.accountant import Accountant, Mode, UnreachableTarget, default_delta, epsilon, noise_for_target
from fedsim.privacy.adaptive import PAPER_INDICATOR_NOISE, AdaptiveClip, update_noise_multiplier


@dataclass(frozen=True)
class DpPlan:
    """The resolved mechanism of a DP run (`fedsim.privacy` says where each number is used)."""

    mode: Mode
    clip: float  # C; with adaptive clipping, C_0
    noise_multiplier: float  # z, what the accountant counts
    update_noise: float  # σ_Δ: noise std σ_Δ·C_t on the sum (central) or on each update (local); z unless adaptive
    indicator_std: float  # σ_b on the count of unclipped updates; 0 unless adaptive
    target_quantile: float  # γ (adaptive)
    clip_lr: float  # η_C (adaptive)
    sampling_rate: float  # q = per_round / num_clients: Poisson sampling in central mode
    expected_clients: float  # m = q·n = per_round, the fixed denominator
    delta: float
    rounds: int
    epsilon: float  # ε after `rounds` rounds
    secure_noise: bool

    @property
    def adaptive(self) -> bool:
        return self.indicator_std > 0

    def accountant(self) -> Accountant:
        """A fresh accountant for this mechanism (step it once per round)."""
        return Accountant(self.mode, self.noise_multiplier, self.sampling_rate)

    def adaptive_clip(self) -> AdaptiveClip | None:
        """A fresh adaptive clip starting at C_0, or None without adaptive clipping."""
        if not self.adaptive:
            return None
        return AdaptiveClip(self.clip, self.target_quantile, self.clip_lr, self.indicator_std)


def plan(privacy: PrivacyConfig, num_clients: int, per_round: int, rounds: int) -> DpPlan:
    """The mechanism of a run with privacy on; ValueError naming the dotted path of what cannot be met."""
    if privacy.mode == "off" or privacy.clip is None:
        raise ValueError("`privacy.mode`: privacy is off, there is nothing to plan")
    mode: Mode = privacy.mode
    q, m = per_round / num_clients, float(per_round)
    delta = privacy.delta if privacy.delta is not None else default_delta(num_clients)
    if privacy.target_epsilon is not None:
        try:
            z = noise_for_target(privacy.target_epsilon, delta, rounds, mode, q)
        except UnreachableTarget as exc:
            raise ValueError(f"`privacy.target_epsilon`: {exc}") from None
    else:
        assert privacy.noise_multiplier is not None  # PrivacyConfig's own check
        z = privacy.noise_multiplier
    sigma_b, sigma_update = 0.0, z
    if privacy.adaptive:
        sigma_b = m * PAPER_INDICATOR_NOISE if privacy.indicator_noise == "auto" else privacy.indicator_noise
        try:
            sigma_update = update_noise_multiplier(z, sigma_b)
        except ValueError as exc:
            auto = " (auto: per_round / 20)" if privacy.indicator_noise == "auto" else ""
            raise ValueError(
                f"`privacy.indicator_noise`{auto}: {exc}; raise indicator_noise or clients.per_round, or lower z"
            ) from None
    return DpPlan(
        mode=mode,
        clip=privacy.clip,
        noise_multiplier=z,
        update_noise=sigma_update,
        indicator_std=sigma_b,
        target_quantile=privacy.target_quantile,
        clip_lr=privacy.clip_lr,
        sampling_rate=q,
        expected_clients=m,
        delta=delta,
        rounds=rounds,
        epsilon=epsilon(mode, z, q, rounds, delta),
        secure_noise=privacy.secure_noise,
    )


def plan_problems(privacy: PrivacyConfig, num_clients: int, per_round: int, rounds: int) -> list[str]:
    """Preflight: why the run's privacy cannot be planned ([] when it can, or when privacy is off)."""
    if not privacy.enabled:
        return []
    try:
        plan(privacy, num_clients, per_round, rounds)
    except ValueError as exc:
        return [str(exc)]
    return []
