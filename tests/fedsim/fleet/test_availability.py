"""Availability: windows against a brute-force loop, trace errors by line, stateless draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fedsim.config.availability import AlwaysOn, Bernoulli, Diurnal, Trace
from fedsim.fleet.availability import FleetAvailability, TraceError, Windows, dropout_draws, load_trace

ROOT = Path(__file__).resolve().parents[3]
HEADER = "client_id,profile,windows\n"


def random_windows(rng: np.random.Generator, num_clients: int, max_windows: int = 6) -> list[list[tuple[float, float]]]:
    """Sorted, separated windows with integer bounds (so queries can hit them exactly)."""
    per_client = []
    for _ in range(num_clients):
        bounds = np.sort(rng.choice(1000, size=2 * rng.integers(0, max_windows + 1), replace=False)).astype(float)
        per_client.append(list(zip(bounds[0::2], bounds[1::2])))
    return per_client


def brute_online(per_client: list[list[tuple[float, float]]], client: int, t: float) -> tuple[bool, float]:
    for start, end in per_client[client]:
        if start <= t < end:
            return True, end
    return False, t


# --- Windows -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_windows_match_brute_force_in_any_query_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    per_client = random_windows(rng, num_clients=60)
    windows = Windows.from_lists(per_client)
    clients = rng.integers(0, 60, size=3000)
    times = np.where(rng.random(3000) < 0.5, rng.integers(-5, 1005, size=3000), rng.uniform(-5, 1005, size=3000))
    expected = [brute_online(per_client, int(c), float(t)) for c, t in zip(clients, times)]
    for order in (np.arange(3000), rng.permutation(3000), np.arange(3000)[::-1]):
        online = windows.online(clients[order], times[order])
        until = windows.online_until(clients[order], times[order])
        assert online.tolist() == [expected[i][0] for i in order]
        assert until.tolist() == [expected[i][1] for i in order]


def test_windows_scalar_time_and_empty_clients() -> None:
    windows = Windows.from_lists([[(0.0, 10.0)], [], [(5.0, 6.0), (8.0, 9.0)]])
    assert windows.online(np.array([0, 1, 2]), 5.0).tolist() == [True, False, True]
    assert windows.online(np.array([0, 2]), 10.0).tolist() == [False, False]  # [start, end)
    assert Windows.from_lists([[], []]).online(np.array([0, 1]), 3.0).tolist() == [False, False]


def test_from_lists_merges_touching_windows() -> None:
    windows = Windows.from_lists([[(10.0, 20.0), (0.0, 10.0)]])
    assert windows.starts.tolist() == [0.0] and windows.ends.tolist() == [20.0]
    assert windows.online_until(np.array([0]), 5.0).tolist() == [20.0]


@pytest.mark.parametrize(
    ("starts", "ends", "offsets", "message"),
    [
        ([0.0, 5.0], [10.0, 20.0], [0, 2], "overlapping"),
        ([5.0, 0.0], [6.0, 1.0], [0, 2], "sorted"),
        ([3.0], [3.0], [0, 1], "end <= start"),
        ([0.0], [np.inf], [0, 1], "finite"),
        ([0.0], [1.0], [0, 2], "offsets"),
    ],
)
def test_windows_refuse_bad_arrays(starts: list[float], ends: list[float], offsets: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Windows(np.array(starts), np.array(ends), np.array(offsets))


def test_windows_separate_clients_may_overlap_in_time() -> None:
    windows = Windows(np.array([0.0, 5.0]), np.array([10.0, 20.0]), np.array([0, 1, 2]))
    assert windows.online(np.array([0, 1]), 7.0).tolist() == [True, True]


# --- traces --------------------------------------------------------------------------------


def write_trace(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_load_trace_reads_rows_windows_and_overrides(tmp_path: Path) -> None:
    text = "client_id,profile,windows,uplink_mbps\n1,laptop-cpu,100-200,\n0,phone-midrange,0-10; 20-30.5 ,2.5\n"
    rows, windows = load_trace(write_trace(tmp_path, text))
    assert [r["client_id"] for r in rows] == [0, 1]
    assert rows[0] == {"client_id": 0, "profile": "phone-midrange", "line": 3, "overrides": {"uplink_mbps": 2.5}}
    assert rows[1]["overrides"] == {}
    assert windows.online(np.array([0, 0, 1]), np.array([25.0, 15.0, 150.0])).tolist() == [True, False, True]


BAD_TRACES = [
    ("end before start", HEADER + "0,a,0-5\n1,a,30-10\n", "line 3: window '30-10' has end <= start"),
    ("malformed window", HEADER + "0,a,0-5\n1,a,10..20\n", "line 3: window '10..20' must look like start-end"),
    ("negative start", HEADER + "0,a,-5-10\n", "line 2: window '-5-10' must look like start-end"),
    ("overlap", HEADER + "0,a,0-100;50-200\n", "line 2: windows '0-100' and '50-200' overlap"),
    ("unknown column", "client_id,profile,windows,cpu\n0,a,\n", "line 1: unknown column 'cpu'"),
    ("missing column", "client_id,profile\n0,a\n", "line 1: missing column 'windows'"),
    ("duplicate id", HEADER + "0,a,\n1,a,\n0,a,\n", "line 4: client_id 0 already given on line 2"),
    ("missing id", HEADER + "0,a,\n2,a,\n", "client ids must be 0..2, each once; missing: 1"),
    ("bad id", HEADER + "x,a,\n", "line 2: client_id must be a non-negative integer, got 'x'"),
    (
        "non-numeric figure",
        "client_id,profile,windows,train_tflops\n0,a,,fast\n",
        "line 2: train_tflops 'fast' is not a number",
    ),
    (
        "zero bandwidth",
        "client_id,profile,windows,uplink_mbps\n0,a,,0\n",
        "line 2: uplink_mbps must be a finite number > 0, got 0",
    ),
    (
        "negative bandwidth",
        "client_id,profile,windows,downlink_mbps\n0,a,,-3\n",
        "line 2: downlink_mbps must be a finite number > 0, got -3",
    ),
    ("wrong field count", HEADER + "0,a,,9\n", "line 2: expected 3 fields (as in the header), got 4"),
    ("empty profile", HEADER + "0,,\n", "line 2: profile is empty"),
    ("no rows", HEADER, "no clients"),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_TRACES, ids=[c[0] for c in BAD_TRACES])
def test_bad_trace_names_file_and_line(tmp_path: Path, case: str, text: str, expected: str) -> None:
    path = write_trace(tmp_path, text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert str(path) in str(info.value)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_trace_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = HEADER + "0,a,30-10\n0,a,\n3,,0-1;0-2\n"
    with pytest.raises(TraceError) as info:
        load_trace(write_trace(tmp_path, text), known_profiles={"a"})
    problems = "\n".join(info.value.problems)
    for expected in (
        "line 2: window '30-10'",
        "line 4: profile is empty",
        "line 4: windows '0-1' and '0-2' overlap",
        "line 3: client_id 0 already given on line 2",
        "missing: 1, 2",
    ):
        assert expected in problems, problems


def test_trace_checks_profile_names_when_given(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="line 2: unknown profile 'toaster'; known: a, b"):
        load_trace(write_trace(tmp_path, HEADER + "0,toaster,\n"), known_profiles={"a", "b"})


def test_shipped_campus_trace_covers_two_days() -> None:
    rows, windows = load_trace(ROOT / "scenarios" / "traces" / "campus-40.csv")
    assert [r["client_id"] for r in rows] == list(range(40))
    assert {r["profile"] for r in rows} == {"phone-midrange", "phone-highend", "laptop-cpu", "jetson-xavier-nx"}
    assert windows.ends.max() <= 2 * 86400
    by_hour = [windows.online(np.arange(40), h * 3600.0).sum() for h in range(48)]
    assert 0 < min(by_hour) < max(by_hour) < 40  # the fleet breathes: never all on, never all off


# --- specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "raw"),
    [
        (Bernoulli, {"p": 0.0}),
        (Bernoulli, {"p": 1.5}),
        (Bernoulli, {}),
        (Diurnal, {"on_fraction": 0.0}),
        (Diurnal, {"period_s": -1.0}),
        (Diurnal, {"period_s": float("inf")}),
        (AlwaysOn, {"p": 0.5}),
        (Bernoulli, {"p": "0.5"}),
    ],
)
def test_bad_specs_are_refused(spec: type, raw: dict) -> None:
    with pytest.raises(ValidationError):
        spec.model_validate(raw)


# --- the fleet -----------------------------------------------------------------------------


def test_bernoulli_fraction_and_order_independence() -> None:
    fleet = FleetAvailability.from_groups([(Bernoulli(p=0.3), 2000)], seed=7)
    clients = np.arange(2000)
    table = np.array([fleet.online(clients, 0.0, r) for r in range(50)])  # (rounds, clients)
    assert abs(table.mean() - 0.3) < 0.01
    assert not np.array_equal(table[0], table[1])  # a fresh draw each round
    reverse = fleet.online(clients[::-1], 123.0, 3)[::-1]
    subset = np.random.default_rng(0).choice(2000, size=300, replace=False)
    assert np.array_equal(reverse, table[3])
    assert np.array_equal(fleet.online(subset, 0.0, 3), table[3][subset])
    other_seed = FleetAvailability.from_groups([(Bernoulli(p=0.3), 2000)], seed=8)
    assert not np.array_equal(other_seed.online(clients, 0.0, 3), table[3])


def test_diurnal_fraction_and_phases() -> None:
    fleet = FleetAvailability.from_groups([(Diurnal(period_s=100.0, on_fraction=0.25), 1000)], seed=1)
    clients = np.arange(1000)
    table = np.array([fleet.online(clients, t, 0) for t in np.arange(0.0, 100.0, 0.5)])  # (times, clients)
    assert np.allclose(table.mean(axis=0), 0.25, atol=0.011)  # each client on a quarter of the time
    first_on = np.argmax(table, axis=0)
    assert len(np.unique(first_on)) > 100  # phases differ across clients
    assert abs(table[0].mean() - 0.25) < 0.05  # at any instant about a quarter are on
    assert np.array_equal(table, np.array([fleet.online(clients, t, 9) for t in np.arange(0.0, 100.0, 0.5)]))


def test_diurnal_online_through_stops_at_the_off_transition() -> None:
    fleet = FleetAvailability.from_groups([(Diurnal(period_s=100.0, on_fraction=0.3), 500)], seed=2)
    clients = np.arange(500)
    online = fleet.online(clients, 10.0, 0)
    for dt in (1.0, 10.0, 29.0, 31.0):
        through = fleet.online_through(clients, 10.0, np.full(500, 10.0 + dt), 0)
        # an off-spell (70 s) outlasts dt, so online at both ends means online throughout
        brute = online & fleet.online(clients, 10.0 + dt - 1e-9, 0)
        assert np.array_equal(through, brute), dt
    assert not fleet.online_through(clients, 10.0, np.full(500, 41.0), 0).any()  # longer than any on-spell


def test_online_through_rejects_a_trace_client_whose_window_ends_first() -> None:
    windows = Windows.from_lists([[(0.0, 100.0)], [(0.0, 1000.0)], [(60.0, 1000.0)]])
    fleet = FleetAvailability([Trace(), Trace(), Trace()], seed=0, windows=windows)
    clients = np.arange(3)
    assert fleet.online(clients, 50.0, 0).tolist() == [True, True, False]
    assert fleet.online_through(clients, 50.0, np.array([200.0, 200.0, 200.0]), 0).tolist() == [False, True, False]
    assert fleet.online_through(clients, 50.0, np.array([100.0, 200.0, 200.0]), 0).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="t_end"):
        fleet.online_through(clients, 50.0, np.array([40.0, 60.0, 60.0]), 0)


def test_bernoulli_and_always_online_through_follow_the_round_draw() -> None:
    fleet = FleetAvailability.from_groups([(AlwaysOn(), 10), (Bernoulli(p=0.5), 1000)], seed=3)
    clients = np.arange(1010)
    through = fleet.online_through(clients, 0.0, np.full(1010, 1e9), 4)
    assert np.array_equal(through, fleet.online(clients, 0.0, 4))
    assert through[:10].all()


def test_per_client_specs_equal_groups() -> None:
    groups = [(AlwaysOn(), 3), (Bernoulli(p=0.4), 50), (Diurnal(on_fraction=0.6), 50), (Trace(), 4)]
    windows = Windows.from_lists([[]] * 103 + [[(0.0, 10.0)], [], [(5.0, 50.0)], [(0.0, 1e6)]])
    per_client = [spec for spec, count in groups for _ in range(count)]
    a = FleetAvailability(per_client, seed=5, windows=windows)
    b = FleetAvailability.from_groups(groups, seed=5, windows=windows)
    for t, r in ((0.0, 0), (7.0, 1), (40000.0, 2)):
        assert np.array_equal(a.online(np.arange(107), t, r), b.online(np.arange(107), t, r))


def test_trace_spec_needs_windows() -> None:
    with pytest.raises(ValueError, match="trace availability"):
        FleetAvailability([AlwaysOn(), Trace()], seed=0)
    with pytest.raises(ValueError, match="windows for 1 clients"):
        FleetAvailability([AlwaysOn(), Trace()], seed=0, windows=Windows.from_lists([[]]))


def test_unknown_client_is_refused() -> None:
    fleet = FleetAvailability([AlwaysOn()], seed=0)
    with pytest.raises(IndexError):
        fleet.online(np.array([1]), 0.0, 0)


def test_dropout_draws_are_stateless_and_a_separate_stream() -> None:
    clients = np.arange(20000)
    drops = dropout_draws(clients, server_round=2, seed=11, p=0.1)
    assert abs(drops.mean() - 0.1) < 0.01
    assert np.array_equal(dropout_draws(clients[::-1], 2, 11, 0.1)[::-1], drops)
    assert not np.array_equal(dropout_draws(clients, 3, 11, 0.1), drops)
    presence = FleetAvailability.from_groups([(Bernoulli(p=0.1), 20000)], seed=11).online(clients, 0.0, 2)
    assert not np.array_equal(presence, drops)
    assert not dropout_draws(clients, 2, 11, 0.0).any() and dropout_draws(clients, 2, 11, 1.0).all()
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_draws(clients, 2, 11, 1.5)


def test_ten_thousand_clients_query() -> None:
    rng = np.random.default_rng(0)
    n = 10_000
    bounds = np.sort(rng.uniform(0, 172800, size=(n, 20)), axis=1)
    windows = Windows(bounds[:, 0::2].ravel(), bounds[:, 1::2].ravel(), np.arange(0, 10 * n + 1, 10))
    groups = [(AlwaysOn(), 1000), (Bernoulli(p=0.7), 3000), (Diurnal(), 3000), (Trace(), 3000)]
    fleet = FleetAvailability.from_groups(groups, seed=0, windows=windows)
    clients = rng.permutation(n)
    for r in range(20):
        online = fleet.online(clients, r * 600.0, r)
        through = fleet.online_through(clients, r * 600.0, r * 600.0 + rng.uniform(0, 3600, n), r)
        assert online.shape == through.shape == (n,)
        assert not (through & ~online).any()
