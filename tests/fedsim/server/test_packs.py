"""The server's packs (fedsim/server/packs.py) and the scenario's packing settings."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsim.cli import main
from fedsim.config.errors import EXIT_BAD_INPUT
from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.protocol import CLIENT_ID, CONFIG_RECORD, PACK_ID, PACK_MEMORY, PACK_SIZE, PACK_TIMEOUT_S, SCENARIO
from fedsim.server.packs import clientapps_at_once, packing_on, packs, with_packs

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
        config: dict[str, str | int] = {SCENARIO: "{}", **({CLIENT_ID: cid} if named else {})}
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
