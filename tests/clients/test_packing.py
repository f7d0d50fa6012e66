"""The ClientApp's packed path (clients/packing.py): the pack server, the ClientApp that trains in
its pack without loading the base model, and whole federations (in process, and on Flower's Ray
engine), packed (`simulation.packing = "on"`) against unpacked with the same seed.

Tolerance: a packed update equals the solo one to float rounding (tests/fedsim/model/test_packed.py);
over a few rounds the metrics then agree to LOSS_RTOL relative. Packs of one run `train_lora`'s very
operations: their metrics are equal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from tests_support.inprocess import HANDLERS, InProcessGrid
from tests_support.packing_probe import PROBE_DIR
from tests_support.packing_probe import app as probe_app

from clients import app as clientapp
from clients import packing
from clients.packing import PackServer, TrainerSpec, alone_reason, meta_model, server_name, train_in_pack, zero_state
from fedsim.config.scenario import LoraConfig, ModelConfig, load_scenario
from fedsim.data.tasks import generate
from fedsim.fleet.costs import ModelShape
from fedsim.model.adapter import attach_lora, get_state, use_rank
from fedsim.model.loader import load_model
from fedsim.model.packed import PackedTrainer
from fedsim.model.packed_jobs import JobResult, PackedJob
from fedsim.model.rowlora import target_linears
from fedsim.protocol import CONFIG_RECORD, PACK_ID
from fedsim.results.rundir import RunDir, read_metrics
from fedsim.server.federation import run_federation

ROOT = Path(__file__).resolve().parents[2]
TINY, MIXED = ROOT / "scenarios" / "tiny.toml", ROOT / "scenarios" / "tiny-mixed-rank.toml"
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
SPEC = TrainerSpec(ModelConfig(name="tiny-llama"), LORA.target_modules, "cpu", 1, 0)
LOSS_RTOL = 1e-4
BEYOND = (os.cpu_count() or 1) + 5  # messages Flower's Simulation Runtime runs at once by default, plus one


def job(key: int, rank: int = 4, **changes: Any) -> PackedJob:
    """A seeded job on the tiny model's q_proj and v_proj."""
    base = load_model("tiny-llama")[0]
    linears = {f"base_model.model.{n}": m for n, m in base.named_modules() if n.endswith(LORA.target_modules)}
    gen = torch.Generator().manual_seed(key)
    state = {}
    for prefix, m in linears.items():
        state[prefix + ".lora_A.weight"] = 0.1 * torch.randn(rank, m.in_features, generator=gen)
        state[prefix + ".lora_B.weight"] = 0.1 * torch.randn(m.out_features, rank, generator=gen)
    fields = dict(key=key, state=state, scale=LORA.alpha / rank, examples=generate("sentiment", 12, seed=key),
                  steps=3, batch_size=4, max_len=40, lr=1e-2, weight_decay=0.0, grad_clip=1.0, seed=key)  # fmt: skip
    return PackedJob(**{**fields, **changes})


def submit_all(
    server: PackServer,
    pack: str,
    jobs: Sequence[PackedJob | None],
    keys: list[int],
    timeout_s: float = 60,
    size: int | None = None,
) -> dict[int, Any]:
    """Each job from its own thread, as the ClientApps of a pack of `size` (default: every job)
    submit them; results by key."""
    out: dict[int, JobResult | None] = {}

    def one(key: int, j: PackedJob | None) -> None:
        out[key] = server.train(pack, size or len(jobs), key, j, SPEC, timeout_s)

    threads = [threading.Thread(target=one, args=(k, j)) for k, j in zip(keys, jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_pack_trains_together_as_the_trainer_does_whatever_order_clients_come_in() -> None:
    jobs = [job(0), job(1, 2), job(2, 1)]
    base, tokenizer = load_model("tiny-llama")
    reference = PackedTrainer(base, tokenizer, target_modules=LORA.target_modules, device="cpu").train(jobs)
    server = PackServer()
    results = submit_all(server, "run/0/r1-p0", jobs[::-1], [2, 1, 0])
    for ref in reference:
        got = results[ref.key]
        assert got is not None and got.error is None
        assert same_state(got.unwrap()[1], ref.unwrap()[1])
        result, ref_result = got.unwrap()[0], ref.unwrap()[0]
        assert dataclasses.replace(result, wall_time_s=0) == dataclasses.replace(ref_result, wall_time_s=0)
    assert server.trained() == {"run/0/r1-p0": [0, 1, 2]}


def test_a_failing_job_fails_only_its_client() -> None:
    nan = {k: torch.full_like(v, float("nan")) for k, v in job(1).state.items()}
    results = submit_all(PackServer(), "p", [job(0), job(1, state=nan), job(2)], [0, 1, 2])
    assert "non-finite" in str(results[1].error)
    assert results[0].error is None and results[2].error is None


def test_a_client_that_trains_alone_does_not_hold_its_pack() -> None:
    server = PackServer()
    results = submit_all(server, "p", [job(0), None, job(2)], [0, 1, 2])
    assert results[1] is None and results[0].error is None and results[2].error is None
    assert server.trained() == {"p": [0, 2]}


@pytest.mark.parametrize("in_time", [[0, 1], [2, 0], [1]], ids=["0 and 1 in time", "2 and 0", "1 alone"])
def test_a_cut_pack_trains_each_client_alone_whichever_came_in_time(in_time: list[int]) -> None:
    jobs = {k: job(k, rank=4 - k) for k in range(3)}
    base, tokenizer = load_model("tiny-llama")
    alone = PackedTrainer(base, tokenizer, target_modules=LORA.target_modules, device="cpu", max_clients_per_step=1)
    reference = {r.key: r.unwrap() for r in alone.train(list(jobs.values()))}
    server = PackServer()
    results = submit_all(server, "p", [jobs[k] for k in in_time], in_time, timeout_s=0.5, size=3)  # cut: 3rd missing
    results |= {k: server.train("p", 3, k, jobs[k], SPEC, 0.5) for k in jobs if k not in in_time}  # late: at once
    for k, (result, state) in reference.items():
        got_result, got_state = results[k].unwrap()
        assert same_state(got_state, state)  # bit for bit the job trained alone, whoever came in time
        assert dataclasses.replace(got_result, wall_time_s=0) == dataclasses.replace(result, wall_time_s=0)
    assert server.trained() == {f"p+{k}": [k] for k in jobs}


def test_a_message_without_a_pack_trains_alone() -> None:
    scenario = load_scenario(TINY)
    meta = meta_model(scenario.model, scenario.lora, 8)
    assert train_in_pack(meta, {}, ConfigRecord({}), scenario, 1, [], 0, 8, None, {}) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "targets", "rank"),
    [("float32", ("q_proj", "v_proj"), 8), ("bfloat16", ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), 2)],
)
def test_the_meta_model_lays_out_the_adapter_as_the_loaded_model(
    dtype: str, targets: tuple[str, ...], rank: int
) -> None:
    lora = LoraConfig(rank=8, alpha=16.0, target_modules=targets)
    loaded = attach_lora(load_model("tiny-llama", dtype=dtype)[0], lora, seed=0)
    use_rank(loaded, lora, rank)
    meta = meta_model(ModelConfig(name="tiny-llama", dtype=dtype), lora, rank)  # type: ignore[arg-type]
    layout, expected = zero_state(meta), get_state(loaded)
    assert list(layout) == list(expected)  # get_state's keys, in its order
    assert all(layout[k].shape == v.shape and layout[k].dtype == torch.float32 for k, v in expected.items())
    assert ModelShape.from_model(meta) == ModelShape.from_model(loaded)
    assert {p.device.type for p in meta.parameters()} == {"meta"}  # no weights


@pytest.mark.parametrize(("dtype", "reason"), [("float32", None), ("bfloat16", "half-precision base")])
def test_base_deltas_on_a_half_precision_base_train_alone(dtype: str, reason: str | None) -> None:
    meta = meta_model(ModelConfig(name="tiny-llama", dtype=dtype), LORA, 4)  # type: ignore[arg-type]
    deltas = {f"{p}.base_delta": torch.zeros(m.out_features, m.in_features) for p, m in target_linears(meta).items()}
    plain = job(0)
    got = alone_reason(meta, dataclasses.replace(plain, state={**plain.state, **deltas}), pruned=False)
    assert got is None if reason is None else reason in str(got)
    assert alone_reason(meta, plain, pruned=False) is None  # without deltas a half-precision base packs


# --- whole federations in this process: the ClientApp never loads the base model --------------


@pytest.fixture
def local_pack_server(monkeypatch: pytest.MonkeyPatch) -> PackServer:
    """The run's PackServer in this process: `ray.get(handle.train.remote(...))` calls it directly."""
    import ray

    server = PackServer()
    handle = SimpleNamespace(train=SimpleNamespace(remote=server.train))
    monkeypatch.setattr(packing, "_server", lambda run_id, device: handle)
    monkeypatch.setattr(ray, "get", lambda value: value)
    return server


def inprocess(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch, overrides: list[str]
) -> tuple[pd.DataFrame, list[tuple[bool, int]]]:
    """(metrics, per train message: (it named a pack, the times its handler asked for the base
    model)) of a 2-round run on the in-process grid, in packs of one (the grid runs one message at
    a time)."""
    scenario = load_scenario(
        TINY, ["rounds=2", f'simulation.packing="{mode}"', "simulation.max_clients_per_step=1", *overrides]
    )
    asks: list[tuple[Any, ...]] = []
    cached = clientapp._model

    def counted(*key: Any) -> Any:
        asks.append(key)
        return cached(*key)

    monkeypatch.setattr(clientapp, "_model", counted)
    seen: list[tuple[bool, int]] = []

    def train(msg: Message, context: Context) -> Message:
        before = len(asks)
        reply = clientapp.train(msg, context)
        seen.append((PACK_ID in msg.content.config_records[CONFIG_RECORD], len(asks) - before))
        return reply

    monkeypatch.setitem(HANDLERS, "train", train)
    run_dir = RunDir.create(tmp_path / mode, scenario)
    run_federation(InProcessGrid(scenario), scenario, run_dir, assign_clients=True)  # type: ignore[arg-type]
    return read_metrics(run_dir.path), seen


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    "overrides",
    [[], ["strategy.name='fedsa_lora'"], ["compression.downlink=true", "clients.per_round=4"]],
    ids=["fedit", "own B (fedsa_lora)", "compressed downlink"],
)
def test_a_packed_client_loads_no_model_and_trains_as_an_unpacked_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_pack_server: PackServer, overrides: list[str]
) -> None:
    unpacked, off = inprocess(tmp_path, "off", monkeypatch, overrides)
    packed, on = inprocess(tmp_path, "on", monkeypatch, overrides)
    assert off and all(not named and asks > 0 for named, asks in off)
    assert len(on) == len(off) and all(named and asks == 0 for named, asks in on)  # no base model on the node
    assert sorted(local_pack_server.trained()) == sorted(f"tiny/0/r{r}-p{k}" for r, k in _packs(packed))
    assert_same_metrics(unpacked, packed, rtol=0.0)  # packs of one: train_lora's very operations


def _packs(metrics: pd.DataFrame) -> list[tuple[int, int]]:
    """(round, k) of each pack of one: the k-th trained client of its round, in client-id order."""
    train = metrics[metrics["kind"] == "train"].sort_values(["round", "client_id"])
    return [(int(r), k) for r, group in train.groupby("round") for k in range(len(group))]


# --- whole federations on Flower's Ray engine ------------------------------------------------


def federation(
    tmp_path: Path, scenario_file: Path, packing: str, *overrides: str
) -> tuple[pd.DataFrame, dict, list[dict]]:
    """(metrics, packs the run's pack server trained, the probe's line per train message:
    `tests_support.packing_probe`) of a 2-round run."""
    import ray

    from fedsim.runtime.simulation import run_simulation

    scenario = load_scenario(scenario_file, ["rounds=2", f'simulation.packing="{packing}"', *overrides])
    trained: dict[str, list[int]] = {}

    def progress(summary: dict) -> None:  # the pack server is up while the run is
        if not ray.is_initialized():  # round 0 (central evaluation) may come before Flower starts Ray
            return
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(server_name(0).rsplit("-", 1)[0]):
                trained.update(ray.get(ray.get_actor(**actor).trained.remote()))

    run_dir, probe = RunDir.create(tmp_path / packing, scenario), tmp_path / f"probe-{packing}"
    probe.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv(PROBE_DIR, str(probe))  # Ray's workers inherit it
        run_simulation(scenario, run_dir, progress=progress, client_app=probe_app)
    lines = [json.loads(line) for f in sorted(probe.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return read_metrics(run_dir.path), trained, lines


def assert_same_metrics(a: pd.DataFrame, b: pd.DataFrame, rtol: float = LOSS_RTOL) -> None:
    assert a[["round", "client_id", "kind", "status"]].equals(b[["round", "client_id", "kind", "status"]])
    for column in ("loss", "loss_before", "loss_after", "accuracy", "tokens", "flops", "sim_time_s"):
        if column in a:
            x, y = a[column].to_numpy(float), b[column].to_numpy(float)
            assert np.allclose(x, y, rtol=rtol, atol=0, equal_nan=True), column


@pytest.mark.parametrize(
    ("scenario_file", "overrides", "expected"),
    [
        (TINY, ["simulation.max_clients_per_step=2"], {"tiny/0/r1-p0": [0, 1], "tiny/0/r2-p0": [1, 3]}),
        (MIXED, ["simulation.max_clients_per_step=2"], {"tiny-mixed-rank/0/r1-p0": [0, 1],
                                                         "tiny-mixed-rank/0/r1-p1": [2],
                                                         "tiny-mixed-rank/0/r2-p0": [0, 1],
                                                         "tiny-mixed-rank/0/r2-p1": [4]}),
        (TINY, ["pruning.ratio=0.25", "pruning.interval_steps=4"], {}),  # pruned: every client alone
        (TINY, [f"clients.num_clients={BEYOND}", f"clients.per_round={BEYOND}", f"data.num_examples={40 * BEYOND}",
                f"simulation.max_clients_per_step={BEYOND}", "clients.eval_per_round=0",
                "simulation.pack_timeout_s=120"],
         {"tiny/0/r1-p0": list(range(BEYOND)), "tiny/0/r2-p0": list(range(BEYOND))}),  # none cut: all at once
    ],
    ids=["tiny", "mixed ranks", "pruned", "a pack larger than Flower's default executor"],
)  # fmt: skip
def test_same_seed_same_metrics_packed_or_not(
    tmp_path: Path, scenario_file: Path, overrides: list[str], expected: dict
) -> None:
    unpacked, none, _ = federation(tmp_path, scenario_file, "off", *overrides)
    packed, trained, probed = federation(tmp_path, scenario_file, "on", *overrides)
    assert none == {}
    assert {k: v for k, v in trained.items()} == expected
    assert (packed["status"] == "ok").all()
    assert_same_metrics(unpacked, packed)
    trains = len(packed[packed["kind"] == "train"])
    assert len(probed) == trains and all(line["packed"] == bool(expected) for line in probed)
    if expected:  # every ClientApp handed its job to the pack server without asking for the base model
        assert all(line["model_asks"] == 0 for line in probed)
