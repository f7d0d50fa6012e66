"""The simulated clock's pure rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.fleet.clock import comm_seconds, keep_first_finishers, payload_bytes, round_duration


def test_payload_bytes_counts_the_tensors_that_travel() -> None:
    small = RecordDict({"arrays": ArrayRecord({"a": torch.randn(8, 8)})})
    big = RecordDict({"arrays": ArrayRecord({"a": torch.randn(8, 8), "b": torch.randn(64, 64)})})
    # the float32 bytes plus a few % of object headers and ids
    assert payload_bytes(big) - payload_bytes(small) == pytest.approx(64 * 64 * 4, rel=0.05)
    with_config = RecordDict(
        {"arrays": ArrayRecord({"a": torch.randn(8, 8)}), "config": ConfigRecord({"s": "x" * 1000})}
    )
    assert payload_bytes(with_config) - payload_bytes(small) >= 1000


def test_comm_seconds() -> None:
    np.testing.assert_allclose(comm_seconds(1e6, 2e6, np.array([8e6]), np.array([16e6])), [2.0])


@pytest.mark.parametrize(
    ("finish", "k", "deadline", "kept", "duration"),
    [
        ([3.0, 1.0, 2.0], 3, 0.0, [True, True, True], 3.0),  # all kept, slowest sets the pace
        ([3.0, 1.0, 2.0], 2, 0.0, [False, True, True], 2.0),  # over-commitment: first 2 finishers
        ([3.0, 1.0, 2.0], 3, 2.5, [False, True, True], 2.5),  # deadline: waited it out
        ([3.0, 1.0, 2.0], 1, 2.5, [False, True, False], 2.5),
        ([5.0, 6.0], 2, 4.0, [False, False], 4.0),  # nobody made it
        ([1.0, 1.0, 1.0], 2, 0.0, [True, True, False], 1.0),  # ties: by position
    ],
)
def test_keep_and_duration(finish: list[float], k: int, deadline: float, kept: list[bool], duration: float) -> None:
    mask = keep_first_finishers(np.array(finish), k, deadline)
    assert mask.tolist() == kept
    assert round_duration(np.array(finish), mask, deadline) == duration
