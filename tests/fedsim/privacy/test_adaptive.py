"""Adaptive clipping: the clip settles at the target quantile of a stream of norms, from above and
from below; the noise split makes the round one Gaussian mechanism of multiplier z."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from fedsim.privacy import (
    AdaptiveClip,
    below_clip,
    combined_noise_multiplier,
    next_clip,
    noise_generator,
    noisy_fraction,
    update_noise_multiplier,
)


def run_stream(clip: AdaptiveClip, rounds: int, m: int, seed: int, start: int = 0) -> list[float]:
    """C after each round, for m lognormal(0, 1) norms a round (median 1)."""
    rng = np.random.default_rng(seed)
    history = []
    for t in range(start + rounds):
        norms = rng.lognormal(0.0, 1.0, size=m)
        if t < start:
            continue
        clip.step([below_clip(n, clip.clip) for n in norms], m, noise_generator(seed, t, "dp-indicator-noise"))
        history.append(clip.clip)
    return history


@pytest.mark.parametrize("quantile", [0.5, 0.9])
@pytest.mark.parametrize("c0", [0.01, 100.0])
def test_the_clip_moves_to_the_target_quantile_of_the_norms(quantile, c0):
    m = 100
    truth = math.exp(NormalDist().inv_cdf(quantile))  # the lognormal(0, 1) quantile
    clip = AdaptiveClip(c0, target_quantile=quantile, lr=0.2, indicator_std=m / 20)

    history = run_stream(clip, 600, m, seed=1)

    settled = math.exp(np.mean(np.log(history[-200:])))
    assert settled == pytest.approx(truth, rel=0.1)
    assert abs(math.log(history[0] / truth)) > abs(math.log(settled / truth))  # it moved toward the quantile


def test_the_geometric_step_is_the_papers_rule():
    assert next_clip(2.0, 0.8, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.2 * 0.3))
    assert next_clip(2.0, 0.2, 0.5, 0.2) > 2.0 > next_clip(2.0, 0.9, 0.5, 0.2)  # too few unclipped: grow


def test_without_noise_the_fraction_is_the_share_of_unclipped_updates():
    bits = [1.0, 1.0, 0.0, 1.0, 0.0]

    assert noisy_fraction(bits, 5, 0.0, noise_generator(0, 0)) == pytest.approx(0.6)
    assert noisy_fraction(bits, 10, 0.0, noise_generator(0, 0)) == pytest.approx(0.5 + (3 - 2.5) / 10)


def test_the_fraction_carries_noise_of_std_sigma_b_over_m():
    draws = [noisy_fraction([1.0] * 20, 20, 4.0, noise_generator(0, t)) for t in range(4000)]

    assert np.std(draws) == pytest.approx(4.0 / 20, rel=0.05)
    assert np.mean(draws) == pytest.approx(1.0, abs=0.02)


def test_the_noise_split_makes_the_round_one_mechanism_of_multiplier_z():
    z, sigma_b = 1.2, 3.0

    sigma_update = update_noise_multiplier(z, sigma_b)

    assert sigma_update == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    assert sigma_update > z
    assert combined_noise_multiplier(sigma_update, sigma_b) == pytest.approx(z)


@pytest.mark.parametrize(("z", "sigma_b"), [(1.0, 0.5), (1.0, 0.1), (0.0, 5.0)])
def test_a_split_that_does_not_exist_is_refused(z, sigma_b):
    with pytest.raises(ValueError, match="must be"):
        update_noise_multiplier(z, sigma_b)


def test_bits_other_than_zero_and_one_are_refused():
    with pytest.raises(ValueError, match="0 or 1"):
        noisy_fraction([0.5], 1, 0.0, noise_generator(0, 0))


def test_a_state_dict_round_trip_goes_on_as_an_uninterrupted_run():
    whole = AdaptiveClip(0.1, indicator_std=2.0)
    run_stream(whole, 30, 40, seed=4)
    first = AdaptiveClip(0.1, indicator_std=2.0)
    run_stream(first, 12, 40, seed=4)

    resumed = AdaptiveClip(0.1, indicator_std=2.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run_stream(resumed, 18, 40, seed=4, start=12)

    assert resumed.clip == whole.clip


def test_a_bad_state_is_refused():
    with pytest.raises(ValueError, match="finite and > 0"):
        AdaptiveClip(1.0).load_state_dict({"clip": -1.0})
