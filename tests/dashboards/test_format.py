"""Values as a person reads them."""

from __future__ import annotations

import math
from typing import Any

import pytest

from dashboards.format import describe_event, human_bytes, human_seconds, human_si, number


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "–"), (math.nan, "–"), (0, "0 B"), (512, "512 B"), (14_267, "13.9 KiB"), (1023 * 1024, "1023 KiB"),
     (3 * 2**30, "3 GiB"), (1.5 * 2**40, "1.5 TiB")],
)  # fmt: skip
def test_human_bytes(value: float | None, text: str) -> None:
    assert human_bytes(value) == text


@pytest.mark.parametrize(
    ("value", "text"), [(1.92e9, "1.92 GFLOP"), (2e12, "2 TFLOP"), (950.0, "950 FLOP"), (math.inf, "–")]
)
def test_human_si(value: float, text: str) -> None:
    assert human_si(value, "FLOP") == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0099, "9.9 ms"), (3.2, "3.2 s"), (250, "4 min 10 s"), (7500, "2 h 05 min"), (-154, "-2 min 34 s")],
)
def test_human_seconds(value: float, text: str) -> None:
    assert human_seconds(value) == text


@pytest.mark.parametrize(("value", "text"), [(None, "–"), (0.123456, "0.1235"), (12345.6, "12346"), (7, "7")])
def test_number(value: Any, text: str) -> None:
    assert number(value) == text


def test_events_read_as_sentences() -> None:
    round_end = {"time": 0.0, "event": "round_end", "round": 1, "rounds": 4, "train_loss": 4.46, "clients_ok": 8,
                 "sim_time_s": 0.0099, "elapsed_s": 11.07, "central_accuracy": None}  # fmt: skip
    resumed = {"event": "run_resumed", "after_round": 3, "not_restored": ["residuals", "personal B"]}

    assert describe_event(round_end)[1:] == (
        "round end",
        "round 1 of 4 · train loss 4.46 · clients ok 8 · simulated 9.9 ms · wall 11.1 s",
    )
    assert describe_event(resumed) == ("", "run resumed", "after round 3 · not restored: residuals, personal B")
