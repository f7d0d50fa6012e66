"""The ClientApp's packed path (clients/packing.py): the pack server, and whole federations on
Flower's Ray engine, packed (`simulation.packing = "on"`) against unpacked with the same seed.

Tolerance: a packed update equals the solo one to float rounding (tests/fedsim/model/test_packed.py);
over a few rounds the metrics then agree to LOSS_RTOL relative.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from clients.packing import PackServer, TrainerSpec, client_resources, server_name, train_in_pack
from fedsim.config.scenario import LoraConfig, ModelConfig, load_scenario
from fedsim.data.tasks import generate
from fedsim.model.loader import load_model
from fedsim.model.packed import PackedTrainer
from fedsim.model.packed_jobs import JobResult, PackedJob

ROOT = Path(__file__).resolve().parents[2]
TINY, MIXED = ROOT / "scenarios" / "tiny.toml", ROOT / "scenarios" / "tiny-mixed-rank.toml"
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
SPEC = TrainerSpec(ModelConfig(name="tiny-llama"), LORA.target_modules, "cpu", 1, 0)
LOSS_RTOL = 1e-4


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
    server: PackServer, pack: str, jobs: Sequence[PackedJob | None], keys: list[int], timeout_s: float = 60
) -> dict[int, Any]:
    """Each job from its own thread, as the pack's ClientApps submit them; results by key."""
    out: dict[int, JobResult | None] = {}

    def one(key: int, j: PackedJob | None) -> None:
        out[key] = server.train(pack, len(jobs), key, j, SPEC, timeout_s)

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


def test_a_pack_missing_a_client_trains_the_others_after_its_timeout() -> None:
    server = PackServer()
    result = server.train("p", 2, 0, job(0), SPEC, 0.5)  # its partner never comes
    assert result is not None and result.error is None
    late = server.train("p", 2, 1, job(1), SPEC, 0.5)  # it came after: trained alone, at once
    assert late is not None and late.error is None
    assert server.trained() == {"p": [0], "p+1": [1]}


def test_client_resources_let_a_whole_round_run_at_once() -> None:
    assert client_resources(2, 2, 1.0) == {"num_cpus": 1.0, "num_gpus": 0.0}
    share = client_resources(2, 3, 1.0)["num_cpus"]
    assert int(2 / share) >= 3 and share <= 2 / 3
    assert client_resources(16, 4, 1.0)["num_cpus"] == 1.0  # at most the scenario's share
    with pytest.raises(ValueError, match="needs 1000 ClientApps at once"):
        client_resources(2, 1000, 1.0)


def test_a_message_without_a_pack_trains_alone() -> None:
    from flwr.app import ConfigRecord

    assert train_in_pack(None, {}, ConfigRecord({}), load_scenario(TINY), 1, [], 0, 4, None) is None  # type: ignore[arg-type]


# --- whole federations on Flower's Ray engine ------------------------------------------------


def federation(tmp_path: Path, scenario_file: Path, packing: str, *overrides: str) -> tuple[pd.DataFrame, dict]:
    """(metrics, packs the run's pack server trained) of a 2-round run."""
    import ray

    from fedsim.results.rundir import RunDir, read_metrics
    from fedsim.runtime.simulation import run_simulation

    scenario = load_scenario(scenario_file, ["rounds=2", f'simulation.packing="{packing}"', *overrides])
    trained: dict[str, list[int]] = {}

    def progress(summary: dict) -> None:  # the pack server is up while the run is
        if not ray.is_initialized():  # round 0 (central evaluation) may come before Flower starts Ray
            return
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(server_name(0).rsplit("-", 1)[0]):
                trained.update(ray.get(ray.get_actor(**actor).trained.remote()))

    run_dir = RunDir.create(tmp_path / packing, scenario)
    run_simulation(scenario, run_dir, progress=progress)
    return read_metrics(run_dir.path), trained


def assert_same_metrics(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert a[["round", "client_id", "kind", "status"]].equals(b[["round", "client_id", "kind", "status"]])
    for column in ("loss", "loss_before", "loss_after", "accuracy", "tokens", "flops", "sim_time_s"):
        if column in a:
            x, y = a[column].to_numpy(float), b[column].to_numpy(float)
            assert np.allclose(x, y, rtol=LOSS_RTOL, atol=0, equal_nan=True), column


@pytest.mark.parametrize(
    ("scenario_file", "overrides", "expected"),
    [
        (TINY, ["simulation.max_clients_per_step=2"], {"tiny/0/r1-p0": [0, 1], "tiny/0/r2-p0": [1, 3]}),
        (MIXED, ["simulation.max_clients_per_step=2"], {"tiny-mixed-rank/0/r1-p0": [0, 1],
                                                         "tiny-mixed-rank/0/r1-p1": [2],
                                                         "tiny-mixed-rank/0/r2-p0": [0, 1],
                                                         "tiny-mixed-rank/0/r2-p1": [4]}),
        (TINY, ["pruning.ratio=0.25", "pruning.interval_steps=4"], {}),  # pruned: every client alone
    ],
    ids=["tiny", "mixed ranks", "pruned"],
)  # fmt: skip
def test_same_seed_same_metrics_packed_or_not(
    tmp_path: Path, scenario_file: Path, overrides: list[str], expected: dict
) -> None:
    unpacked, none = federation(tmp_path, scenario_file, "off", *overrides)
    packed, trained = federation(tmp_path, scenario_file, "on", *overrides)
    assert none == {}
    assert {k: v for k, v in trained.items()} == expected
    assert (packed["status"] == "ok").all()
    assert_same_metrics(unpacked, packed)
