"""Cheap checks (nothing loaded) that a scenario's model and data source can be resolved: what
`fedsim.model.loader` and `fedsim.data.partitions` will accept."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from fedsim.config.names import MODELS, TASKS

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix → datasets loader
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
