"""A bench's printed table as its results doc: what it printed, under the exact command that ran it.

`keep_printed` tees what a block prints (to the terminal as before, and into a buffer);
`write_printed` writes it to docs/results/<experiment>.md through `results_doc.write_result`,
which keeps the doc's "## Reading" section.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.results_doc import write_result

ROOT = Path(__file__).resolve().parents[1]


class _Tee(io.TextIOBase):
    def __init__(self, out: io.TextIOBase, kept: io.StringIO) -> None:
        self.out, self.kept = out, kept

    def write(self, text: str) -> int:
        self.out.write(text)
        return self.kept.write(text)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def keep_printed(kept: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """What the block prints to stdout, printed as usual and kept in `kept` (appended to)."""
    kept = io.StringIO() if kept is None else kept
    with contextlib.redirect_stdout(_Tee(sys.stdout, kept)):  # type: ignore[arg-type]
        yield kept


def command() -> str:
    """The command line that ran this process, as `.venv/bin/python bench/<script>.py ...`."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join([".venv/bin/python", str(shown), *sys.argv[1:]])


def write_printed(doc: Path, title: str, printed: str) -> None:
    """`doc` = a title, the command, and what the bench printed; its "## Reading" is kept."""
    write_result(doc, f"# {title}\n\n```\n{command()}\n```\n\n```\n{printed.strip(chr(10))}\n```\n")
    print(f"wrote {doc}")
