"""Poisson sampling of clients, the sampling DP-FedAvg's accounting assumes (`fedsim.privacy.accountant`).

Each client takes part in round t independently with probability q = per_round / num_clients
(McMahan et al., 2018, arXiv:1710.06963), so the round's count |S| is random with mean m = q·n,
the fixed denominator of `mechanism.noised_mean`. Client c's coin is the c-th of n uniforms drawn
from `derive_seed(seed, t, purpose, "poisson")` (`fedsim.seeding`): it does not depend on who else
is eligible, and a client that is offline simply does not take part, which only lowers its
probability below q, so the accountant's q still bounds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedsim.seeding import derive_seed


def poisson_sample(
    eligible: Iterable[int], num_clients: int, rate: float, seed: int, server_round: int, purpose: str = "train"
) -> list[int]:
    """The eligible client ids whose coin falls below `rate`, sorted; a pure function of (seed, round, purpose)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"`rate` must be in [0, 1], got {rate}")
    ids = sorted({int(c) for c in eligible})
    if ids and not 0 <= ids[0] <= ids[-1] < num_clients:
        raise ValueError(f"client ids must be in [0, {num_clients}), got {ids[0]}..{ids[-1]}")
    coins = np.random.default_rng(derive_seed(seed, server_round, purpose, "poisson")).random(num_clients)
    return [c for c in ids if coins[c] < rate]
