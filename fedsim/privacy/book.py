"""The server's side of a DP run across rounds: its plan, its accountant, its adaptive clip and the
seed of its noise, in one book the round loop keeps (`fedsim.server.rounds`).

Round t (`fedsim.privacy` has the rule): the sampled clients are told C_t, the scaling to fold B to,
and, in local mode, the std σ_Δ·C_t of the noise they add (`client_config`). The server brings each
kept update to the global coordinates (`space.to_global`), re-clips it to C_t in central mode (a codec
or error feedback may have raised its norm) and takes the noised mean with the fixed denominator
m (`noised_mean`: std σ_Δ·C_t central, none local; one draw from (seed, t, "dp-noise")). `step` then
counts the round, moves C_t with the clients' indicator bits (adaptive; noise from (seed, t,
"dp-indicator-noise")) and returns the round's public figures for its central row: `dp_epsilon`
(ε after t rounds at δ), `dp_clip` (C_t) and, adaptive, `dp_unclipped` (b̃). `state_dict` goes into
every checkpoint, so a resumed run spends the same budget from the same clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsim.config.privacy import PrivacyConfig
from fedsim.privacy.clipping import Update, clip
from fedsim.privacy.mechanism import noise_generator, noised_mean
from fedsim.privacy.plan import DpPlan, plan
from fedsim.protocol import DP_CLIP, DP_LOCAL_NOISE, DP_REPORT, DP_SCALE


class PrivacyBook:
    """DP-FedAvg's server state (module docstring); the noise is seeded by `seed` unless the plan's
    `secure_noise` draws it from the OS's entropy."""

    def __init__(self, dp: DpPlan, seed: int) -> None:
        self.plan = dp
        self.seed: int | None = None if dp.secure_noise else seed
        self.accountant = dp.accountant()
        self.adaptive = dp.adaptive_clip()

    @classmethod
    def build(cls, privacy: PrivacyConfig, num_clients: int, per_round: int, rounds: int, seed: int) -> PrivacyBook:
        """The book of a run with privacy on (`plan`'s ValueError, naming the field, when it cannot be met)."""
        return cls(plan(privacy, num_clients, per_round, rounds), seed)

    @property
    def central(self) -> bool:
        return self.plan.mode == "central"

    @property
    def clip(self) -> float:
        """C_t, the bound of this round's updates."""
        return self.adaptive.clip if self.adaptive is not None else self.plan.clip

    def client_config(self, global_scale: float) -> dict[str, float | bool]:
        """The train config entries every sampled client gets (`fedsim.protocol`)."""
        return {
            DP_CLIP: self.clip,
            DP_SCALE: global_scale,
            DP_LOCAL_NOISE: 0.0 if self.central else self.plan.update_noise * self.clip,
            DP_REPORT: self.adaptive is not None,
        }

    def noised_mean(
        self, updates: Sequence[Mapping[str, torch.Tensor]], like: Mapping[str, torch.Tensor], t: int
    ) -> Update:
        """D̄ of round `t` over `updates` in the global coordinates of `like`: central, each re-clipped to C_t
        and N(0, (σ_Δ C_t)² I) on the sum; local, the plain sum (the clients added the noise); over m."""
        if self.central:
            updates = [clip(u, self.clip)[0] for u in updates]
        std = self.plan.update_noise * self.clip if self.central else 0.0
        return noised_mean(updates, like, self.plan.expected_clients, std, noise_generator(self.seed, t, "dp-noise"))

    def step(self, bits: Sequence[float], t: int) -> dict[str, float]:
        """Close round `t` (`bits`: the kept clients' indicator bits, adaptive only): the figures of its central row."""
        row = {"dp_clip": self.clip}
        if self.adaptive is not None:
            generator = noise_generator(self.seed, t, "dp-indicator-noise")
            row["dp_unclipped"] = self.adaptive.step(bits, self.plan.expected_clients, generator)
        self.accountant.step()
        row["dp_epsilon"] = self.accountant.epsilon(self.plan.delta)
        return row

    def summary(self) -> dict[str, Any]:
        """The mechanism as the run's `privacy` event states it."""
        p = self.plan
        return {
            "mode": p.mode, "clip": p.clip, "noise_multiplier": p.noise_multiplier, "update_noise": p.update_noise,
            "adaptive": p.adaptive, "delta": p.delta, "planned_rounds": p.rounds, "planned_epsilon": p.epsilon,
            "sampling": f"poisson, q = {p.sampling_rate:g}" if self.central else "fixed size, no amplification",
            "expected_clients": p.expected_clients, "weighting": "equal (DP-FedAvg's fixed denominator)",
            "secure_noise": p.secure_noise,
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the accountant's and the adaptive clip's state."""
        return {
            "accountant": self.accountant.state_dict(),
            "adaptive_clip": self.adaptive.state_dict() if self.adaptive is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on from `state`; ValueError when it was kept under another mechanism."""
        self.accountant.load_state_dict(state["accountant"])
        saved = state.get("adaptive_clip")
        if (saved is None) != (self.adaptive is None):
            raise ValueError(
                "the checkpoint's privacy state was kept "
                + ("without" if saved is None else "with")
                + " adaptive clipping, and `privacy.adaptive` now says otherwise"
            )
        if self.adaptive is not None and saved is not None:
            self.adaptive.load_state_dict(saved)
