"""Poisson sampling: each client independently with probability q, seeded per round, and a client's
coin its own whoever else is eligible."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.privacy import poisson_sample


def test_each_client_is_taken_with_probability_q():
    n, q, rounds = 50, 0.2, 2000
    counts = np.zeros(n)
    for t in range(rounds):
        counts[poisson_sample(range(n), n, q, seed=0, server_round=t)] += 1

    # a client's count is Binomial(2000, 0.2): mean 400, std ≈ 17.9
    assert np.all(np.abs(counts - q * rounds) < 5 * (rounds * q * (1 - q)) ** 0.5)
    assert counts.sum() / rounds == pytest.approx(q * n, rel=0.02)


def test_the_sample_is_a_pure_function_of_seed_round_and_purpose():
    a = poisson_sample(range(100), 100, 0.3, seed=1, server_round=4)

    assert a == poisson_sample(reversed(range(100)), 100, 0.3, seed=1, server_round=4) == sorted(a)
    assert a != poisson_sample(range(100), 100, 0.3, seed=1, server_round=5)
    assert a != poisson_sample(range(100), 100, 0.3, seed=1, server_round=4, purpose="eval")


def test_a_clients_coin_does_not_depend_on_who_else_is_eligible():
    everyone = poisson_sample(range(40), 40, 0.5, seed=2, server_round=1)
    online = list(range(0, 40, 3))

    assert poisson_sample(online, 40, 0.5, seed=2, server_round=1) == [c for c in everyone if c in online]


def test_rates_zero_and_one_take_no_one_and_everyone():
    assert poisson_sample(range(10), 10, 0.0, 0, 1) == []
    assert poisson_sample([3, 1, 7], 10, 1.0, 0, 1) == [1, 3, 7]


@pytest.mark.parametrize(
    ("eligible", "rate", "message"), [([0], 1.5, "`rate`"), ([10], 0.5, r"client ids"), ([-1], 0.5, "client ids")]
)
def test_bad_inputs_are_refused(eligible, rate, message):
    with pytest.raises(ValueError, match=message):
        poisson_sample(eligible, 10, rate, 0, 1)
