"""Tests for fedsim/data/partitions.py: sources, central/pool split, partitions, train/test splits."""

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pandas as pd
import pytest
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
)

from fedsim.data import partitions as fd
from fedsim.data.partitions import (
    central_test_set,
    check_data_source,
    client_data,
    load_examples,
    partition_sizes,
)
from fedsim.data.tasks import generate

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Data:
    """The scenario's data section, with its defaults."""

    task: str = "mixed"
    num_examples: int = 2000
    prompt_field: str | None = None
    response_field: str | None = None
    domain_field: str | None = None
    partitioner: str = "iid"
    partition_by: str = "domain"
    alpha: float = 0.5
    classes_per_client: int = 2
    test_fraction: float = 0.2
    central_test_size: int = 100


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    """File loaders write Arrow caches: keep them out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def rows(ds):
    return list(zip(ds["prompt"], ds["response"], ds["domain"], strict=True))


def all_client_rows(data, num_clients, seed):
    return [client_data(data, num_clients, i, seed) for i in range(num_clients)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def unique_records(n, domains=("a", "b", "c")):
    return [{"prompt": f"q{i}", "response": f"r{i}", "domain": domains[i % len(domains)]} for i in range(n)]


def domain_shares(ds, domains):
    counts = Counter(ds["domain"])
    return np.array([counts[d] for d in domains]) / max(len(ds), 1)


# --- built-in tasks, central set, pool ---------------------------------------------


def test_builtin_task_loads_generated_examples():
    examples = load_examples(Data(task="units", num_examples=50), seed=3)

    assert examples.column_names == ["prompt", "response", "domain"]
    assert examples.to_list() == generate("units", 50, seed=3)


@pytest.mark.parametrize(
    "partitioner, num_clients",
    [("iid", 7), ("dirichlet", 5), ("pathological", 6), ("natural", 4)],
)
def test_central_and_clients_are_exactly_all_examples(partitioner, num_clients):
    data = Data(num_examples=600, partitioner=partitioner, alpha=1.0)
    everything = Counter(rows(load_examples(data, seed=1)))

    central = central_test_set(data, seed=1)
    clients = all_client_rows(data, num_clients, seed=1)

    assert len(central) == 100
    held_out = Counter(rows(central))
    in_clients: Counter = Counter()
    for c in clients:
        in_clients += Counter(rows(c.train)) + Counter(rows(c.test))
    assert held_out + in_clients <= everything
    # Repeats of a held-out prompt are dropped from the pool, and only they are missing.
    held_prompts = {r[0] for r in held_out}
    assert not any(r[0] in held_prompts for r in in_clients)
    dropped = everything - held_out - in_clients
    assert all(r[0] in held_prompts for r in dropped.elements())


def test_splits_are_disjoint_on_unique_rows(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", unique_records(300))
    data = Data(
        task=path,
        num_examples=0,
        central_test_size=40,
        partitioner="dirichlet",
        alpha=1.0,
    )

    central = set(rows(central_test_set(data, seed=0)))
    seen = set(central)
    for c in all_client_rows(data, 6, seed=0):
        for part in (c.train, c.test):
            assert seen.isdisjoint(rows(part))
            seen |= set(rows(part))
    assert seen == set(rows(load_examples(data, seed=0)))


def test_same_seed_same_partitions_other_seed_different():
    data = Data(num_examples=400, partitioner="dirichlet", alpha=0.5)

    first = client_data(data, 5, 2, seed=4)
    fd._central_and_pool.cache_clear()
    fd._partition_rows.cache_clear()
    again = client_data(data, 5, 2, seed=4)
    other = client_data(data, 5, 2, seed=5)

    assert rows(first.train) == rows(again.train) and rows(first.test) == rows(again.test)
    assert rows(first.train) != rows(other.train)
    assert rows(central_test_set(data, 4)) != rows(central_test_set(data, 5))


def test_another_process_builds_the_same_client_data():
    data = Data(num_examples=300, partitioner="pathological", classes_per_client=2)
    here = client_data(data, 6, 4, seed=2)
    script = (
        "import json, types; from fedsim.data.partitions import client_data;"
        f"d = types.SimpleNamespace(**{data.__dict__!r});"
        "c = client_data(d, 6, 4, seed=2);"
        "print(json.dumps([c.train.to_list(), c.test.to_list()]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}

    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )

    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        here.train.to_list(),
        here.test.to_list(),
    ]


def test_client_datasets_have_the_three_string_columns():
    c = client_data(Data(num_examples=300), 3, 0, seed=0)

    for part in (c.train, c.test):
        assert part.column_names == ["prompt", "response", "domain"]
        assert all(f.dtype == "string" for f in part.features.values())


# --- partitioners ------------------------------------------------------------------


def test_iid_sizes_balanced():
    data = Data(num_examples=1000)
    sizes = partition_sizes(data, 7, seed=0)

    held_prompts = set(central_test_set(data, seed=0)["prompt"])
    pool = [p for p in load_examples(data, seed=0)["prompt"] if p not in held_prompts]
    assert sum(sizes) == len(pool)
    assert max(sizes) - min(sizes) <= 1


def mean_distance_from_global(data, num_clients, seed):
    """Mean total-variation distance between each client's and the pool's domain mix."""
    domains = ("arithmetic", "strings", "units", "sentiment")
    clients = [datasets.concatenate_datasets([c.train, c.test]) for c in all_client_rows(data, num_clients, seed)]
    overall = domain_shares(datasets.concatenate_datasets(clients), domains)
    distances = [0.5 * np.abs(domain_shares(c, domains) - overall).sum() for c in clients]
    return float(np.mean(distances))


def test_dirichlet_small_alpha_skews_domains():
    base = Data(num_examples=1100, test_fraction=0.2)

    iid = mean_distance_from_global(base, 10, seed=0)
    skewed = mean_distance_from_global(replace(base, partitioner="dirichlet", alpha=0.1), 10, seed=0)
    mild = mean_distance_from_global(replace(base, partitioner="dirichlet", alpha=100.0), 10, seed=0)

    assert iid < 0.1
    assert mild < 0.1
    assert skewed > 0.4


def test_dirichlet_that_cannot_be_satisfied_names_the_settings():
    data = Data(num_examples=260, partitioner="dirichlet", alpha=0.01)

    with pytest.raises(ValueError, match=r"dirichlet.*num_clients=60.*`data.alpha`=0.01"):
        partition_sizes(data, 60, seed=0)
    with pytest.raises(ValueError, match=r"at least 2 examples per client"):
        partition_sizes(data, 100, seed=0)


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_pathological_clients_have_at_most_classes_per_client_domains(classes):
    data = Data(num_examples=700, partitioner="pathological", classes_per_client=classes)

    for c in all_client_rows(data, 8, seed=3):
        domains = set(c.train["domain"]) | set(c.test["domain"])
        assert 1 <= len(domains) <= classes


def test_pathological_more_classes_than_domains_is_an_error():
    data = Data(num_examples=300, partitioner="pathological", classes_per_client=5)

    with pytest.raises(
        ValueError,
        match=r"`data.classes_per_client`=5 is more than .* 4 distinct values",
    ):
        client_data(data, 4, 0, seed=0)


def test_natural_gives_one_domain_per_client():
    data = Data(num_examples=400, partitioner="natural")

    domains = [set(c.train["domain"]) | set(c.test["domain"]) for c in all_client_rows(data, 4, seed=0)]

    assert all(len(d) == 1 for d in domains)
    assert set().union(*domains) == {"arithmetic", "strings", "units", "sentiment"}


def test_natural_needs_one_client_per_id():
    with pytest.raises(ValueError, match=r"4 distinct values .*num_clients=3; set num_clients to 4"):
        partition_sizes(Data(num_examples=400, partitioner="natural"), 3, seed=0)


def test_partition_by_response_for_label_skew():
    data = Data(
        task="sentiment",
        num_examples=400,
        partitioner="natural",
        partition_by="response",
    )

    labels = [set(c.train["response"]) for c in all_client_rows(data, 2, seed=0)]

    assert sorted(labels, key=sorted) == [{"negative"}, {"positive"}]


def labelled(n=90):
    return datasets.Dataset.from_dict(
        {
            "_row": list(range(n)),
            "domain": [f"d{i % 3}" for i in range(n * 7 // 9)] + ["d0"] * (n - n * 7 // 9),
        }
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: IidPartitioner(num_partitions=7),
        lambda: DirichletPartitioner(
            num_partitions=4,
            partition_by="domain",
            alpha=0.5,
            min_partition_size=1,
            seed=2,
        ),
        lambda: PathologicalPartitioner(num_partitions=5, partition_by="domain", num_classes_per_partition=2, seed=2),
        lambda: NaturalIdPartitioner(partition_by="domain"),
    ],
    ids=["iid", "dirichlet", "pathological", "natural"],
)
def test_fast_partition_read_matches_load_partition(make):
    fast = make()
    fast.dataset = labelled()
    reference = make()
    reference.dataset = labelled()
    k = reference.num_partitions

    got = fd._read_partitions(fast, k)

    assert [list(r) for r in got] == [reference.load_partition(i)["_row"] for i in range(k)]


# --- per-client train/test split -----------------------------------------------------


def test_train_test_split_rules(tmp_path):
    records = [{"prompt": f"q{i}", "response": "r", "domain": d} for i, d in enumerate("abbcccccdddddddddd")]
    path = write_jsonl(tmp_path / "sizes.jsonl", records)
    data = Data(
        task=path,
        num_examples=0,
        central_test_size=0,
        partitioner="natural",
        test_fraction=0.2,
    )

    sizes = {
        c.train["domain"][0] if len(c.train) else "?": (len(c.train), len(c.test))
        for c in all_client_rows(data, 4, seed=0)
    }
    no_test = all_client_rows(replace(data, test_fraction=0.0), 4, seed=0)

    assert sizes == {"a": (1, 0), "b": (1, 1), "c": (4, 1), "d": (8, 2)}
    assert all(len(c.test) == 0 for c in no_test)


# --- request errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, num_clients, client_id, match",
    [
        ({}, 5, 5, r"client_id 5 is out of range for num_clients=5"),
        ({}, 5, -1, r"client_id -1 is out of range"),
        ({}, 0, 0, r"num_clients must be >= 1"),
        (
            {"partitioner": "shards"},
            5,
            0,
            r"`data.partitioner` must be one of iid, dirichlet, pathological, natural",
        ),
        ({"partitioner": "dirichlet", "alpha": 0.0}, 5, 0, r"`data.alpha` must be > 0"),
        ({"test_fraction": 1.0}, 5, 0, r"`data.test_fraction` must be in \[0, 1\)"),
        (
            {"partitioner": "natural", "partition_by": "user"},
            5,
            0,
            r"`data.partition_by` must be one of prompt",
        ),
        (
            {"central_test_size": 2000},
            5,
            0,
            r"only 0 examples are left for the clients, fewer than num_clients=5: built-in task 'mixed' gave 2000 "
            r"examples .* holds out `data.central_test_size`=2000; at least 2005 are needed",
        ),
        (
            {"num_examples": 103},
            5,
            0,
            r"only 3 examples are left .* fewer than num_clients=5",
        ),
    ],
)
def test_bad_requests_raise_clear_errors(change, num_clients, client_id, match):
    with pytest.raises(ValueError, match=match):
        client_data(replace(Data(), **change), num_clients, client_id, seed=0)


def test_ten_thousand_clients_with_default_data_fail_fast():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"only \d+ examples .* num_clients=10000"):
        client_data(Data(), 10_000, 9_999, seed=0)
    assert time.perf_counter() - start < 2


def test_many_clients_partition_once():
    data = Data(num_examples=5100, partitioner="dirichlet", alpha=1000.0, test_fraction=0.0)
    partition_sizes(data, 1000, seed=0)

    start = time.perf_counter()
    for i in range(0, 1000, 50):
        client_data(data, 1000, i, seed=0)
    assert time.perf_counter() - start < 1.0


# --- user data -----------------------------------------------------------------------


def test_jsonl_with_prompt_response_domain(tmp_path):
    records = unique_records(5) + [
        {"prompt": "  ", "response": "x", "domain": "a"},
        {"prompt": "p", "response": "", "domain": "a"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)

    examples = load_examples(Data(task=path, num_examples=0), seed=0)

    assert examples.to_list() == unique_records(5)


def test_csv_instruction_input_output(tmp_path):
    path = tmp_path / "alpaca.csv"
    pd.DataFrame(
        {
            "instruction": ["Add the numbers", "Say hi", "Name a colour", "Empty"],
            "input": ["2 3", "", "warm", "x"],
            "output": ["5", "hi", "007", ""],
        }
    ).to_csv(path, index=False)

    examples = load_examples(Data(task=str(path), num_examples=0), seed=0)

    assert examples.to_list() == [
        {"prompt": "Add the numbers\n2 3", "response": "5", "domain": "default"},
        {"prompt": "Say hi", "response": "hi", "domain": "default"},
        {"prompt": "Name a colour\nwarm", "response": "007", "domain": "default"},
    ]


def test_parquet_with_named_fields_and_cap(tmp_path):
    path = tmp_path / "d.parquet"
    frame = pd.DataFrame(
        {
            "q": [f"q{i}" for i in range(50)],
            "a": list(range(50)),
            "topic": ["x", "y"] * 25,
        }
    )
    frame.to_parquet(path)
    data = Data(
        task=str(path),
        num_examples=20,
        prompt_field="q",
        response_field="a",
        domain_field="topic",
    )

    examples = load_examples(data, seed=1)

    assert len(examples) == 20
    assert examples.to_list() == load_examples(data, seed=1).to_list()
    indices = [int(p[1:]) for p in examples["prompt"]]
    assert indices == sorted(indices)  # a sample, kept in file order
    assert all(r == str(i) and d == "xy"[i % 2] for i, r, d in zip(indices, examples["response"], examples["domain"]))
    assert examples["prompt"] != load_examples(data, seed=2)["prompt"]


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))

    examples = load_examples(Data(task=str(path), num_examples=0), seed=0)

    assert rows(examples) == [("a", "b", "default"), ("c", "d", "default")]


def test_missing_fields_name_the_file_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])

    with pytest.raises(ValueError) as error:
        load_examples(Data(task=path), seed=0)

    message = str(error.value)
    assert path in message
    assert "no prompt field" in message and "`data.prompt_field`" in message
    assert "no response field" in message and "`data.response_field`" in message
    assert "columns found: question, answer" in message


def test_explicit_field_that_is_not_a_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", unique_records(3))

    with pytest.raises(
        ValueError,
        match=r"`data.domain_field`='topic' is not a column; columns found: prompt, response, domain",
    ):
        load_examples(Data(task=path, domain_field="topic"), seed=0)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_examples(Data(task=str(tmp_path / "nope.jsonl")), seed=0)


def test_edited_file_is_reloaded(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, unique_records(30))
    data = Data(task=str(path), num_examples=0, central_test_size=10)
    before = partition_sizes(data, 2, seed=0)

    write_jsonl(path, unique_records(50))

    assert before == [10, 10]
    assert partition_sizes(data, 2, seed=0) == [20, 20]


def test_hub_source_loads_the_named_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"instruction": ["i"], "input": ["x"], "output": ["o"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    examples = load_examples(Data(task="hf:org/set:validation", num_examples=0), seed=0)
    load_examples(Data(task="hf:org/set", num_examples=0), seed=0)

    assert calls == [("org/set", "validation"), ("org/set", "train")]
    assert rows(examples) == [("i\nx", "o", "default")]


def test_hub_source_offline_says_it_needs_network(monkeypatch):
    def offline(name, split):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)

    with pytest.raises(ValueError, match=r"'org/set'.*no route to host.*network access or a local copy"):
        load_examples(Data(task="hf:org/set"), seed=0)


def cache_hub_dataset(cache, name, records):
    """Put `records` in the datasets cache as the hub dataset `name` ("org/set") is after one
    online load: <cache>/org___set/default/0.0.0/<hash>/ with its Arrow file and info."""
    source = write_jsonl(Path(cache).parent / "hub-source.jsonl", records)
    datasets.load_dataset("json", data_files=source, split="train")  # builds a cache entry to copy
    built = next((Path(cache) / "json").glob("*/*/*"))
    org, dataset = name.split("/")
    target = Path(cache) / f"{org}___{dataset}" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json", dataset, 1))
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "dataset_name": dataset}))


def test_hub_source_in_the_cache_loads_offline_first(monkeypatch):
    cache_hub_dataset(datasets.config.HF_DATASETS_CACHE, "org/cached", unique_records(5))
    real, offline = datasets.load_dataset, []

    def spy(*args, **kwargs):
        offline.append(datasets.config.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)

    examples = load_examples(Data(task="hf:org/cached", num_examples=0), seed=0)

    assert examples.to_list() == unique_records(5)
    assert offline == [True]  # the hub was never asked


def test_hub_source_not_in_the_cache_with_offline_mode_on(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would

    with pytest.raises(ValueError) as error:
        load_examples(Data(task="hf:org/absent"), seed=0)

    message = str(error.value)
    assert "Hugging Face dataset 'org/absent' is not in the local cache" in message
    assert datasets.config.HF_DATASETS_CACHE in message and "offline mode is on (HF_HUB_OFFLINE)" in message
    assert not datasets.config.HF_HUB_OFFLINE  # the switch is put back


def test_hub_source_cached_without_the_split(monkeypatch):
    cache_hub_dataset(datasets.config.HF_DATASETS_CACHE, "org/cached", unique_records(5))

    with pytest.raises(ValueError, match=r"'org/cached' \(split 'validation'\): ValueError: Unknown split"):
        load_examples(Data(task="hf:org/cached:validation"), seed=0)


def test_garbled_csv_rows_name_the_file_and_the_reader_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,response\na,b\n"c,d\ne,f\n')

    with pytest.raises(ValueError, match=r"could not read .*d\.csv as CSV: ParserError: .*EOF inside string"):
        load_examples(Data(task=str(path)), seed=0)


def test_garbled_parquet_names_the_file_and_the_reader_error(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["p"] * 50, "response": ["r"] * 50}).to_parquet(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:4] + b"x" * 40 + whole[-8:])  # the magic bytes, a footer, nothing it points to

    with pytest.raises(ValueError, match=r"could not read .*d\.parquet as Parquet: ArrowInvalid"):
        load_examples(Data(task=str(path)), seed=0)


def test_too_few_usable_rows_are_counted(tmp_path):
    records = unique_records(12) + [{"prompt": "", "response": "r"}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = Data(task=path, num_examples=0, central_test_size=10)

    with pytest.raises(ValueError) as error:
        partition_sizes(data, 4, seed=0)

    assert str(error.value) == (
        f"only 2 examples are left for the clients, fewer than num_clients=4: {path} gave 12 usable examples "
        "(rows with a non-empty prompt and response), the server holds out `data.central_test_size`=10; at least "
        "14 are needed (10 held out + one per client): add examples, or lower `data.central_test_size` or the "
        "number of clients"
    )
    with pytest.raises(ValueError, match=r"only 0 examples are left for the clients: .* at least 21 are needed"):
        central_test_set(replace(data, central_test_size=20), seed=0)


@pytest.mark.parametrize(
    "task, expected",
    [
        ("arithmetic", None),
        ("mixed", None),
        ("hf:tatsu-lab/alpaca", None),
        ("hf:tatsu-lab/alpaca:train", None),
        ("hf:", "'hf:' needs a dataset name"),
        (
            "arithmatic",
            "unknown task 'arithmatic'; known: arithmetic, strings, units, sentiment, mixed; or a "
            ".jsonl/.json/.csv/.parquet path, or hf:<dataset> (did you mean 'arithmetic'?)",
        ),
        ("poetry", "unknown task 'poetry'"),
        ("{tmp}/here.jsonl", None),
        ("{tmp}/gone.csv", "file not found: {tmp}/gone.csv"),
        ("{tmp}/notes.txt", "unsupported file type '.txt'"),
    ],
)
def test_check_data_source(tmp_path, task, expected):
    (tmp_path / "here.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("hi\n")

    message = check_data_source(task.format(tmp=tmp_path))

    if expected is None:
        assert message is None
    else:
        assert message is not None and expected.format(tmp=tmp_path) in message
