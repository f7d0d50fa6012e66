"""The Gaussian mechanism of DP-FedAvg: the round's noised mean of clipped updates.

McMahan et al. (2018), "Learning Differentially Private Recurrent Language Models",
arXiv:1710.06963, with the fixed denominator: for the round's sampled set S, the expected number
of clients m = q·n and the noise multiplier z,

    Δ̄ = (Σ_{k∈S} clip(Δ_k, C) + N(0, σ² I)) / m,    σ = z·C,

one draw per coordinate of the update space, once per round. Dividing by m rather than |S| keeps
each client's influence at C / m whatever the others do, and clients count equally (no n_k).
Local mode: each client adds N(0, σ² I) to its own clipped update (`add_noise`) and the server
takes the plain sum over m (`noised_mean` with σ = 0).

Seeding (`fedsim.seeding`): `noise_generator(seed, *parts)` is a torch.Generator seeded with
`derive_seed(seed, *parts)`, so a run and its resume draw the same noise: the server's noise of
round t from (t, "dp-noise"), adaptive clipping's from (t, "dp-indicator-noise"), client c's local
noise from (t, c, "dp-local-noise"). Noise is drawn in float32 on the CPU, tensor by tensor in
sorted name order. The guarantee assumes the noise is unknown to whoever sees the result: anyone
who knows the scenario's seed can recompute seeded noise, so it simulates the mechanism;
`seed=None` (`privacy.secure_noise`) seeds from the OS's entropy. torch's floating-point Gaussian
is not the discrete Gaussian a hardened deployment would use (Mironov, 2012, "On Significance of
the Least Significant Bits for Differential Privacy").
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import torch

from fedsim.privacy.clipping import Update
from fedsim.seeding import derive_seed


def noise_generator(seed: int | None, *parts: int | str) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(seed, *parts)`, or from the OS's entropy when `seed` is None."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else derive_seed(seed, *parts))


def add_noise(total: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> Update:
    """`total` + N(0, std² I): one independent draw per coordinate, tensors in sorted name order."""
    if not std >= 0:
        raise ValueError(f"`std` must be >= 0, got {std}")
    out: Update = {}
    for name in sorted(total):
        t = total[name]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * std
        out[name] = t + noise.to(device=t.device, dtype=t.dtype)
    return out


def noised_mean(
    clipped: Sequence[Mapping[str, torch.Tensor]],
    like: Mapping[str, torch.Tensor],
    expected: float,
    std: float,
    generator: torch.Generator,
) -> Update:
    """(Σ_k clipped_k + N(0, std² I)) / expected over the coordinates of `like` (names and shapes; a
    round with no update still releases noise). The caller clips; each update must name exactly
    `like`'s tensors, at their shapes (zeros where a client holds nothing: ranks, pruned parts)."""
    if not expected > 0:
        raise ValueError(f"`expected` (the expected number of clients) must be > 0, got {expected}")
    total = {name: torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32)) for name, t in like.items()}
    for k, update in enumerate(clipped):
        if set(update) != set(like):
            raise ValueError(f"update {k} names other tensors than expected: {sorted(set(update) ^ set(like))[:3]}")
        for name, t in update.items():
            if t.shape != total[name].shape:
                raise ValueError(
                    f"update {k}: `{name}` has shape {tuple(t.shape)}, expected {tuple(total[name].shape)}"
                )
            total[name] += t.detach().to(device="cpu", dtype=total[name].dtype)
    return {name: t / expected for name, t in add_noise(total, std, generator).items()}
