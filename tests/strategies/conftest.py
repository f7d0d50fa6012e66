"""Every strategy test builds Flower messages outside a run: they all get a task identity."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _identity(task_identity: None) -> None:
    """Provide the task identity to every test here (`tests_support.grids.task_identity`)."""
