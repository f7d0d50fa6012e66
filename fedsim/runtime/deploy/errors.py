"""The error every deployment command raises on bad input."""

from __future__ import annotations

from collections.abc import Sequence


class DeployError(ValueError):
    """Bad input to a deployment command; the message names every problem and the fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))
