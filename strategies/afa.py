"""Anarchic Federated Averaging (Yang, Zhang, Khanduri and Liu, "Anarchic Federated Learning",
ICML 2022, arXiv:2108.09875): AFA-CD (cross-device) and AFA-CS (cross-silo), on the LoRA factors.

Each device i decides when to start and how many local steps K_i to run; it trains from the model
version x_{t−τ_i} it received (τ_i ≤ τ_max steps stale) with the local learning rate η_L and returns
its update Δ_i = x_{K_i,i} − x_{t−τ_i}. Its step-normalised update is the mean local step,

    G_i = Δ_i / K_i        (the paper's G_i = (1/K_i) Σ_k g_{i,k}, times −η_L),

and the server, with its own learning rate η (the two-sided learning rates), steps on the m updates
M_t that arrived for this step (`fedsim.server.asynchronous`), each weighing 1/m:

    AFA-CD:  x_{t+1} = x_t + η · (1/m) Σ_{i ∈ M_t} G_i
    AFA-CS:  x_{t+1} = x_t + η · (1/|S_t|) Σ_{i ∈ S_t} G_i^last

where AFA-CS keeps every device's most recent G_i and re-uses it while the device sends nothing
new: S_t is every device that has sent an update so far (the paper's M workers once all have).
With every K_i = K, no staleness and η = K, AFA-CD is FedAvg of the updates with equal weights.

On LoRA: Δ_i is per factor (A and B, as FedIT averages them); a device of rank r_k < r_max has its
ΔA zero-padded with rows, its ΔB with columns and folded to the global scaling (ΔB · s_k / s_g),
so a rank it does not hold moves by zero (`rank_padding` "zeros"). AFA runs only on the
asynchronous clock: `apply` is its rule, and Flower's `aggregate_train` is not used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedsim.model.adapter import AdapterState, split_state
from strategies.lora_math import layer_pairs, zero_pad
from strategies.lora_strategy import ClientAdapter, LoraStrategy

PRUNING_REFUSED = (
    "a stale update covers the keep its device held when it started, which the server may have changed since"
)
LATEST = "latest"  # AFA-CS state_dict keys: latest/<client id>/<adapter key>


@dataclass(frozen=True)
class StaleUpdate:
    """One device's update as it reaches the server."""

    client: int
    delta: AdapterState  # Δ_i on the uploaded factors, at the device's rank: local − what it started from
    rank: int
    steps: int  # K_i, the local steps it chose
    staleness: int  # τ_i, server steps since the version it started from (recorded, not weighed)


def normalised(update: StaleUpdate, r_max: int, fold: float) -> AdapterState:
    """G_i = Δ_i / K_i at rank r_max: ΔA zero-padded with rows, ΔB with columns and times `fold` = s_k / s_g."""
    if update.steps < 1:
        raise ValueError(f"client {update.client}: local steps must be >= 1, got {update.steps}")
    out = {}
    for a_key, b_key in layer_pairs(update.delta).values():
        dA, dB = zero_pad(update.delta[a_key], update.delta[b_key], r_max)
        out[a_key], out[b_key] = dA / update.steps, dB * (fold / update.steps)
    return out


def server_step(current: AdapterState, gradients: Sequence[AdapterState], server_lr: float) -> AdapterState:
    """x + η · mean(G) on the adapter tensors the G_i hold; the others (and base deltas) as they are."""
    if not gradients:
        return dict(current)
    keys = gradients[0].keys()
    mean = {k: torch.stack([g[k] for g in gradients]).mean(dim=0) for k in keys}
    return {k: v + server_lr * mean[k].to(v.dtype) if k in mean else v for k, v in current.items()}


class AFA(LoraStrategy):
    """AFA-CD: the server steps on the mean step-normalised update of the arrivals (module docstring)."""

    cross_silo: ClassVar[bool] = False
    pruning_refused = PRUNING_REFUSED
    paper_padding = "zeros"

    def __init__(self, rank: int, alpha: float, seed: int = 0, padding: str | None = None, *, server_lr: float) -> None:
        super().__init__(rank, alpha, seed, padding)
        if self.padding != "zeros":
            raise ValueError(
                f"{type(self).__name__}: a rank a device does not hold moves by zero: padding 'zeros' only"
            )
        if not server_lr > 0 or not np.isfinite(server_lr):
            raise ValueError(f"{type(self).__name__}: `server_lr` must be a positive number, got {server_lr!r}")
        self.server_lr = float(server_lr)
        self.latest: dict[int, AdapterState] = {}  # AFA-CS: each device's last G_i

    def apply(self, current: AdapterState, updates: Sequence[StaleUpdate]) -> AdapterState:
        """The next global state from `current` and this step's arrivals (none: `current`)."""
        gradients = {u.client: normalised(u, self.r_max, self.scale(u.rank) / self.scale(self.r_max)) for u in updates}
        if self.cross_silo:
            self.latest.update(gradients)
            gradients = self.latest
        adapter, deltas = split_state(current)
        stepped = server_step(adapter, [gradients[c] for c in sorted(gradients)], self.server_lr)
        return {**stepped, **{f"{p}.base_delta": d for p, d in deltas.items()}}

    def aggregate(self, server_round: int, clients: list[ClientAdapter]) -> AdapterState:
        raise TypeError(
            f"{type(self).__name__} aggregates stale updates on the asynchronous clock "
            "(`fedsim.server.asynchronous` calls `apply`), not a synchronous round's replies"
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """AFA-CS: each device's last G_i (`latest/<client>/<key>`); AFA-CD: nothing."""
        return {
            f"{LATEST}/{c}/{k}": v.detach().cpu().numpy()
            for c in sorted(self.latest)
            for k, v in sorted(self.latest[c].items())
        }

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        latest: dict[int, AdapterState] = {}
        for name, value in state.items():
            head, _, rest = name.partition("/")
            client, _, key = rest.partition("/")
            if head != LATEST or not client.isdigit() or not key or not self.cross_silo:
                raise ValueError(f"{type(self).__name__}: `{name}` is not a state this strategy keeps")
            latest.setdefault(int(client), {})[key] = torch.from_numpy(np.array(value))
        self.latest = latest


class AFACS(AFA):
    """AFA-CS: the server steps on the mean of every device's most recent step-normalised update."""

    cross_silo = True
