"""One error shape for every input fedsim reads: all problems at once, each naming where."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.config.availability import KINDS

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2  # a command's exit codes: failed while running; bad input, nothing done

# Retired keys and what replaces them: a scenario that still uses one is told what to write
# instead, not only that the key is unknown.
RETIRED_KEYS = {
    "pool_weight": "replaced by `pool_pulls`, the most pulls' worth of evidence a device borrows from its peers (10; "
    "`fedsim.controllers.base`)",
}


class InputError(ValueError):
    """An input that cannot be used; `problems` lists every reason (a dotted path or a line)."""

    what = "input"  # how the message names the input: "scenario", "trace", ...

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.what} {source} has {len(self.problems)} problem(s):\n{lines}")


def describe(err: Mapping[str, Any]) -> list[str]:
    """Readable lines for one pydantic error: the dotted path, the rule, the value received."""
    loc = [str(p) for p in err["loc"]]
    # pydantic puts the union's tag in the path (`availability.bernoulli.p`): drop it.
    path = ".".join(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "availability" and p in KINDS))
    kind = err["type"]
    if kind == "value_error":  # our own checks, already phrased (section checks name their paths)
        text = str(err["ctx"]["error"])
        return [f"`{path}`: {text}"] if path and not text.startswith("`") else text.splitlines()
    if kind == "extra_forbidden":
        retired = RETIRED_KEYS.get(loc[-1] if loc else "")
        return [f"`{path}` is not a known key" + (f": {retired}" if retired else "")]
    if kind == "missing":
        return [f"`{path}` is required"]
    rule = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return [f"`{path}` {rule}, got {err['input']!r}"]


def read_toml(path: Path, error: type[InputError]) -> dict[str, Any]:
    """The TOML file at `path`, or `error` saying it is missing or not TOML."""
    if not path.is_file():
        raise error(str(path), [f"{error.what.removesuffix(' file')} file not found: {path}"])
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(str(path), [f"not valid TOML: {exc}"]) from None
