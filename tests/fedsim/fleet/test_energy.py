"""Energy per client-round against the formula worked by hand; batteries that drain, stop at their
threshold, charge in their windows (checked against a brute-force integral) and survive a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim.config.devices import CATALOG, Battery, ChargeWindow
from fedsim.config.scenario import load_scenario
from fedsim.fleet.energy import DAY_S, Batteries, BatterySpec, client_energy, cut_at, idle_wait, round_energy
from fedsim.fleet.fleet import build_fleet

ROOT = Path(__file__).resolve().parents[3]
H = 3600.0

# --- energy per client-round ------------------------------------------------------------------


def test_client_energy_is_the_sum_of_its_four_terms() -> None:
    energy = client_energy(
        compute_s=[3.0, 0.0],
        bytes_up=[2e6, 5e5],
        bytes_down=[4e6, 0.0],
        wait_s=[7.0, 2.0],
        train_watts=[10.0, 500.0],
        idle_watts=[1.0, 60.0],
        j_per_mb_up=[2.5, 0.008],
        j_per_mb_down=[0.5, 0.0044],
    )
    # 10 W·3 s + 2.5 J/MB·2 MB + 0.5 J/MB·4 MB + 1 W·7 s; 0 + 0.008·0.5 + 0 + 60·2
    np.testing.assert_allclose(energy, [30.0 + 5.0 + 2.0 + 7.0, 0.004 + 120.0])
    assert round_energy(energy) == pytest.approx(44.0 + 120.004)


def test_an_unknown_figure_gives_unknown_energy_not_zero() -> None:
    energy = client_energy([1.0, 1.0], [0, 0], [0, 0], [0, 0], [np.nan, 2.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    assert np.isnan(energy[0]) and energy[1] == 2.0
    assert np.isnan(round_energy(energy))
    assert round_energy([]) == 0.0


def test_negative_seconds_or_bytes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"`wait_s` must be >= 0, got min -1.0"):
        client_energy([1.0], [0], [0], [-1.0], [1.0], [1.0], [1.0], [1.0])


def test_idle_wait_is_the_time_left_in_the_round() -> None:
    np.testing.assert_array_equal(idle_wait([2.0, 10.0, 12.0], 10.0), [8.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("end", "stages", "expected"),
    [
        (10.0, (2.0, 5.0, 1.0), (5.0, 1.0, 1.0)),  # done at 8 s: all of it
        (10.0, (2.0, 20.0, 1.0), (8.0, 1.0, 0.0)),  # cut while training: 8 s of it, nothing sent
        (10.0, (1.0, 5.0, 8.0), (5.0, 1.0, 0.5)),  # cut while sending, half way
        (1.0, (4.0, 5.0, 1.0), (0.0, 0.25, 0.0)),  # cut while receiving
        (3.0, (0.0, 5.0, 0.0), (3.0, 1.0, 0.0)),  # no link seconds: the upload's turn never came
        (5.0, (0.0, 5.0, 0.0), (5.0, 1.0, 1.0)),  # ... and came exactly at the end
    ],
)
def test_a_client_cut_at_the_round_end_got_through_its_stages_in_order(
    end: float, stages: tuple[float, float, float], expected: tuple[float, float, float]
) -> None:
    trained, down, up = cut_at(end, *stages)
    assert (float(trained), float(down), float(up)) == pytest.approx(expected)


def test_cut_at_is_elementwise() -> None:
    trained, down, up = cut_at([10.0, 1.0], [2.0, 4.0], [5.0, 5.0], [1.0, 1.0])
    np.testing.assert_allclose(trained, [5.0, 0.0])
    np.testing.assert_allclose(down, [1.0, 0.25])
    np.testing.assert_allclose(up, [1.0, 0.0])


def test_fleet_carries_each_profiles_figures_unjittered() -> None:
    fleet = build_fleet(load_scenario(ROOT / "scenarios" / "phones-and-laptops.toml"))
    for i, name in enumerate(fleet.device):
        profile = CATALOG[str(name)]
        assert fleet.train_watts[i] == profile.train_watts and fleet.idle_watts[i] == profile.idle_watts
        assert (fleet.radio_j_per_mb_up[i], fleet.radio_j_per_mb_down[i]) == (
            profile.radio_j_per_mb_up,
            profile.radio_j_per_mb_down,
        )
        assert profile.battery is not None and fleet.battery.capacity_j[i] == profile.battery.capacity_wh * H


# --- batteries --------------------------------------------------------------------------------


def battery(
    wh: float = 1.0, charge: float = 1.0, threshold: float = 0.2, *windows: tuple[float, float, float]
) -> Battery:
    return Battery(
        capacity_wh=wh,
        initial_charge=charge,
        threshold=threshold,
        charging=tuple(ChargeWindow(start_h=a, end_h=b, watts=w) for a, b, w in windows),
    )


def test_spec_splits_windows_over_midnight_and_pads_rows() -> None:
    spec = BatterySpec.of([battery(1.0, 1.0, 0.2, (22.0, 6.0, 5.0)), None, battery(2.0, 0.5)])
    assert spec.window_start_s.shape == (3, 2)
    np.testing.assert_array_equal(spec.window_start_s[0], [22 * H, 0.0])
    np.testing.assert_array_equal(spec.window_end_s[0], [24 * H, 6 * H])
    np.testing.assert_array_equal(spec.window_watts, [[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(spec.capacity_j, [H, np.nan, 2 * H])


def test_drain_takes_the_energy_and_stops_at_the_threshold() -> None:
    book = Batteries(BatterySpec.of([battery(1.0, 1.0, 0.25)]))  # 3600 J, unavailable at or below 900 J
    book.drain([0], [2000.0], t=10.0)
    assert book.charge_at([0], 10.0)[0] == 1600.0 and book.available([0], 10.0)[0]
    book.drain([0], [700.0], t=20.0)
    assert book.charge_at([0], 20.0)[0] == 900.0 and not book.available([0], 20.0)[0]  # at θ·C: out
    assert not book.available([0], 5 * DAY_S)[0]  # no window: it never charges
    book.drain([0], [5000.0], t=30.0)
    assert book.charge_at([0], 30.0)[0] == 0.0  # floored at empty


def test_a_drained_device_comes_back_once_its_window_has_charged_it() -> None:
    book = Batteries(BatterySpec.of([battery(1.0, 0.1, 0.5, (2.0, 3.0, 1.0))]))  # 360 of 3600 J; 1 W from 02:00
    assert not book.available([0], 2 * H)[0]
    assert book.charge_at([0], 2 * H + 10.0)[0] == 370.0
    t_back = 2 * H + 1440.0  # 360 + 1440 = 1800 J = θ·C: still out; a second later, in
    assert not book.available([0], t_back)[0] and book.available([0], t_back + 1.0)[0]
    assert book.charge_at([0], 3 * H)[0] == 3600.0  # 360 + 3600 J received, capped at capacity


def test_charge_in_windows_matches_a_brute_force_integral() -> None:
    rng = np.random.default_rng(0)
    windows = [(22.0, 6.0, 3.0), (9.5, 11.0, 7.0), (13.0, 13.25, 11.0)]
    spec = BatterySpec.of([battery(1e6, 0.0, 0.0, *windows)])  # never full: charge = energy received
    book = Batteries(spec)
    step = 1.0  # seconds; each window edge is on the grid
    grid = np.arange(0.0, 3 * DAY_S, step) + step / 2
    hour = np.mod(grid, DAY_S) / H
    inside = [(hour >= a) & (hour < b) if a < b else (hour >= a) | (hour < b) for a, b, _ in windows]
    power = np.sum([w * on for (_, _, w), on in zip(windows, inside)], axis=0)
    for t in np.sort(rng.uniform(0, 3 * DAY_S, 5)).round():
        expected = float(np.sum(power[grid < t]) * step)
        assert book.charge_at([0], float(t))[0] == pytest.approx(expected, abs=1e-6)


def test_charging_between_drains_is_counted_once() -> None:
    book = Batteries(BatterySpec.of([battery(10.0, 0.5, 0.0, (1.0, 2.0, 10.0))]))  # 18000 J, 10 W 01:00-02:00
    book.drain([0], [0.0], t=1.5 * H)  # half an hour in the window: +18000 J, full
    assert book.charge_at([0], 1.5 * H)[0] == 36000.0
    book.drain([0], [18000.0], t=1.5 * H)
    assert book.charge_at([0], 3 * H)[0] == 18000.0 + 0.5 * H * 10.0  # the second half-hour only
    with pytest.raises(ValueError, match="before client 0's last drain"):
        book.charge_at([0], H)


def test_mains_powered_devices_are_always_available_and_never_drain() -> None:
    book = Batteries(BatterySpec.of([None, battery(1.0, 0.0)]))
    np.testing.assert_array_equal(book.available([0, 1], 0.0), [True, False])
    book.drain([0, 1], [np.nan, 0.0], t=5.0)  # unknown energy is fine where there is no battery
    assert np.isnan(book.charge_at([0], 5.0)[0])
    with pytest.raises(ValueError, match="not NaN for a client with a battery"):
        book.drain([1], [np.nan], t=6.0)
    with pytest.raises(ValueError, match="must be distinct"):
        book.drain([1, 1], [1.0, 1.0], t=6.0)
    with pytest.raises(IndexError, match=r"client ids must be in \[0, 2\)"):
        book.available([2], 0.0)


def test_state_round_trip_resumes_the_same_charges() -> None:
    spec = BatterySpec.of([battery(1.0, 0.9, 0.2, (0.0, 1.0, 100.0)), None, battery(2.0, 0.3)])
    book = Batteries(spec)
    book.drain([0, 2], [1500.0, 100.0], t=0.5 * H)
    resumed = Batteries(spec)
    resumed.load_state_dict(book.state_dict())
    t = 0.75 * H
    np.testing.assert_array_equal(resumed.charge_at([0, 1, 2], t), book.charge_at([0, 1, 2], t))
    np.testing.assert_array_equal(resumed.available([0, 1, 2], t), book.available([0, 1, 2], t))


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"charge_j": np.zeros(3)}, "`updated_s` is missing"),
        ({"charge_j": np.zeros(2), "updated_s": np.zeros(3)}, r"`charge_j` must have shape \(3,\), got \(2,\)"),
        ({"charge_j": np.zeros(3), "updated_s": np.zeros(3), "x": np.zeros(3)}, "`x` is not a battery state key"),
        ({"charge_j": np.zeros(3), "updated_s": np.zeros(3)}, "NaN exactly where a client has no battery"),
    ],
)
def test_a_state_for_another_fleet_is_refused(state: dict[str, np.ndarray], expected: str) -> None:
    book = Batteries(BatterySpec.of([battery(), None, battery()]))
    with pytest.raises(ValueError, match=expected):
        book.load_state_dict(state)
