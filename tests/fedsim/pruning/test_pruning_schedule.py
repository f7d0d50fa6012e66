"""fedsim.pruning.schedule: the cubic schedule against its formula, events across round boundaries."""

from __future__ import annotations

import pytest

from fedsim.pruning.schedule import events_by, events_in, ratio_at_event, ratio_before_step


def _cubic(e: int, target: float, events: int) -> float:
    """Zhu & Gupta: ρ_e = ρ*·(1 − (1 − e/E)³)."""
    return target * (1.0 - (1.0 - e / events) ** 3)


@pytest.mark.parametrize(("target", "events"), [(0.5, 4), (0.3, 1), (0.8, 3), (0.95, 10)])
def test_ratio_at_each_event_is_the_cubic_schedule(target: float, events: int) -> None:
    for e in range(1, events + 1):
        assert ratio_at_event(e, target, events) == pytest.approx(_cubic(e, target, events), abs=1e-15)


def test_the_cubic_schedule_removes_most_early() -> None:
    got = [ratio_at_event(e, 0.5, 4) for e in range(5)]
    assert got == pytest.approx([0.0, 0.5 * (1 - 0.75**3), 0.5 * (1 - 0.5**3), 0.5 * (1 - 0.25**3), 0.5])
    steps = [b - a for a, b in zip(got, got[1:])]
    assert steps == sorted(steps, reverse=True)  # each event removes less than the one before


@pytest.mark.parametrize("events", [1, 2, 4, 7])
def test_the_target_is_reached_after_e_events_and_never_exceeded(events: int) -> None:
    target = 0.6
    ratios = [ratio_at_event(e, target, events) for e in range(0, events + 5)]
    assert ratios[0] == 0.0
    assert ratios[events] == pytest.approx(target, abs=1e-15)
    assert all(r <= target for r in ratios)
    assert ratios[events:] == [ratios[events]] * 5
    assert ratios == sorted(ratios)  # a ratio only grows


def test_no_event_before_the_first_means_no_pruning() -> None:
    assert ratio_at_event(0, 0.5, 4) == 0.0
    assert ratio_at_event(-3, 0.5, 4) == 0.0


@pytest.mark.parametrize(
    ("steps", "expected"),
    [(0, 1), (1, 1), (3, 1), (4, 2), (7, 2), (8, 3), (12, 4), (13, 4), (1000, 4)],
)
def test_events_by_counts_the_event_before_step_zero(steps: int, expected: int) -> None:
    assert events_by(steps, interval=4, events=4) == expected


def test_the_first_event_is_before_step_zero() -> None:
    assert events_in(start=0, steps=3, target=0.5, interval=20, events=4) == [(0, pytest.approx(_cubic(1, 0.5, 4)))]
    assert ratio_before_step(0, 0.5, interval=20, events=4) == pytest.approx(_cubic(1, 0.5, 4))


def test_events_across_round_boundaries() -> None:
    # interval 4, 8 steps per round, 4 events: events at cumulative steps 0, 4, 8, 12
    target, interval, events = 0.5, 4, 4
    round1 = events_in(0, 8, target, interval, events)
    round2 = events_in(8, 8, target, interval, events)
    round3 = events_in(16, 8, target, interval, events)
    assert [t for t, _ in round1] == [0, 4]
    assert [t for t, _ in round2] == [0, 4]
    assert round3 == []
    ratios = [r for _, r in round1 + round2]
    assert ratios == pytest.approx([_cubic(e, target, events) for e in (1, 2, 3, 4)])
    assert ratios[-1] == pytest.approx(target)


def test_a_round_that_starts_mid_interval_has_its_events_at_the_right_local_steps() -> None:
    # interval 5, rounds of 3 steps: events at cumulative steps 0, 5, 10 → round 2 (start 3) at local 2
    got = [events_in(start, 3, 0.4, 5, 3) for start in (0, 3, 6, 9, 12)]
    assert [[t for t, _ in r] for r in got] == [[0], [2], [], [1], []]
    flat = [r for round_ in got for _, r in round_]
    assert flat == pytest.approx([_cubic(e, 0.4, 3) for e in (1, 2, 3)])


def test_every_event_happens_exactly_once_however_the_steps_are_split_into_rounds() -> None:
    target, interval, events = 0.7, 3, 5
    for per_round in (1, 2, 3, 4, 7, 20):
        seen = []
        for start in range(0, 40, per_round):
            seen += [start + t for t, _ in events_in(start, per_round, target, interval, events)]
        assert seen == [0, 3, 6, 9, 12], per_round


def test_ratio_before_step_follows_the_events() -> None:
    target, interval, events = 0.5, 4, 4
    for step in range(20):
        expected = _cubic(min(step // interval + 1, events), target, events)
        assert ratio_before_step(step, target, interval, events) == pytest.approx(expected)
        assert ratio_before_step(step, target, interval, events) <= target


def test_one_event_prunes_once_at_step_zero() -> None:
    assert events_in(0, 10, 0.5, interval=3, events=1) == [(0, 0.5)]
    assert events_in(10, 10, 0.5, interval=3, events=1) == []
    assert all(ratio_before_step(s, 0.5, 3, 1) == 0.5 for s in range(30))
