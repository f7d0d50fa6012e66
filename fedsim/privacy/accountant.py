"""Privacy accounting of DP-FedAvg with Google's `dp_accounting`: ε after t rounds, and the noise
that reaches a target ε.

Central mode. Adjacency is adding or removing one client with all its data. Each round is the
Gaussian mechanism with multiplier z (std z·C on a sum whose sensitivity is C) on a Poisson
sample, each client taken independently with probability q = per_round / num_clients, so t rounds
are the event

    SelfComposed(PoissonSampled(q, Gaussian(z)), t)                        (ADD_OR_REMOVE_ONE)

Why Poisson rather than fedsim's fixed-size sample: dp_accounting accounts sampling without
replacement (`SampledWithoutReplacementDpEvent`) only under replace-one adjacency, where the
sum's sensitivity is 2C (one clipped update swapped for another): for n = 100, m = 10, z = 1,
t = 100 and δ = n^-1.1 its RDP bound is ε ≈ 77, against ε ≈ 4.6 for Poisson sampling. So central
runs sample with `fedsim.privacy.sampling.poisson_sample`, as McMahan et al. (2018,
arXiv:1710.06963) do.

Local mode. The server sees every message, so there is no amplification by sampling, and two
datasets of one client give clipped updates up to 2C apart: each round a client takes part in is
Gaussian(z / 2). Stepped once per round, ε bounds a client that took part in every round.

With adaptive clipping z is the combined multiplier of updates and indicator bits
(`fedsim.privacy.adaptive`), so its cost is counted. ε comes from dp_accounting's Rényi DP
accountant (Mironov, 2017, arXiv:1702.07476; its default orders and RDP-to-(ε, δ) conversion):
fast and finite for every z > 0. Its privacy loss distributions are tighter (ε ≈ 3.7 instead of
4.6 in the example above) but take about a second per call and, at small z, gigabytes.
Default δ = 1 / n^1.1 (`default_delta`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # dp_accounting is imported where it is used: it costs ~0.2 s, which the ClientApp never needs
    import dp_accounting as dp
    from dp_accounting.rdp import RdpAccountant

Mode = Literal["central", "local"]

# The noise multipliers `noise_for_target` searches: below MIN_NOISE it returns MIN_NOISE (the target
# is met with next to no noise); a target that needs more than MAX_NOISE is refused as unreachable,
# since noise of 1000·C on every coordinate leaves nothing of the updates.
MIN_NOISE, MAX_NOISE = 1e-2, 1e3
DEFAULT_DELTA_EXPONENT = 1.1


class UnreachableTarget(ValueError):
    """No noise multiplier up to MAX_NOISE gives ε ≤ the target in the planned rounds."""


def default_delta(num_clients: int) -> float:
    """δ = 1 / n^1.1: below 1/n, since publishing one random client's data whole is already (0, 1/n)-DP."""
    return 1.0 / num_clients**DEFAULT_DELTA_EXPONENT


def dp_event(mode: Mode, noise_multiplier: float, sampling_rate: float, rounds: int) -> dp.DpEvent:
    """The DpEvent of `rounds` rounds (module docstring); `sampling_rate` is q, unused in local mode."""
    import dp_accounting as dp

    if mode == "central":
        one: dp.DpEvent = dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier))
    elif mode == "local":
        one = dp.GaussianDpEvent(noise_multiplier / 2)
    else:
        raise ValueError(f"`mode` must be 'central' or 'local', got {mode!r}")
    return dp.SelfComposedDpEvent(one, rounds)


def fresh_accountant() -> RdpAccountant:
    """An empty RDP accountant for client-level add/remove adjacency (its default orders)."""
    import dp_accounting as dp
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(neighboring_relation=dp.NeighboringRelation.ADD_OR_REMOVE_ONE)


def epsilon(mode: Mode, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """ε of `rounds` rounds at δ = `delta` (0.0 for no round)."""
    if not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1), got {delta}")
    if rounds == 0:
        return 0.0
    accountant = fresh_accountant()
    with _quiet_orders():
        accountant.compose(dp_event(mode, noise_multiplier, sampling_rate, rounds))
        return float(accountant.get_epsilon(delta))


class _SkippedOrder(logging.Filter):
    """dp_accounting's warning that a fractional RDP order did not converge and is left out: ε stays an
    upper bound (the minimum over the other orders), so it is not worth a line every round."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orders() -> Iterator[None]:
    absl, skipped = logging.getLogger("absl"), _SkippedOrder()
    absl.addFilter(skipped)
    try:
        yield
    finally:
        absl.removeFilter(skipped)


class Accountant:
    """The privacy spent so far by one run: counts rounds, answers ε(δ); `state_dict` is JSON-able
    and goes into every checkpoint, so a resumed run goes on spending the same budget."""

    def __init__(self, mode: Mode, noise_multiplier: float, sampling_rate: float) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"`noise_multiplier` must be > 0, got {noise_multiplier}")
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"`sampling_rate` must be in (0, 1], got {sampling_rate}")
        dp_event(mode, noise_multiplier, sampling_rate, 1)  # checks the mode
        self.mode, self.noise_multiplier, self.sampling_rate = mode, noise_multiplier, sampling_rate
        self.steps = 0

    def step(self, rounds: int = 1) -> None:
        """Count `rounds` more rounds of the mechanism."""
        if rounds < 0:
            raise ValueError(f"`rounds` must be >= 0, got {rounds}")
        self.steps += rounds

    def epsilon(self, delta: float) -> float:
        """ε of the rounds counted so far, at δ = `delta`."""
        return epsilon(self.mode, self.noise_multiplier, self.sampling_rate, self.steps, delta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on from `state`; ValueError when it was kept under another mechanism (its ε would not add up)."""
        mine = self.state_dict()
        differ = [k for k in ("mode", "noise_multiplier", "sampling_rate") if state.get(k) != mine[k]]
        if differ:
            raise ValueError(
                "the checkpoint's privacy accountant ran another mechanism: "
                + ", ".join(f"{k} {state.get(k)!r} (now {mine[k]!r})" for k in differ)
            )
        steps = state.get("steps")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"the checkpoint's privacy accountant has an invalid step count {steps!r}")
        self.steps = steps


def noise_for_target(target_epsilon: float, delta: float, rounds: int, mode: Mode, sampling_rate: float) -> float:
    """The least noise multiplier z (to a relative 1e-4) whose ε after `rounds` rounds is ≤ `target_epsilon`,
    via `dp_accounting.calibrate_dp_mechanism`; UnreachableTarget when even MAX_NOISE is not enough."""
    if not target_epsilon > 0 or rounds < 1:
        raise ValueError(f"need target_epsilon > 0 and rounds >= 1, got {target_epsilon} and {rounds}")

    def eps(z: float) -> float:
        return epsilon(mode, z, sampling_rate, rounds, delta)

    if (most := eps(MAX_NOISE)) > target_epsilon:
        raise UnreachableTarget(
            f"no noise multiplier up to {MAX_NOISE:g} reaches ε ≤ {target_epsilon:g} at δ = {delta:.3g} in {rounds} "
            f"rounds ({mode} mode; ε = {most:.3g} at z = {MAX_NOISE:g}): raise the target or δ, or plan fewer rounds"
        )
    lo, hi = _bracket(eps, target_epsilon)
    if lo is None:
        return hi
    import dp_accounting as dp

    with _quiet_orders():
        z = dp.calibrate_dp_mechanism(
            fresh_accountant,
            lambda z: dp_event(mode, z, sampling_rate, rounds),
            target_epsilon,
            delta,
            dp.ExplicitBracketInterval(lo, hi),
            tol=lo * 1e-4,
        )
    return float(z)


def _bracket(eps: Callable[[float], float], target: float) -> tuple[float | None, float]:
    """(lo, hi), a factor 2 apart, with ε(lo) > target ≥ ε(hi) (RDP's ε is finite for every z > 0);
    (None, MIN_NOISE) when MIN_NOISE already meets the target. Needs ε(MAX_NOISE) ≤ target."""
    hi = 1.0
    while eps(hi) > target:
        hi = min(2 * hi, MAX_NOISE)
    lo = hi / 2
    while eps(lo) <= target:
        if lo <= MIN_NOISE:
            return None, MIN_NOISE
        lo, hi = max(lo / 2, MIN_NOISE), lo
    return lo, hi
