"""The server's packs (fedsim/server/packs.py) and the scenario's packing settings: what packs,
what `packing = "on"` refuses before the run (exit 2), and the ClientApps' Ray resources."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tests_support.grids import NodesOnly
from tests_support.messages import train_reply

from fedsim.cli import main
from fedsim.config.errors import EXIT_BAD_INPUT
from fedsim.config.names import ASYNC_STRATEGIES
from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.model.adapter import BASE_DELTA, from_record
from fedsim.protocol import CLIENT_ID, CONFIG_RECORD, PACK_ID, PACK_MEMORY, PACK_SIZE, PACK_TIMEOUT_S, SCENARIO
from fedsim.server import packs as packs_module
from fedsim.server.packs import (
    BASE_MERGING,
    MIN_CPU_SHARE,
    client_resources,
    clientapps_at_once,
    cpu_share,
    packing_on,
    packing_problems,
    packs,
    with_packs,
)
from strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"


@pytest.fixture(autouse=True)
def run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built as in a running ServerApp, which knows its run."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def messages(cids: list[int], named: bool = True) -> list[Message]:
    """Train messages to nodes 100 + cid, each naming its client (as `rounds._named` does)."""
    out = []
    for cid in cids:
        config: dict[str, Any] = {SCENARIO: "{}", **({CLIENT_ID: cid} if named else {})}
        out.append(Message(RecordDict({CONFIG_RECORD: ConfigRecord(config)}), 100 + cid, "train"))
    return out


def pack_of(m: Message) -> tuple[int, str, int]:
    config = m.content.config_records[CONFIG_RECORD]
    return int(config[CLIENT_ID]), str(config[PACK_ID]), int(config[PACK_SIZE])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cids", "size", "expected"),
    [
        ([3, 1, 2], 16, [[1, 2, 3]]),
        ([9, 0, 4, 7, 2], 2, [[0, 2], [4, 7], [9]]),
        ([5], 1, [[5]]),
        ([], 4, []),
    ],
)
def test_packs_are_consecutive_chunks_in_client_id_order(cids: list[int], size: int, expected: list[list[int]]) -> None:
    assert packs(cids, size) == expected


def test_with_packs_names_each_clients_pack_whatever_the_order_messages_come_in() -> None:
    scenario = load_scenario(
        TINY, ['simulation.packing="on"', "simulation.max_clients_per_step=3", "simulation.pack_memory_gib=0.5"]
    )
    cids = [7, 2, 0, 5, 3, 1, 6]
    first = sorted(pack_of(m) for m in with_packs(scenario, messages(cids), 4))
    shuffled = cids[:]
    random.Random(0).shuffle(shuffled)
    again = sorted(pack_of(m) for m in with_packs(scenario, messages(shuffled), 4))
    assert first == again == [
        (0, "r4-p0", 3), (1, "r4-p0", 3), (2, "r4-p0", 3),
        (3, "r4-p1", 3), (5, "r4-p1", 3), (6, "r4-p1", 3),
        (7, "r4-p2", 1),
    ]  # fmt: skip
    config = with_packs(scenario, messages([0]), 1)[0].content.config_records[CONFIG_RECORD]
    assert (config[PACK_MEMORY], config[PACK_TIMEOUT_S]) == (2**29, 300.0)
    assert all(m.metadata.dst_node_id == 100 + pack_of(m)[0] for m in with_packs(scenario, messages(cids), 4))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (['simulation.packing="off"'], True),
        (["simulation.packing='auto'", "train.device='cpu'"], True),  # auto on a CPU: off
        (['simulation.packing="on"', "pruning.ratio=0.25"], True),  # pruned clients train alone
        (['simulation.packing="on"'], False),  # a deployment: the messages name no client
    ],
    ids=["off", "auto on a CPU", "pruned", "deployment"],
)
def test_no_packs(overrides: list[str], named: bool) -> None:
    scenario = load_scenario(TINY, overrides)
    sent = messages([0, 1, 2], named)
    out = with_packs(scenario, sent, 1)
    assert out == sent
    assert all(PACK_ID not in m.content.config_records[CONFIG_RECORD] for m in out)


@pytest.mark.parametrize(
    ("overrides", "gpu", "on"),
    [
        ([], False, False),
        ([], True, True),
        (["lora.dropout=0.1"], True, False),
        (["simulation.num_gpus_per_client=0.5"], True, False),
        (["train.device='cpu'"], True, False),
        (['simulation.packing="on"'], False, True),
        (['simulation.packing="off"'], True, False),
        (['simulation.packing="on"', "pruning.ratio=0.25"], True, False),
        (["strategy.name='afa_cd'"], True, False),  # asynchronous: devices join a few at a time
    ],
)
def test_packing_on(overrides: list[str], gpu: bool, on: bool) -> None:
    assert packing_on(load_scenario(TINY, overrides), gpu_visible=gpu) is on


def test_clientapps_at_once_is_a_rounds_train_messages() -> None:
    assert clientapps_at_once(load_scenario(TINY)) == 2
    assert clientapps_at_once(load_scenario(TINY, ["fleet.overcommit=0.5", "clients.per_round=3"])) == 4
    assert clientapps_at_once(load_scenario(TINY, ["clients.per_round=4", "fleet.overcommit=1.0"])) == 4


def test_packing_settings_never_travel() -> None:
    """The scenario in every message is the same, packing or not (its bytes are on the clock)."""
    plain = load_scenario(TINY)
    packed = load_scenario(TINY, ['simulation.packing="on"', "simulation.max_clients_per_step=2"])
    assert packed.to_json() == plain.to_json()
    assert "packing" not in json.loads(plain.to_json())["simulation"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["lora.dropout=0.1"], "`lora.dropout` = 0.1"),
        (["simulation.num_gpus_per_client=0.25"], "`simulation.num_gpus_per_client` = 0.25"),
        (["simulation.ray_address='auto'"], "`simulation.ray_address`"),
    ],
    ids=["dropout", "GPU shares: not all at once", "existing cluster"],
)
def test_packing_on_refuses_what_it_cannot_serve_before_the_run(
    overrides: list[str], words: str, tmp_path: Path
) -> None:
    with pytest.raises(ScenarioError, match="simulation.packing") as err:
        load_scenario(TINY, ['simulation.packing="on"', *overrides])
    assert words in str(err.value)
    load_scenario(TINY, ['simulation.packing="auto"', *overrides])  # auto: packing off, no refusal
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(TINY), "--out", str(tmp_path), "--set", 'simulation.packing="on"',
                     *[a for o in overrides for a in ("--set", o)]])  # fmt: skip
    assert code == EXIT_BAD_INPUT and words in stderr.getvalue()
    assert not any(tmp_path.iterdir())


def run_cli(tmp_path: Path, overrides: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `fedsim run` on the tiny scenario with `overrides`."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(TINY), "--out", str(tmp_path), *[a for o in overrides for a in ("--set", o)]])
    return code, stderr.getvalue()


def crowd(cpus: int) -> list[str]:
    """Overrides giving a round more ClientApps than `cpus` CPUs host at `MIN_CPU_SHARE` each."""
    n = int(cpus / MIN_CPU_SHARE) + 1
    return [f"clients.num_clients={n}", f"clients.per_round={n}", f"data.num_examples={20 * n}"]


def test_a_round_too_large_for_this_machine_is_refused_before_the_run(tmp_path: Path) -> None:
    code, err = run_cli(tmp_path, ['simulation.packing="on"', *crowd(os.cpu_count() or 1)])
    assert code == EXIT_BAD_INPUT
    assert "ClientApps of a round at once" in err and "lower clients.per_round" in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("overrides", "cpus", "problem"),
    [
        (crowd(2), 2, "ClientApps of a round at once"),
        (crowd(2), 4, None),
        (["model.dtype='bfloat16'", "strategy.name='flora'"], 2, "half-precision base"),
        (["model.dtype='float16'", "strategy.name='fedex_lora'"], 2, "half-precision base"),
        (["model.dtype='bfloat16'"], 2, None),  # no base deltas: the packed trainer serves half precision
        (["strategy.name='flora'"], 2, None),  # float32 base deltas pack
    ],
    ids=["crowded", "fits on 4 CPUs", "flora bf16", "fedex_lora fp16", "fedit bf16", "flora fp32"],
)
def test_packing_problems(overrides: list[str], cpus: int, problem: str | None) -> None:
    on = load_scenario(TINY, ['simulation.packing="on"', *overrides])
    found = packing_problems(on, cpus=cpus)
    assert (found == []) if problem is None else (len(found) == 1 and problem in found[0])
    assert packing_problems(load_scenario(TINY, ['simulation.packing="auto"', *overrides]), cpus=cpus) == []


def test_half_precision_base_deltas_are_refused_before_the_run(tmp_path: Path) -> None:
    code, err = run_cli(tmp_path, ['simulation.packing="on"', "model.dtype='bfloat16'", "strategy.name='flora'"])
    assert code == EXIT_BAD_INPUT
    assert "`simulation.packing` = 'on' cannot pack this run" in err and "`model.dtype` = 'bfloat16'" in err
    assert not any(tmp_path.iterdir())


def test_auto_trains_half_precision_base_deltas_alone_and_says_why_once(caplog: pytest.LogCaptureFixture) -> None:
    scenario = load_scenario(TINY, ["simulation.packing='auto'", "model.dtype='bfloat16'", "strategy.name='flora'"])
    assert not packing_on(scenario, gpu_visible=True)
    packs_module._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=packs_module.__name__):
        for server_round in (1, 2):
            sent = messages([0, 1])
            assert with_packs(scenario, sent, server_round) == sent
    said = [r.getMessage() for r in caplog.records if "half-precision base" in r.getMessage()]
    assert len(said) == 1 and "they train alone" in said[0]


def test_auto_does_not_pack_a_round_too_large_for_the_machine() -> None:
    assert packing_on(load_scenario(TINY, crowd(4)), gpu_visible=True, cpus=4) is False
    assert packing_on(load_scenario(TINY, crowd(4)), gpu_visible=True, cpus=8) is True


def test_client_resources_let_a_whole_round_run_at_once() -> None:
    on = load_scenario(TINY, ['simulation.packing="on"', "clients.per_round=3"])
    share = client_resources([on], cpus=2)["num_cpus"]
    assert share == cpu_share(on, 2) and int(2 / share) >= 3 and share <= 2 / 3
    assert client_resources([on], cpus=16) == {"num_cpus": 1.0, "num_gpus": 0.0}  # at most the scenario's share
    off = load_scenario(TINY, ["simulation.num_cpus_per_client=0.5"])
    assert client_resources([off], cpus=2) == {"num_cpus": 0.5, "num_gpus": 0.0}
    with pytest.raises(ValueError, match="ClientApps of a round at once"):
        client_resources([load_scenario(TINY, ['simulation.packing="on"', *crowd(2)])], cpus=2)


def test_client_resources_meet_the_largest_need_of_the_runs_of_one_simulation() -> None:
    overrides = ['simulation.packing="on"', "clients.per_round=3"]
    alone, packed = (load_scenario(TINY, [*overrides, f"strategy.name='{n}'"]) for n in ("fedspeed", "fedit"))
    assert not packing_on(alone) and packing_on(packed)  # FedSpeed's clients train alone
    needed = {"num_cpus": cpu_share(packed, 2), "num_gpus": 0.0}
    assert client_resources([alone, packed], cpus=2) == client_resources([packed, alone], cpus=2) == needed
    assert client_resources([alone], cpus=2) == {"num_cpus": 1.0, "num_gpus": 0.0}


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ASYNC_STRATEGIES])  # a synchronous round's
def test_base_merging_names_the_strategies_whose_global_state_carries_base_deltas(name: str) -> None:
    scenario = load_scenario(TINY, [f"strategy.name='{name}'"])
    gen = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    state = {
        f"{prefix}.lora_A.weight": torch.randn(8, 64, generator=gen),
        f"{prefix}.lora_B.weight": torch.randn(64, 8, generator=gen),
    }
    strategy = STRATEGIES[name](scenario)
    strategy.assign_ranks({101: 8, 102: 8})
    sent = strategy.configure_train(1, ArrayRecord(state), ConfigRecord({}), NodesOnly([101, 102]))  # type: ignore[arg-type, unused-ignore]
    replies = []
    for i, m in enumerate(sent):
        trained = {
            k: v + 0.01 * (i + 1)
            for k, v in from_record(m.content.array_records["arrays"]).items()
            if not k.endswith(BASE_DELTA)
        }
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 10.0})})
        replies.append(train_reply(m.metadata.dst_node_id, content))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert any(k.endswith(BASE_DELTA) for k in from_record(arrays)) == (name in BASE_MERGING)
