"""A device's pace (`fedsim.controllers.pace`): learned from its reports, it prices arms the
device has not tried, falls back on the profile's peers, and screens arms predicted too slow."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.controllers.pace import Pace, fastest_round, hopeless, worst_ratio

FLOPS = np.array([1e12, 1e12, 2e12])  # arms: rank 4, rank 16, rank 4 of a twice-bigger model
PARAMS = np.array([1e6, 4e6, 1e6])


def test_one_round_prices_every_arm_from_compute_and_communication_separately():
    pace = Pace.unknown(np.array([0, 0, 1]))
    pace.observe(
        np.array([0]), flops=np.array([1e12]), params=np.array([1e6]), compute_s=np.array([2.0]), comm_s=np.array([0.5])
    )
    t = pace.predict(np.array([0]), FLOPS, PARAMS)
    assert t.shape == (1, 3)
    np.testing.assert_allclose(t[0], [2.5, 2.0 + 4 * 0.5, 4.0 + 0.5])


def test_later_rounds_average_with_the_old_pace():
    pace = Pace.unknown(np.array([0]))
    for seconds in (2.0, 4.0):
        pace.observe(np.array([0]), np.array([1e12]), np.array([1e6]), np.array([seconds]), np.array([0.0]))
    assert pace.predict(np.array([0]), [1e12], [1e6])[0, 0] == pytest.approx(3.0)


def test_an_unseen_device_takes_its_profiles_median_and_an_unseen_profile_is_unknown():
    pace = Pace.unknown(np.array([0, 0, 0, 0, 1]))
    pace.observe(np.array([0, 1, 2]), np.full(3, 1e12), np.full(3, 1e6), np.array([1.0, 2.0, 9.0]), np.zeros(3))
    t = pace.predict(np.array([3, 4, 1]), [1e12], [1e6])[:, 0]
    assert t[0] == pytest.approx(2.0)  # the median of its peers, not the mean (4.0)
    assert np.isnan(t[1])
    assert t[2] == pytest.approx(2.0)  # its own


def test_reports_that_are_not_finite_teach_nothing():
    pace = Pace.unknown(np.array([0, 0]))
    pace.observe(
        np.array([0, 1]), np.array([1e12, 0.0]), np.array([1e6, 1e6]), np.array([np.nan, 1.0]), np.array([1.0, np.inf])
    )
    assert np.isnan(pace.compute).all() and np.isnan(pace.comm[1]) and pace.comm[0] == pytest.approx(1e-6)


def test_hopeless_arms_are_those_far_slower_than_the_threshold_or_the_devices_own_fastest():
    pace = Pace.unknown(np.array([0, 1, 2]))
    # device 0: fast (0.5 s per 1e6 params), device 1: slow compute (6 s), device 2 never seen
    pace.observe(np.array([0, 1]), np.full(2, 1e12), np.full(2, 1e6), np.array([0.5, 6.0]), np.array([0.5, 0.5]))
    screened = hopeless(pace.predict(np.array([0, 1, 2]), FLOPS, PARAMS), threshold_s=2.0, slack=1.5)
    # device 0: 1.0, 2.5, 1.5 s against 1.5 × 2 = 3 s: nothing is hopeless
    # device 1: 6.5, 8.0, 12.5 s; its fastest (6.5) is over T, so 1.5 × 6.5 = 9.75 s is its limit
    np.testing.assert_array_equal(screened, [[False, False, False], [False, False, True], [False, False, False]])
    assert hopeless(pace.predict(np.array([0]), FLOPS, PARAMS), threshold_s=1.0, slack=1.5).tolist() == [
        [False, True, False]
    ]  # 2.5 > 1.5
    assert not hopeless(
        pace.predict(np.array([0]), FLOPS, PARAMS), threshold_s=np.inf, slack=1.5
    ).any()  # no round yet: nothing to compare


def test_an_unknown_device_screens_the_arms_that_could_be_far_slower_than_its_cheapest():
    np.testing.assert_allclose(worst_ratio(FLOPS, PARAMS), [1.0, 4.0, 2.0])
    # whatever the pace, no arm exceeds its bound: t_k / min_j t_j <= worst_ratio
    for a, b in ((1e-12, 0.0), (0.0, 1e-6), (1e-12, 1e-6), (3e-13, 2e-5)):
        t = a * FLOPS + b * PARAMS
        assert (t / t.min() <= worst_ratio(FLOPS, PARAMS) + 1e-12).all()
    pace = Pace.unknown(np.array([0, 1]))
    pace.observe(np.array([0]), np.array([1e12]), np.array([1e6]), np.array([0.5]), np.array([0.5]))
    times = pace.predict(np.array([0, 1]), FLOPS, PARAMS)
    screened = hopeless(times, threshold_s=2.0, slack=1.5, worst=worst_ratio(FLOPS, PARAMS))
    assert screened.tolist() == [[False, False, False], [False, True, True]]  # device 0 by its pace; 1 by the bound
    assert not hopeless(times, 2.0, 1.5)[1].any()  # without the bound an unknown device screens nothing
    assert not hopeless(times, 2.0, 4.0, worst=worst_ratio(FLOPS, PARAMS))[1].any()


def test_state_round_trips_and_a_wrong_shape_names_it():
    pace = Pace.unknown(np.array([0, 1]))
    pace.observe(np.array([1]), np.array([1e12]), np.array([1e6]), np.array([2.0]), np.array([1.0]))
    other = Pace.unknown(np.array([0, 1]))
    other.load(pace.state())
    np.testing.assert_array_equal(
        other.predict(np.array([1]), FLOPS, PARAMS), pace.predict(np.array([1]), FLOPS, PARAMS)
    )
    with pytest.raises(ValueError, match=r"expected shape \(2, 2\), got \(2, 3\)"):
        other.load(np.zeros((2, 3)))


def test_the_fastest_round_is_the_slowest_device_at_its_fastest_arm():
    pace = Pace.unknown(np.array([0, 1, 2]))
    pace.observe(np.array([0, 1]), np.full(2, 1e12), np.full(2, 1e6), np.array([0.5, 6.0]), np.array([0.5, 0.5]))
    assert fastest_round(pace.predict(np.array([0, 1, 2]), FLOPS, PARAMS)) == pytest.approx(
        6.5
    )  # device 1 at arm 0; 2 unknown
    assert fastest_round(pace.predict(np.array([0]), FLOPS, PARAMS)) == pytest.approx(1.0)
    assert fastest_round(pace.predict(np.array([2]), FLOPS, PARAMS)) == np.inf
