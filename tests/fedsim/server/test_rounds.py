"""Pure pieces of a round: seeded sampling, the aggregation-bias metric, checks of a reply."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from tests_support.messages import train_reply

from fedsim.config.scenario import load_scenario
from fedsim.server.roster import Roster
from fedsim.server.rounds import round_bias, sample_clients

ROOT = Path(__file__).resolve().parents[3]


def test_sampling_is_a_function_of_seed_round_and_purpose() -> None:
    pool = [5, 3, 9, 1, 7, 2]
    a = sample_clients(pool, 3, seed=1, server_round=2, purpose="train")
    assert a == sample_clients(list(reversed(pool)), 3, seed=1, server_round=2, purpose="train")  # order-free
    assert a == sorted(a) and set(a) <= set(pool) and len(a) == 3
    draws = {tuple(sample_clients(pool, 3, seed=1, server_round=r, purpose="train")) for r in range(10)}
    assert len(draws) > 1
    assert sample_clients(pool, 10, 1, 1, "train") == sorted(pool)
    assert sample_clients([], 3, 1, 1, "train") == []


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q_proj.lora_A.weight": torch.randn(8, 16, generator=g),
        "m.q_proj.lora_B.weight": torch.randn(16, 8, generator=g),
    }


def test_round_bias_matches_the_formula() -> None:
    s = load_scenario(ROOT / "scenarios" / "tiny.toml")
    assert round_bias([adapter(0), adapter(0)], [1.0, 3.0], s) == 0.0
    assert math.isnan(round_bias([adapter(0)], [1.0], s))
    a, b = adapter(1), adapter(2)
    p = torch.tensor([0.25, 0.75])
    A = [a["m.q_proj.lora_A.weight"], b["m.q_proj.lora_A.weight"]]
    B = [a["m.q_proj.lora_B.weight"], b["m.q_proj.lora_B.weight"]]
    ideal = p[0] * B[0] @ A[0] + p[1] * B[1] @ A[1]
    fedit = (p[0] * B[0] + p[1] * B[1]) @ (p[0] * A[0] + p[1] * A[1])
    expected = float(torch.linalg.matrix_norm(fedit - ideal) / torch.linalg.matrix_norm(ideal))
    assert round_bias([a, b], [1.0, 3.0], s) == pytest.approx(expected, rel=1e-5)


def test_timed_send_and_receive_measures_each_round_trip() -> None:
    from flwr.app import Error, Message, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata

    from fedsim.server.rounds import timed_send_and_receive

    def message(src: int, dst: int, message_id: str, reply_to: str, error: Error | None = None) -> Message:
        meta = Metadata(1, message_id, src, dst, reply_to, "", time.time(), 60.0, "train")
        return make_message(meta, error=error) if error else make_message(meta, RecordDict())

    class SlowGrid:
        """Node n answers n·0.1 s after the push; node 9 never does, node 5 went away (the
        SuperLink answers for it, as node 1, with "node unavailable")."""

        def __init__(self) -> None:
            self.pulled: list[Message] = []

        def push_messages(self, messages: list[Message]) -> list[str]:
            self.t0 = time.monotonic()
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids: set[str]) -> list[Message]:
            elapsed = time.monotonic() - self.t0
            replies = [
                message(1, 0, "", i, Error(5, "node unavailable")) if i == "m5" else message(int(i[1:]), 0, "", i)
                for i in sorted(ids) if int(i[1:]) != 9 and elapsed >= int(i[1:]) * 0.1
            ]  # fmt: skip
            self.pulled += replies
            return replies

    sent = [message(0, n, f"m{n}", "") for n in (2, 3, 5, 9)]
    grid = SlowGrid()
    replies, seconds = timed_send_and_receive(grid, sent, timeout=1.0, poll_s=0.01)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [2, 3, 5]
    assert 0.2 <= seconds[2] < 0.3 and 0.3 <= seconds[3] < 0.4 and 9 not in seconds and 1 not in seconds
    lost = next(r for r in replies if r.metadata.src_node_id == 5)
    assert lost.has_error() and lost.error.code == 5 and lost.metadata.reply_to_message_id == "m5"
    assert [r.metadata.src_node_id for r in grid.pulled if r.metadata.reply_to_message_id == "m5"] == [1]  # untouched


@pytest.mark.parametrize(
    ("keep", "problem"),
    [("not a keep", "not a pruning keep document"), ("everything", "brings back structures the outer keep removed")],
)
def test_a_pruned_reply_whose_keep_is_bad_is_rejected_not_fatal(keep: str, problem: str) -> None:
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedsim.pruning.slicing import slice_adapter
    from fedsim.pruning.structure import Keep, LayerGeometry
    from fedsim.server.rounds import check_train
    from strategies import FedIT

    layers = [LayerGeometry(hidden=8, head_dim=2, group_size=2, groups=2, channels=4)]
    held = Keep(((1,),), ((0, 2),), (2,), (4,), 2, 2)
    state = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2),
    }
    sent = {7: slice_adapter(state, held)}
    env = SimpleNamespace(
        pruning=SimpleNamespace(held=lambda cid: held),
        roster=Roster.fixed({0: 7}),
        strategy=FedIT(2, 4.0),
        privacy=None,
    )
    text = Keep.everything(layers).to_json() if keep == "everything" else keep
    content = RecordDict(
        {
            "prune": ConfigRecord({"keep": text}),
            "update": ConfigRecord({"payload": b""}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    checked = check_train(env, train_reply(7, content), sent)  # type: ignore[arg-type]
    assert checked.status == "rejected" and problem in checked.reason


def test_contributions_score_each_clients_share_of_the_average() -> None:
    """`contributions`: (L(θ) − L(θ_i)) / L(θ), θ_i = θ moved by the client's example-weighted
    share of an average toward its adapter; an update toward the held-out optimum contributes,
    one away from it is negative."""
    from types import SimpleNamespace

    from flwr.app import MetricRecord, RecordDict

    from fedsim.protocol import TRAIN_METRICS
    from fedsim.server.replies import Checked
    from fedsim.server.rounds import _as_adapter_reply, contributions
    from strategies import FedIT

    a_key, b_key = (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    )
    state = {a_key: torch.ones(2, 8), b_key: torch.zeros(8, 2)}
    target = torch.full((8, 2), 0.5)

    asked: list[int] = []

    def score(
        s: dict[str, torch.Tensor], examples: int = 16
    ) -> float:  # a held-out "loss": distance of B to its optimum, plus 1
        asked.append(examples)
        return 1.0 + float((s[b_key] - target).pow(2).sum())

    strategy = FedIT(2, 4.0)
    strategy.current = state
    env = SimpleNamespace(
        score=score,
        strategy=strategy,
        scenario=SimpleNamespace(controller=SimpleNamespace(reward=SimpleNamespace(contribution_examples=24))),
    )

    def reply(node: int, step: float, examples: float) -> Checked:
        content = RecordDict({"metrics": MetricRecord({**{k: 1.0 for k in TRAIN_METRICS}, "num-examples": examples})})
        return Checked(
            train_reply(node, content), "ok", "", {a_key: torch.zeros(2, 8), b_key: torch.full((8, 2), step)}
        )

    sent = {1: state, 2: state}
    clients = [strategy.client_adapter(_as_adapter_reply(r, sent)) for r in (reply(1, 0.5, 3.0), reply(2, -0.5, 1.0))]
    got = contributions(env, state, clients)  # type: ignore[arg-type]
    before = score(state)  # 1 + 16·0.25 = 5
    moved = [
        1.0 + 16 * (0.5 - 0.75 * 0.5) ** 2,
        1.0 + 16 * (0.5 + 0.25 * 0.5) ** 2,
    ]  # B moved by 3/4 of +0.5, 1/4 of −0.5
    assert got == pytest.approx([(before - moved[0]) / before, (before - moved[1]) / before])
    assert got[0] > 0 > got[1]
    assert asked[:3] == [24, 24, 24]  # scored on `controller.reward.contribution_examples`


def test_a_reply_from_another_client_than_its_node_was_addressed_as_is_rejected() -> None:
    from types import SimpleNamespace

    from flwr.app import MetricRecord, RecordDict

    from fedsim.server.rounds import check_eval

    env = SimpleNamespace(roster=Roster.fixed({3: 7}))
    other = check_eval(env, train_reply(7, RecordDict({"metrics": MetricRecord({"client-id": 5})})))  # type: ignore[arg-type]
    assert other.status == "rejected" and "from client 5, but its node was addressed as client 3" in other.reason
    same = check_eval(env, train_reply(7, RecordDict({"metrics": MetricRecord({"client-id": 3})})))  # type: ignore[arg-type]
    assert "addressed" not in same.reason


@pytest.mark.parametrize(
    ("record", "problem"), [(None, "got None"), ({"below-clip": 2}, "got 2"), ({"below-clip": 1}, "")]
)
def test_with_adaptive_clipping_a_reply_without_its_indicator_bit_is_rejected(
    record: dict | None, problem: str
) -> None:
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedsim.compression import codec_config, encode
    from fedsim.config.scenario import CompressionConfig
    from fedsim.protocol import TRAIN_METRICS
    from fedsim.server.rounds import check_train
    from strategies import FedIT

    state = {"m.q_proj.lora_A.weight": torch.zeros(2, 8), "m.q_proj.lora_B.weight": torch.zeros(8, 2)}
    env = SimpleNamespace(
        pruning=None, roster=Roster.fixed({0: 7}), strategy=FedIT(2, 4.0), privacy=SimpleNamespace(adaptive=object())
    )
    content = RecordDict({
        "metrics": MetricRecord({k: 1.0 for k in TRAIN_METRICS}),
        "update": ConfigRecord({"payload": encode(state, codec_config(CompressionConfig()))}),
        **({"dp": ConfigRecord(record)} if record is not None else {}),
    })  # fmt: skip
    checked = check_train(env, train_reply(7, content), {7: state})  # type: ignore[arg-type]
    if problem:
        assert checked.status == "rejected" and "adaptive clipping needs the reply's dp.below-clip" in checked.reason
        assert problem in checked.reason
    else:
        assert checked.status == "ok", checked.reason
