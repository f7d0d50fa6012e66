"""The accountant's ε is dp_accounting's for the stated event; a checkpointed accountant goes on
spending the same budget; the calibrated noise meets the target ε, barely, and moves the right way."""

from __future__ import annotations

import json
import subprocess
import sys

import dp_accounting as dp
import pytest
from dp_accounting.rdp import RdpAccountant

from fedsim.privacy import MAX_NOISE, Accountant, UnreachableTarget, default_delta, epsilon, noise_for_target

ADD_REMOVE = dp.NeighboringRelation.ADD_OR_REMOVE_ONE


def direct(event: dp.DpEvent, delta: float, relation: dp.NeighboringRelation = ADD_REMOVE) -> float:
    return RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(delta)


@pytest.mark.parametrize(
    ("q", "z", "rounds", "delta"),
    [(0.1, 1.0, 100, 1e-5), (0.01, 0.8, 1000, 1e-6), (0.5, 2.0, 20, 1e-3), (1.0, 5.0, 10, 1e-5)],
)
def test_central_epsilon_is_dp_accountings_for_poisson_sampled_gaussian_rounds(q, z, rounds, delta):
    accountant = Accountant("central", z, q)

    accountant.step(rounds)

    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), rounds)
    assert accountant.epsilon(delta) == pytest.approx(direct(event, delta), rel=1e-12)


def test_local_epsilon_is_a_gaussian_of_multiplier_z_over_2_every_round_without_sampling():
    accountant = Accountant("local", 4.0, 0.1)

    accountant.step(30)

    event = dp.SelfComposedDpEvent(dp.GaussianDpEvent(2.0), 30)
    assert accountant.epsilon(1e-5) == pytest.approx(direct(event, 1e-5), rel=1e-12)


def test_steps_add_up_and_epsilon_grows_with_rounds_and_shrinks_with_noise():
    a, b = Accountant("central", 1.0, 0.1), Accountant("central", 1.0, 0.1)

    a.step(3), a.step(7), b.step(10)

    assert a.epsilon(1e-5) == b.epsilon(1e-5)
    eps = [epsilon("central", 1.0, 0.1, t, 1e-5) for t in (1, 10, 100)]
    assert eps == sorted(eps) and len(set(eps)) == 3
    assert epsilon("central", 2.0, 0.1, 100, 1e-5) < eps[-1]
    assert Accountant("central", 1.0, 0.1).epsilon(1e-5) == 0.0  # no round, no cost


def test_a_state_dict_round_trip_continues_the_same_epsilon():
    whole, first = Accountant("central", 1.1, 0.05), Accountant("central", 1.1, 0.05)
    whole.step(50)
    first.step(20)

    resumed = Accountant("central", 1.1, 0.05)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed.step(30)

    assert resumed.steps == 50 and resumed.epsilon(1e-5) == whole.epsilon(1e-5)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"mode": "central", "noise_multiplier": 2.0, "sampling_rate": 0.05, "steps": 3}, "noise_multiplier 2.0"),
        ({"mode": "local", "noise_multiplier": 1.1, "sampling_rate": 0.05, "steps": 3}, "mode 'local'"),
        ({"mode": "central", "noise_multiplier": 1.1, "sampling_rate": 0.05, "steps": -1}, "invalid step count"),
    ],
)
def test_a_state_of_another_mechanism_is_refused(state, message):
    with pytest.raises(ValueError, match=message):
        Accountant("central", 1.1, 0.05).load_state_dict(state)


def test_poisson_sampling_is_far_cheaper_than_sampling_without_replacement_under_replace_one():
    n, m, z, rounds = 100, 10, 1.0, 100
    delta = default_delta(n)
    wor = dp.SelfComposedDpEvent(dp.SampledWithoutReplacementDpEvent(n, m, dp.GaussianDpEvent(z / 2)), rounds)

    poisson = epsilon("central", z, m / n, rounds, delta)

    assert poisson == pytest.approx(4.6, abs=0.1)
    assert direct(wor, delta, dp.NeighboringRelation.REPLACE_ONE) > 10 * poisson


@pytest.mark.parametrize(("target", "mode", "q", "rounds"), [(1.0, "central", 0.1, 100), (8.0, "central", 0.02, 500)])
def test_the_calibrated_noise_meets_the_target_and_barely(target, mode, q, rounds):
    z = noise_for_target(target, 1e-5, rounds, mode, q)

    assert epsilon(mode, z, q, rounds, 1e-5) <= target
    assert epsilon(mode, z * 0.999, q, rounds, 1e-5) > target


def test_more_budget_needs_less_noise_and_more_rounds_need_more():
    by_target = [noise_for_target(t, 1e-5, 100, "central", 0.1) for t in (0.5, 2.0, 8.0)]
    by_rounds = [noise_for_target(2.0, 1e-5, t, "central", 0.1) for t in (10, 100, 1000)]

    assert by_target == sorted(by_target, reverse=True) and len(set(by_target)) == 3
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 3


def test_local_calibration_meets_the_target():
    z = noise_for_target(2.0, 1e-5, 10, "local", 1.0)

    assert epsilon("local", z, 1.0, 10, 1e-5) <= 2.0 < epsilon("local", z * 0.999, 1.0, 10, 1e-5)


def test_an_unreachable_target_is_refused_with_the_reason():
    with pytest.raises(UnreachableTarget, match=rf"no noise multiplier up to {MAX_NOISE:g} reaches ε ≤ 0.0001"):
        noise_for_target(1e-4, 1e-5, 1000, "local", 1.0)


def test_the_default_delta_is_one_over_n_to_the_1_1():
    assert default_delta(100) == pytest.approx(100**-1.1)
    assert default_delta(1000) < 1 / 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bogus", 1.0, 0.1), "`mode`"),
        (("central", 0.0, 0.1), "`noise_multiplier`"),
        (("central", 1.0, 0.0), "`sampling_rate`"),
    ],
)
def test_a_bad_mechanism_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        Accountant(*args)


def test_dp_accounting_loads_no_torch():
    code = "import sys, dp_accounting; print('torch' in sys.modules)"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.strip() == "False"
