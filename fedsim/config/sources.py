"""Cheap checks (nothing loaded) that a scenario's model and data source can be resolved: what
`fedsim.model.loader` and `fedsim.data.partitions` will accept.

A data file is only looked at here (its size, its first line or header row, its magic bytes:
`data_file_problems`); reading it whole, counting its usable rows and partitioning them is
`fedsim.server.preflight`'s, before the run directory is made. Which columns become the prompt,
response and domain is decided once, here (`resolve_fields`), for both.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from fedsim.config.names import MODELS, TASKS

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix → datasets loader
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROMPT_COLUMNS = ("prompt", "instruction")  # looked for in this order when `data.prompt_field` is unset
RESPONSE_COLUMNS = ("response", "output")
PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with these four bytes
_PEEK_LINES = 1000  # blank lines skipped at most when looking for a JSON Lines file's first row


def check_model_name(name: str) -> str | None:
    """None if `name` is a registry name, an existing folder or "org/name"; else why not."""
    if name in MODELS:
        return None
    # strip(): Path("") is ".", which would silently load the working directory
    if name.strip() and (Path(name).expanduser().is_dir() or HF_ID.match(name)):
        return None
    return f"unknown model {name!r}; known: {', '.join(MODELS)}, or a local path, or a Hugging Face id org/name"


def unknown_task_message(task: str, alternatives: str = "") -> str:
    """``unknown task 'x'; known: a, b, ...[; alternatives]``, with a close match if any."""
    message = f"unknown task {task!r}; known: {', '.join(TASKS)}"
    if alternatives:
        message += f"; {alternatives}"
    close = difflib.get_close_matches(task, TASKS, n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else message


def check_data_source(task: str) -> str | None:
    """None if `task` names a usable source, else what is wrong: a built-in task name, an existing
    .jsonl/.json/.csv/.parquet file, or ``hf:<dataset>[:<split>]`` (the hub is not contacted)."""
    if task in TASKS:
        return None
    if task.startswith("hf:"):
        if task[3:].partition(":")[0].strip():
            return None
        return "'hf:' needs a dataset name: hf:<dataset>[:<split>], e.g. hf:tatsu-lab/alpaca"
    suffix = Path(task).suffix.lower()
    if not suffix:
        return unknown_task_message(task, f"or a {'/'.join(FILE_LOADERS)} path, or hf:<dataset>")
    if suffix not in FILE_LOADERS:
        return f"unsupported file type {suffix!r} for {task!r}; use {', '.join(FILE_LOADERS)}"
    if not Path(task).is_file():
        return f"file not found: {task}"
    return None


class Fields(NamedTuple):
    """The columns a data source's examples are read from."""

    prompt: str
    input: str | None  # appended to an auto-detected "instruction" prompt
    response: str
    domain: str | None  # None: every row gets the default domain


def resolve_fields(
    columns: Sequence[str], prompt_field: str | None, response_field: str | None, domain_field: str | None
) -> tuple[Fields, list[str]]:
    """The columns to read from a source with `columns`, given the scenario's `data.*_field`
    settings (None: look for PROMPT_COLUMNS, RESPONSE_COLUMNS, "domain"), and every problem, each
    naming the setting to change; the Fields are meaningful only when there is none."""
    problems: list[str] = []

    def pick(explicit: str | None, candidates: tuple[str, ...], field: str) -> str:
        if explicit is not None:
            if explicit not in columns:
                problems.append(f"`data.{field}`={explicit!r} is not a column")
            return explicit
        found = next((c for c in candidates if c in columns), None)
        if found is None:
            looked = " or ".join(repr(c) for c in candidates)
            problems.append(f"no {field.removesuffix('_field')} field (looked for {looked}; set `data.{field}`)")
        return found or ""

    prompt = pick(prompt_field, PROMPT_COLUMNS, "prompt_field")
    response = pick(response_field, RESPONSE_COLUMNS, "response_field")
    domain = domain_field
    if domain is not None and domain not in columns:
        problems.append(f"`data.domain_field`={domain!r} is not a column")
    auto_input = prompt_field is None and prompt == "instruction" and "input" in columns
    if domain is None and "domain" in columns:
        domain = "domain"
    return Fields(prompt, "input" if auto_input else None, response, domain), problems


def data_file_problems(
    task: str, prompt_field: str | None = None, response_field: str | None = None, domain_field: str | None = None
) -> list[str]:
    """What the start of the data file `task` shows to be wrong, each naming the file and where
    (a built-in task, an hf: source or a missing file: nothing to say here). Reads a few bytes or
    lines: an empty file; a .jsonl whose first row is not a JSON object; a .json that is not JSON;
    a .csv that is not UTF-8 CSV, has no header or no row, or whose header lacks the prompt or
    response column; a .parquet without Parquet's magic bytes."""
    path = Path(task)
    if task in TASKS or task.startswith("hf:") or path.suffix.lower() not in FILE_LOADERS or not path.is_file():
        return []
    try:
        if path.stat().st_size == 0:
            return [f"{path}: the file is empty"]
        check = _FILE_CHECKS[path.suffix.lower()]
        return check(path, (prompt_field, response_field, domain_field))
    except UnicodeDecodeError as exc:
        return [f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})"]
    except OSError as exc:
        return [f"{path}: cannot be read ({exc.strerror or exc})"]


def _jsonl_problems(path: Path, _: tuple[str | None, ...]) -> list[str]:
    """The first non-blank line must be a JSON object (rows may differ in their keys, so the
    fields are checked once the file is read whole)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                return _json_row_problems(path, number, line)
            if number >= _PEEK_LINES:
                break
    return [f"{path}: no rows (only blank lines); expected one JSON object per line"]


def _json_row_problems(path: Path, number: int, line: str) -> list[str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return [f"{path} line {number}: not JSON ({exc.msg}, column {exc.colno}); expected one JSON object per line"]
    if not isinstance(row, dict):
        return [f"{path} line {number}: expected a JSON object per line, got {type(row).__name__} {line.strip()[:40]}"]
    return []


def _json_problems(path: Path, _: tuple[str | None, ...]) -> list[str]:
    """A .json file holds a JSON array of objects, an object, or JSON Lines: it opens with [ or {."""
    with path.open(encoding="utf-8") as handle:
        start = handle.read(4096).lstrip()
    if not start:
        return [f"{path}: no rows (only blank space)"]
    if start[0] not in "[{":
        return [f"{path}: not JSON (starts with {start[:20]!r}); expected an array of objects or one object per line"]
    return []


def _csv_problems(path: Path, fields: tuple[str | None, ...]) -> list[str]:
    """A header row naming the prompt and response columns, and at least one row after it."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # a BOM is not part of the first name
            reader = csv.reader(handle)
            header = next(reader, [])
            first_row = next((row for _, row in zip(range(_PEEK_LINES), reader) if any(row)), None)
            row_line = reader.line_num
    except csv.Error as exc:
        return [f"{path} line {reader.line_num}: not readable as CSV ({exc})"]
    if not any(name.strip() for name in header):
        return [f"{path} line 1: empty header row; expected column names, e.g. prompt,response"]
    _, problems = resolve_fields(header, *fields)
    if problems:
        return [f"{path} line 1 (header): {'; '.join(problems)}; columns found: {', '.join(header)}"]
    if first_row is None:
        return [f"{path}: a header and no rows"]
    if len(first_row) != len(header):
        count = f"{len(first_row)} field{'s' * (len(first_row) != 1)}"
        return [f"{path} line {row_line}: {count}, but the header (line 1) has {len(header)}"]
    return []


def _parquet_problems(path: Path, _: tuple[str | None, ...]) -> list[str]:
    with path.open("rb") as handle:
        head = handle.read(len(PARQUET_MAGIC))
        size = handle.seek(0, 2)
        handle.seek(max(size - len(PARQUET_MAGIC), 0))
        tail = handle.read()
    if size < 3 * len(PARQUET_MAGIC) or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        return [f"{path}: not a Parquet file (it does not start and end with the bytes PAR1)"]
    return []


_FILE_CHECKS = {
    ".jsonl": _jsonl_problems,
    ".json": _json_problems,
    ".csv": _csv_problems,
    ".parquet": _parquet_problems,
}
