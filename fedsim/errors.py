"""One error shape for every input fedsim reads: all problems at once, each naming where."""

from __future__ import annotations

from collections.abc import Sequence


class InputError(ValueError):
    """An input that cannot be used; `problems` lists every reason (a dotted path or a line)."""

    what = "input"  # how the message names the input: "scenario", "trace", ...

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.what} {source} has {len(self.problems)} problem(s):\n{lines}")
