"""Datasets and federated partitions.

The pipeline, the same in every process (Ray workers rebuild it independently):

    load_examples(data, seed)       rows with columns prompt, response, domain
    -> shuffle with ``seed``
    -> first ``central_test_size``  the server's held-out set        (central_test_set)
    -> the rest, the pool           split into ``num_clients`` by a flwr-datasets
                                    partitioner: iid | dirichlet | pathological | natural
    -> each client's partition      split train/test by ``test_fraction``   (client_data)

``data`` is the scenario's data section (attribute access: task, num_examples,
prompt_field, response_field, domain_field, partitioner, partition_by, alpha,
classes_per_client, test_fraction, central_test_size). Building the partitions is
cached per process (``functools.lru_cache`` on pure helpers keyed by those fields,
``num_clients`` and ``seed``), so asking for client after client partitions once.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Value
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner

from fedsim.config.sources import FILE_LOADERS, Fields, check_data_source, resolve_fields
from fedsim.data.tasks import TASKS, generate

logger = logging.getLogger(__name__)

COLUMNS = ("prompt", "response", "domain")
FEATURES = Features({name: Value("string") for name in COLUMNS})
DEFAULT_DOMAIN = "default"
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")


@dataclass(frozen=True)
class ClientData:
    """One client's examples: ``train`` to fine-tune on, ``test`` to evaluate locally."""

    train: Dataset
    test: Dataset


# --- sources --------------------------------------------------------------------------


def load_examples(data: Any, seed: int) -> Dataset:
    """All examples of ``data.task`` as a Dataset with string columns prompt, response, domain.

    Built-in task: ``generate(task, num_examples, seed)``. File or ``hf:`` source: the
    fields are normalised, rows with an empty prompt or response dropped, and when
    ``num_examples`` > 0 a seeded sample of that many rows is kept, in source order.
    """
    if data.task in TASKS:
        if data.num_examples < 1:
            raise ValueError(
                f"`data.num_examples` must be > 0 for the built-in task {data.task!r}, got {data.num_examples}"
            )
        return Dataset.from_list(generate(data.task, data.num_examples, seed), features=FEATURES)
    problem = check_data_source(data.task)
    if problem is not None:
        raise ValueError(problem)
    if data.num_examples < 0:
        raise ValueError(f"`data.num_examples` must be >= 0 (0 = all rows), got {data.num_examples}")
    raw = _load_hub(data.task) if data.task.startswith("hf:") else _load_file(Path(data.task))
    return _cap(_normalise(raw, data, data.task), data.num_examples, seed)


def _load_file(path: Path) -> Dataset:
    loader = FILE_LOADERS[path.suffix.lower()]
    options: dict[str, Any] = {}
    if loader == "csv":  # read every cell as text: "007" stays "007", "" stays ""
        header = _csv_header(path)
        options = {
            "features": Features({c: Value("string") for c in header}),
            "na_filter": False,
        }
    try:
        with _quiet_datasets():  # its reader logs the error we raise
            return datasets.load_dataset(loader, data_files=str(path), split="train", **options)
    except Exception as error:  # many types; each needs the file named
        raise ValueError(f"could not read {path} as {_FORMATS[loader]}: {_root_cause(error)}") from error


_FORMATS = {"json": "JSON (an array of objects, or one object per line)", "csv": "CSV", "parquet": "Parquet"}


def _root_cause(error: BaseException) -> str:
    """The innermost cause's ``Type: message``: datasets wraps the reader's error (which names the
    line or column) in a generic "An error occurred while generating the dataset"."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # pandas skips a BOM too
            header = next(csv.reader(handle), [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"could not read {path} as CSV: {error}") from error
    if not header:
        raise ValueError(f"{path}: empty CSV file (no header row)")
    return header


def _load_hub(source: str) -> Dataset:
    """The split of a Hugging Face dataset: from the local cache when it is there (no network,
    no retries), else from the hub unless offline mode is on (HF_HUB_OFFLINE)."""
    name, _, split = source[3:].partition(":")
    split = split or "train"
    try:
        with _hub_offline():
            return datasets.load_dataset(name, split=split)
    except ConnectionError as error:  # what datasets raises offline for a dataset it has not cached
        if datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE:
            raise ValueError(
                f"Hugging Face dataset {name!r} is not in the local cache ({datasets.config.HF_DATASETS_CACHE}) "
                "and offline mode is on (HF_HUB_OFFLINE); load it once where the hub is reachable, or export "
                "the data to a .jsonl/.parquet file and set `data.task` to its path"
            ) from error
    except Exception as error:  # cached, but not as asked: an unknown split, ...
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {_root_cause(error)}"
        ) from error
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # offline: ConnectionError, OfflineModeIsEnabled, ...
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {error}. "
            "'hf:' sources need network access or a local copy in the Hugging Face cache; "
            "otherwise export the data to a .jsonl/.parquet file and set `data.task` to its path"
        ) from error


@contextmanager
def _hub_offline() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode, quietly, for the duration (both read the
    flag at call time; a process-wide switch, so used only around one load)."""
    flags = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        with _quiet_datasets():  # not "Using the latest cached version ...", nor the miss we report
            yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = flags


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets' own log records off for the duration: the errors it logs are raised, and
    reported, by the caller."""
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(verbosity)


def _resolve_fields(columns: Sequence[str], data: Any, origin: str) -> Fields:
    fields, problems = resolve_fields(columns, data.prompt_field, data.response_field, data.domain_field)
    if problems:
        raise ValueError(f"{origin}: {'; '.join(problems)}; columns found: {', '.join(columns)}")
    return fields


def _texts(values: Iterable[Any]) -> list[str]:
    """Cells as stripped text; None and NaN become ""."""
    return ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip() for v in values]


def _normalise(raw: Dataset, data: Any, origin: str) -> Dataset:
    fields = _resolve_fields(raw.column_names, data, origin)
    prompts = _texts(raw[fields.prompt])
    if fields.input is not None:
        prompts = [f"{p}\n{i}" if i else p for p, i in zip(prompts, _texts(raw[fields.input]), strict=True)]
    responses = _texts(raw[fields.response])
    domains = _texts(raw[fields.domain]) if fields.domain else [""] * len(prompts)
    keep = [i for i, (p, r) in enumerate(zip(prompts, responses, strict=True)) if p and r]
    if not keep:
        raise ValueError(f"{origin}: no row has both a non-empty {fields.prompt!r} and {fields.response!r}")
    if len(keep) < len(prompts):
        logger.info(
            "%s: dropped %d rows with an empty prompt or response",
            origin,
            len(prompts) - len(keep),
        )
    columns = {
        "prompt": [prompts[i] for i in keep],
        "response": [responses[i] for i in keep],
        "domain": [domains[i] or DEFAULT_DOMAIN for i in keep],
    }
    return Dataset.from_dict(columns, features=FEATURES)


def _cap(examples: Dataset, cap: int, seed: int) -> Dataset:
    if cap == 0 or len(examples) <= cap:
        return examples
    return _rows(examples, sorted(random.Random(seed).sample(range(len(examples)), cap)))


def _rows(examples: Dataset, rows: Sequence[int] | np.ndarray) -> Dataset:
    """``rows`` of ``examples`` as a new compact in-memory Dataset (no index mapping).

    Every Dataset this module makes comes from ``Dataset.from_dict``/``from_list`` or from
    here, so ``examples.data`` holds exactly its rows. ``Dataset.select`` would keep a
    reference to the whole table, and flattening it costs as much again.
    """
    return Dataset(examples.data.table.take(pa.array(rows, type=pa.int64())))


# --- central test set and pool -------------------------------------------------------


class _Source(NamedTuple):
    """The fields that decide the examples; quacks like `data` for load_examples."""

    task: str
    num_examples: int
    prompt_field: str | None
    response_field: str | None
    domain_field: str | None
    central_test_size: int
    # A file's (mtime_ns, size), so that an edited file is reloaded.
    stamp: tuple[int, int] | None


def _source(data: Any) -> _Source:
    stamp = None
    if data.task not in TASKS and not data.task.startswith("hf:"):
        try:
            stat = os.stat(data.task)
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            pass  # load_examples reports the missing file
    return _Source(
        data.task,
        data.num_examples,
        data.prompt_field,
        data.response_field,
        data.domain_field,
        data.central_test_size,
        stamp,
    )


class _Split(NamedTuple):
    """The examples of a source, split: the server's held-out set and the clients' pool."""

    held_out: Dataset
    pool: Dataset
    usable: int  # examples loaded: held out + pool + pool rows dropped for repeating a held-out prompt


@lru_cache(maxsize=8)
def _central_and_pool(source: _Source, seed: int) -> _Split:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    examples = load_examples(source, seed)
    n, central = len(examples), source.central_test_size
    if central < 0:
        raise ValueError(f"`data.central_test_size` must be >= 0, got {central}")
    order = np.random.default_rng(seed).permutation(n)
    held_out = _rows(examples, order[:central])
    # Built-in generators repeat prompts; a pool copy of a held-out prompt would let the server
    # score memorisation. Keep the held-out set held out: drop its prompts from the pool.
    seen = set(held_out["prompt"])
    prompts = examples["prompt"][:]  # one read of the column: indexing it row by row costs ~0.2 ms a row
    pool = [i for i in order[central:] if prompts[i] not in seen]
    return _Split(held_out, _rows(examples, pool), n)


def _usable(source: _Source, n: int) -> str:
    """'<where> gave n usable examples', and the cap when it bit."""
    if source.task in TASKS:
        return f"built-in task {source.task!r} gave {n} examples (`data.num_examples`={source.num_examples})"
    cap = f", capped at `data.num_examples`={n}" if n == source.num_examples else ""
    return f"{source.task} gave {n} usable example{'s' * (n != 1)} (rows with a non-empty prompt and response{cap})"


def _too_few(source: _Source, split: _Split, num_clients: int | None) -> str:
    """Why the pool cannot give each of `num_clients` clients an example (None: any client), with
    the numbers: the usable examples, the held-out set, and how many are needed."""
    pool, central = len(split.pool), source.central_test_size
    repeated = split.usable - len(split.held_out) - pool
    dropped = f", and {repeated} more repeat a held-out prompt (dropped)" if repeated else ""
    fewer = f", fewer than num_clients={num_clients}" if num_clients else ""
    need = central + repeated + (num_clients or 1)
    return (
        f"only {pool} examples are left for the clients{fewer}: {_usable(source, split.usable)}, the server "
        f"holds out `data.central_test_size`={central}{dropped}; at least {need} are needed ({central} held out"
        f"{f' + {repeated} repeated' if repeated else ''} + one per client): add examples, or lower "
        "`data.central_test_size` or the number of clients"
    )


def central_test_set(data: Any, seed: int) -> Dataset:
    """The server's held-out examples: the first ``central_test_size`` after the seeded shuffle."""
    source = _source(data)
    split = _central_and_pool(source, seed)
    if not len(split.pool):
        raise ValueError(_too_few(source, split, None))
    return split.held_out


# --- partitions ----------------------------------------------------------------------


class _Scheme(NamedTuple):
    partitioner: str
    partition_by: str
    alpha: float
    classes_per_client: int
    # Dirichlet's min_partition_size: one train and, with a test split, one test example.
    min_size: int


def _scheme(data: Any) -> _Scheme:
    min_size = 2 if data.test_fraction > 0 else 1
    return _Scheme(
        data.partitioner,
        data.partition_by,
        float(data.alpha),
        data.classes_per_client,
        min_size,
    )


def _check_request(data: Any, num_clients: int, client_id: int | None = None) -> None:
    problems = []
    if num_clients < 1:
        problems.append(f"num_clients must be >= 1, got {num_clients}")
    elif client_id is not None and not 0 <= client_id < num_clients:
        problems.append(f"client_id {client_id} is out of range for num_clients={num_clients} (0..{num_clients - 1})")
    if data.partitioner not in PARTITIONERS:
        problems.append(f"`data.partitioner` must be one of {', '.join(PARTITIONERS)}, got {data.partitioner!r}")
    if data.partitioner == "dirichlet" and not data.alpha > 0:
        problems.append(f"`data.alpha` must be > 0, got {data.alpha}")
    if data.partitioner == "pathological" and data.classes_per_client < 1:
        problems.append(f"`data.classes_per_client` must be >= 1, got {data.classes_per_client}")
    if not 0 <= data.test_fraction < 1:
        problems.append(f"`data.test_fraction` must be in [0, 1), got {data.test_fraction}")
    if problems:
        raise ValueError("; ".join(problems))


def _make_partitioner(scheme: _Scheme, num_clients: int, seed: int) -> Partitioner:
    by = scheme.partition_by
    if scheme.partitioner == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=by,
            alpha=scheme.alpha,
            min_partition_size=scheme.min_size,
            seed=seed,
        )
    if scheme.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by=by,
            num_classes_per_partition=scheme.classes_per_client,
            # Client i gets value i % (number of values) first: all are used once
            # num_clients >= number of values.
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    return NaturalIdPartitioner(partition_by=by)


def _check_labels(scheme: _Scheme, labels: list[str], num_clients: int) -> None:
    """Clear errors for what flwr-datasets would reject (or do silently) on these labels."""
    distinct = sorted(set(labels))
    shown = ", ".join(distinct[:10]) + (", ..." if len(distinct) > 10 else "")
    where = f"`data.partition_by`={scheme.partition_by!r} has {len(distinct)} distinct values ({shown})"
    if scheme.partitioner == "natural" and len(distinct) != num_clients:
        raise ValueError(
            f"natural partitioning gives one client per distinct value: {where}, "
            f"but num_clients={num_clients}; set num_clients to {len(distinct)}"
        )
    too_many = scheme.classes_per_client > len(distinct)
    if scheme.partitioner == "pathological" and too_many:
        raise ValueError(f"`data.classes_per_client`={scheme.classes_per_client} is more than {where}")
    if scheme.partitioner == "dirichlet" and len(labels) < scheme.min_size * num_clients:
        raise ValueError(
            f"dirichlet partitioning needs at least {scheme.min_size} examples per "
            f"client, but the pool has {len(labels)} for num_clients={num_clients}; "
            "raise `data.num_examples` or use fewer clients"
        )


def _read_partitions(partitioner: Partitioner, num_clients: int) -> tuple[np.ndarray, ...]:
    """Row indices of every partition, without ``num_clients`` Dataset.select calls.

    Each ``load_partition`` pays Dataset bookkeeping, too slow to repeat for 10,000
    clients, so the assignment the partitioner made is read directly (the fast
    paths are pinned to ``load_partition`` in tests/fedsim/test_data.py):
    IidPartitioner.load_partition(i) is ``dataset.shard(num_clients, i, contiguous=True)``,
    the chunks np.array_split cuts; the others keep the map that ``load_partition``
    selects from in ``_partition_id_to_indices`` (flwr-datasets 0.6.1).
    """
    if isinstance(partitioner, IidPartitioner):
        return tuple(np.array_split(np.arange(partitioner.dataset.num_rows), num_clients))
    partitioner.load_partition(0)  # runs the partitioning
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and sorted(mapping) == list(range(num_clients)):
        return tuple(np.asarray(mapping[i], dtype=np.int64) for i in range(num_clients))
    return tuple(np.asarray(partitioner.load_partition(i)["_row"]) for i in range(num_clients))


@lru_cache(maxsize=8)
def _partition_rows(source: _Source, scheme: _Scheme, num_clients: int, seed: int) -> tuple[np.ndarray, ...]:
    """Pool row indices of each client's partition (read-only arrays)."""
    split = _central_and_pool(source, seed)
    pool = split.pool
    if len(pool) < num_clients:
        raise ValueError(_too_few(source, split, num_clients))
    columns: dict[str, list[Any]] = {"_row": list(range(len(pool)))}
    if scheme.partitioner != "iid":
        if scheme.partition_by not in pool.column_names:
            raise ValueError(f"`data.partition_by` must be one of {', '.join(COLUMNS)}, got {scheme.partition_by!r}")
        columns[scheme.partition_by] = list(pool[scheme.partition_by])
        _check_labels(scheme, columns[scheme.partition_by], num_clients)
    partitioner = _make_partitioner(scheme, num_clients, seed)
    partitioner.dataset = Dataset.from_dict(columns)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dirichlet warns on each retry; we raise
            rows = _read_partitions(partitioner, num_clients)
    except ValueError as error:
        raise ValueError(_partition_failure(scheme, len(pool), num_clients, seed, error)) from error
    unused = len(pool) - sum(len(r) for r in rows)
    if unused:
        logger.warning(
            "%s partitioning left %d of %d pool examples to no client",
            scheme.partitioner,
            unused,
            len(pool),
        )
    for r in rows:
        r.setflags(write=False)
    return rows


def _partition_failure(scheme: _Scheme, pool: int, num_clients: int, seed: int, error: Exception) -> str:
    settings = f"`data.partition_by`={scheme.partition_by!r}, seed={seed}"
    if scheme.partitioner == "dirichlet":
        return (
            f"dirichlet partitioning could not give each of num_clients={num_clients} "
            f"clients at least {scheme.min_size} of the {pool} pool examples "
            f"(`data.alpha`={scheme.alpha}, {settings}): {error} "
            "Raise `data.alpha` or `data.num_examples`, or use fewer clients"
        )
    if scheme.partitioner == "pathological":
        settings += f", `data.classes_per_client`={scheme.classes_per_client}"
    return (
        f"{scheme.partitioner} partitioning of {pool} examples into {num_clients} clients failed ({settings}): {error}"
    )


def _split_rows(rows: np.ndarray, test_fraction: float, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) rows; with >= 2 rows both are non-empty unless test_fraction is 0."""
    n = len(rows)
    n_test = 0
    if test_fraction > 0 and n >= 2:
        n_test = min(n - 1, max(1, math.floor(n * test_fraction + 0.5)))
    shuffled = rows[np.random.default_rng([seed, client_id]).permutation(n)]
    return shuffled[n_test:], shuffled[:n_test]


def client_data(data: Any, num_clients: int, client_id: int, seed: int) -> ClientData:
    """Client ``client_id``'s train and test examples, the same in every process."""
    _check_request(data, num_clients, client_id)
    source = _source(data)
    pool = _central_and_pool(source, seed).pool
    rows = _partition_rows(source, _scheme(data), num_clients, seed)[client_id]
    train, test = _split_rows(rows, data.test_fraction, seed, client_id)
    return ClientData(train=_rows(pool, train), test=_rows(pool, test))


def partition_sizes(data: Any, num_clients: int, seed: int) -> list[int]:
    """Number of examples (train + test) of every client."""
    _check_request(data, num_clients)
    return [len(rows) for rows in _partition_rows(_source(data), _scheme(data), num_clients, seed)]
