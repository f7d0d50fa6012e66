"""Write a generated result into docs/results/, keeping the person's reading of it.

A results doc is the bench's output (table, command, seeds) followed by a "## Reading" section
that a person writes; `write_result` replaces the first part and keeps the second.
"""

from __future__ import annotations

from pathlib import Path

READING = "## Reading"


def write_result(doc: Path, generated: str) -> None:
    """`doc` = `generated` + its current "## Reading" section (a placeholder when it has none)."""
    old = doc.read_text() if doc.is_file() else ""
    reading = old.split(READING, 1)[1] if READING in old else "\n\n(to be written)\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{generated.rstrip()}\n\n{READING}{reading}")
