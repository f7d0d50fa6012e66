"""A run's privacy plan: δ, q, the noise (given or calibrated), adaptive clipping's split, the
planned ε; and the preflight problems, each naming its dotted path."""

from __future__ import annotations

import pytest

from fedsim.config.privacy import PrivacyConfig
from fedsim.privacy import AdaptiveClip, combined_noise_multiplier, epsilon, plan, plan_problems


def test_a_plan_with_a_noise_multiplier_counts_the_planned_rounds():
    p = plan(PrivacyConfig(mode="central", clip=0.5, noise_multiplier=1.2), num_clients=200, per_round=20, rounds=50)

    assert (p.mode, p.clip, p.noise_multiplier, p.update_noise, p.indicator_std) == ("central", 0.5, 1.2, 1.2, 0.0)
    assert (p.sampling_rate, p.expected_clients, p.rounds) == (0.1, 20.0, 50)
    assert p.delta == pytest.approx(200**-1.1)
    assert p.epsilon == epsilon("central", 1.2, 0.1, 50, p.delta)
    assert not p.adaptive and p.adaptive_clip() is None
    accountant = p.accountant()
    accountant.step(50)
    assert accountant.epsilon(p.delta) == p.epsilon


def test_a_target_epsilon_is_met_and_a_given_delta_is_kept():
    p = plan(PrivacyConfig(mode="central", clip=1.0, target_epsilon=3.0, delta=1e-6), 1000, 50, 200)

    assert p.delta == 1e-6 and p.epsilon <= 3.0
    assert epsilon("central", p.noise_multiplier * 0.999, 0.05, 200, 1e-6) > 3.0


def test_adaptive_clipping_splits_the_noise_and_its_cost_is_counted_in_z():
    cfg = PrivacyConfig(mode="central", clip=0.1, target_epsilon=4.0, adaptive=True, target_quantile=0.7, clip_lr=0.1)

    p = plan(cfg, num_clients=1000, per_round=100, rounds=100)

    assert p.indicator_std == 100 / 20  # auto: the paper's m / 20
    assert p.update_noise > p.noise_multiplier
    assert combined_noise_multiplier(p.update_noise, p.indicator_std) == pytest.approx(p.noise_multiplier)
    assert p.epsilon <= 4.0
    assert p.adaptive_clip() == AdaptiveClip(0.1, 0.7, 0.1, 5.0)


def test_local_mode_plans_without_amplification():
    p = plan(PrivacyConfig(mode="local", clip=1.0, noise_multiplier=3.0), 100, 10, 5)

    assert p.epsilon == epsilon("local", 3.0, 0.1, 5, p.delta) > epsilon("central", 3.0, 0.1, 5, p.delta)


@pytest.mark.parametrize(
    ("cfg", "clients", "problem"),
    [
        (
            PrivacyConfig(mode="central", clip=1.0, target_epsilon=1e-4, delta=1e-5),
            (10, 10, 1000),
            "`privacy.target_epsilon`: no noise multiplier up to 1000 reaches ε ≤ 0.0001",
        ),
        (
            PrivacyConfig(mode="central", clip=1.0, noise_multiplier=1.0, adaptive=True),
            (40, 4, 10),
            "`privacy.indicator_noise` (auto: per_round / 20): the indicator noise σ_b = 0.2 must be > z / 2 = 0.5",
        ),
        (
            PrivacyConfig(mode="central", clip=1.0, noise_multiplier=1.0, adaptive=True, indicator_noise=0.4),
            (40, 4, 10),
            "`privacy.indicator_noise`: the indicator noise σ_b = 0.4 must be > z / 2 = 0.5",
        ),
    ],
)
def test_preflight_names_the_field_that_cannot_be_met(cfg, clients, problem):
    problems = plan_problems(cfg, *clients)

    assert len(problems) == 1 and problems[0].startswith(problem)
    with pytest.raises(ValueError):
        plan(cfg, *clients)


def test_preflight_has_nothing_to_say_when_privacy_is_off_or_plannable():
    assert plan_problems(PrivacyConfig(), 10, 2, 3) == []
    assert plan_problems(PrivacyConfig(mode="central", clip=1.0, noise_multiplier=1.0), 10, 2, 3) == []
