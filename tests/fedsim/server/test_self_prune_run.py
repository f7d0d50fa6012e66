"""HetLoRA's rank self-pruning end to end, on the tiny model with fedsim's own ClientApp in this
process (`tests_support.inprocess`): a client whose tail norm fell drops its tail, its reply
covers the kept rank, and the server serves it that rank from then on, across a resume too.

The run starts from a global adapter whose B carries a large tail in ranks 6..7 (the tail of a
rank-8 client at γ = 0.75) and trains with a heavy tail penalty (λ = 10), so client 0 (rank 8)
ends its first round with a smaller tail than it received and must prune to ⌊0.75·8⌋ = 6. Client
1 (rank 4) receives ranks 0..3, where B is still PEFT's zero: its tail can only grow, so it must
keep rank 4."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tests_support.inprocess import InProcessGrid
from tests_support.messages import train_reply

from fedsim.compression import codec_config, decode, encode, layout_of
from fedsim.config.scenario import CompressionConfig, ScenarioError, load_scenario, validate_scenario
from fedsim.model.adapter import AdapterState, from_record
from fedsim.protocol import KEPT_RANK, RANK_RECORD, TRAIN_METRICS
from fedsim.results.rundir import RunDir, read_metrics
from fedsim.server.central import CentralEvaluator
from fedsim.server.federation import run_federation
from fedsim.server.resume import resume_point
from fedsim.server.roster import Roster
from fedsim.server.rounds import check_train
from strategies import FedIT, HetLoRA, LoraStrategy
from strategies.hetlora import drop_tail

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"
OVERRIDES = [
    "name=self-prune", "strategy.name=hetlora", "strategy.rank_gamma=0.75", "strategy.rank_lambda=10.0",
    'lora.client_ranks={"1" = 4}', "clients.num_clients=2", "clients.per_round=2", "clients.eval_per_round=0",
    "data.central_test_size=8", "eval.max_new_tokens=2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Flower's Message() reads the running task's identity; outside a run we provide one.
    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    yield


def _big_tail(state: AdapterState) -> AdapterState:
    """B's ranks 6..7 set to N(0, 1); the rest as PEFT initialised it (B = 0)."""
    g, out = torch.Generator().manual_seed(0), dict(state)
    for key, B in state.items():
        if ".lora_B." in key:
            out[key] = B.clone()
            out[key][:, 6:] = torch.randn(B.shape[0], B.shape[1] - 6, generator=g)
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InProcessGrid]:
    """One round, from the big-tail start."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 0}.items():
            mp.setattr(TaskIdentity, name, value, raising=False)
        start = CentralEvaluator.initial_state
        mp.setattr(CentralEvaluator, "initial_state", lambda self: _big_tail(start(self)))
        scenario = load_scenario(TINY, [*OVERRIDES, "rounds=1"])
        run_dir, grid = RunDir.create(tmp_path_factory.mktemp("runs"), scenario), InProcessGrid(scenario)
        run_federation(grid, scenario, run_dir)  # type: ignore[arg-type]
    return run_dir.path, grid


def test_the_client_whose_tail_fell_prunes_and_the_other_keeps_its_rank(
    stopped_run: tuple[Path, InProcessGrid],
) -> None:
    train = read_metrics(stopped_run[0]).query("kind == 'train'").set_index("client_id")
    assert (train["status"] == "ok").all(), train["reason"].to_dict()
    assert train.loc[0, ["lora_rank", "rank_kept"]].tolist() == [8, 6]
    assert train.loc[1, ["lora_rank", "rank_kept"]].tolist() == [4, 4]


def test_a_pruned_reply_carries_the_update_of_the_kept_ranks(stopped_run: tuple[Path, InProcessGrid]) -> None:
    (pruned,) = [e for e in stopped_run[1].train if e.message.metadata.dst_node_id == 100]
    assert pruned.reply.content[RANK_RECORD][KEPT_RANK] == 6
    received = from_record(pruned.message.content["arrays"])
    expected = {
        k: v - drop_tail(received, 6)[k] for k, v in drop_tail(pruned.local, 6).items()
    }  # local − received, both cut to rank 6
    update = decode(pruned.reply.content["update"]["payload"], layout_of(expected))
    assert update.keys() == expected.keys()
    for key, value in expected.items():
        assert update[key].shape[0 if ".lora_A." in key else 1] == 6, key
        torch.testing.assert_close(update[key], value)
    (kept,) = [e for e in stopped_run[1].train if e.message.metadata.dst_node_id == 101]
    assert kept.reply.content[RANK_RECORD][KEPT_RANK] == 4
    layout = layout_of(from_record(kept.message.content["arrays"]))  # sent at rank 4; HetLoRA uploads A and B
    assert all(
        v.shape[0 if ".lora_A." in k else 1] == 4
        for k, v in decode(kept.reply.content["update"]["payload"], layout).items()
    )


def test_the_server_serves_the_kept_rank_from_then_on_across_a_resume(stopped_run: tuple[Path, InProcessGrid]) -> None:
    scenario = load_scenario(TINY, [*OVERRIDES, "rounds=2"])
    run_dir = RunDir.open(stopped_run[0])
    point = resume_point(run_dir, scenario)
    assert point.kept_ranks == {0: 6}  # rebuilt from the metric rows
    grid = InProcessGrid(scenario)
    run_federation(grid, scenario, run_dir, resume=point)  # type: ignore[arg-type]
    sent = {e.message.metadata.dst_node_id: e.message.content for e in grid.train}
    assert sent[100]["config"]["lora-rank"] == 6 and sent[101]["config"]["lora-rank"] == 4  # assigned: 8 and 4
    assert all(v.shape[0] == 6 for k, v in from_record(sent[100]["arrays"]).items() if ".lora_A." in k)
    second = read_metrics(run_dir.path).query("kind == 'train' and round == 2").set_index("client_id")
    assert (second["status"] == "ok").all(), second["reason"].to_dict()
    assert second.loc[0, "lora_rank"] == 6 and second.loc[0, "rank_kept"] <= 6


A_KEY, B_KEY = (
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
)


def _reply(kept: object, update_rank: int) -> Message:
    """A train reply from node 7 naming `kept` as its kept rank, with a zero update at `update_rank`."""
    update = {A_KEY: torch.zeros(update_rank, 8), B_KEY: torch.zeros(8, update_rank)}
    content = RecordDict({
        RANK_RECORD: ConfigRecord({KEPT_RANK: kept}), "metrics": MetricRecord({k: 1.0 for k in TRAIN_METRICS}),
        "update": ConfigRecord({"payload": encode(update, codec_config(CompressionConfig()))}),
    })  # fmt: skip
    return train_reply(7, content)


@pytest.mark.parametrize(
    ("strategy", "kept", "update_rank", "problem"),
    [
        (HetLoRA(8, 16.0), 6, 6, ""),
        (HetLoRA(8, 16.0), 8, 8, ""),  # tested, kept everything
        (HetLoRA(8, 16.0), 6, 8, "update payload rejected"),  # names rank 6, sends rank 8
        (HetLoRA(8, 16.0), 0, 8, "rank.kept must be an integer in [1, 8] (the rank the client was sent), got 0"),
        (HetLoRA(8, 16.0), 9, 8, "rank.kept must be an integer in [1, 8] (the rank the client was sent), got 9"),
        (HetLoRA(8, 16.0), "6", 6, "must be an integer in [1, 8] (the rank the client was sent), got '6'"),
        (HetLoRA(8, 16.0), True, 8, "must be an integer in [1, 8] (the rank the client was sent), got True"),
        (
            FedIT(8, 16.0),
            6,
            6,
            "the reply names a kept rank (its 'rank' record), but FedIT asks for no rank self-pruning",
        ),
    ],
)
def test_the_server_checks_a_replys_kept_rank_and_cuts_what_it_sent_to_it(
    strategy: LoraStrategy, kept: object, update_rank: int, problem: str
) -> None:
    g = torch.Generator().manual_seed(0)
    start = {A_KEY: torch.randn(8, 8, generator=g), B_KEY: torch.randn(8, 8, generator=g)}
    sent = {7: dict(start)}
    env = SimpleNamespace(
        pruning=None, roster=Roster.fixed({0: 7}), strategy=strategy, rank=lambda cid: 8, privacy=None
    )
    checked = check_train(env, _reply(kept, update_rank), sent)  # type: ignore[arg-type]
    if problem:  # rejected with the reason, not raised: the round goes on without it
        assert checked.status == "rejected" and problem in checked.reason, checked.reason
        return
    assert (checked.status, checked.reason) == ("ok", "")
    expected = drop_tail(start, update_rank)  # what the update adds to: the kept ranks, B refolded to their scaling
    assert all(torch.equal(sent[7][k], v) for k, v in expected.items())


def test_the_downlink_refuses_hetlora_whose_ranks_shrink_unless_gamma_is_one() -> None:
    raw = {"model": {"name": "tiny-llama"}, "strategy": {"name": "hetlora"}, "compression": {"downlink": True}}
    with pytest.raises(ScenarioError) as info:
        validate_scenario(raw)
    assert info.value.problems == [
        "`compression.downlink` needs one rank for every client, but hetlora's clients self-prune their ranks "
        "(`strategy.rank_gamma` = 0.99 < 1): set rank_gamma = 1 or turn the downlink off"
    ]
    validate_scenario({**raw, "strategy": {"name": "hetlora", "rank_gamma": 1.0}})  # no tail: ranks stay
