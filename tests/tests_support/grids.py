"""Stand-ins for Flower's Grid and task identity, for tests that build messages outside a run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flwr.supercore.task_identity import TaskIdentity


class NodesOnly:
    """A grid that can only list its nodes: sampling works, any message would fail."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's Message() reads the running task's identity; outside a run, this provides one."""
    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    yield
