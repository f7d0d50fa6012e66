"""Train replies are validated on their own (`fedsim.server.replies`): metrics the round loop and the
strategy need, each a finite number; extra metrics never reach Flower's averaging."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from tests_support.messages import train_reply

from fedsim.compression import CodecConfig, encode
from fedsim.protocol import TRAIN_METRICS
from fedsim.server.replies import check_train_reply
from fedsim.server.rounds import _as_adapter_reply

EXPECTED = {"layers.0.q_proj.lora_A.weight": torch.zeros(2, 4), "layers.0.q_proj.lora_B.weight": torch.zeros(4, 2)}
GOOD = {
    "num-examples": 10,
    "train-loss": 1.5,
    "loss-before": 2.0,
    "loss-after": 1.0,
    "tokens": 100,
    "flops": 1e9,
    "wall-time-s": 0.5,
    "prune-ratio": 0.0,
}


def _reply(metrics: dict[str, float]) -> object:
    payload = encode({k: torch.ones_like(v) for k, v in EXPECTED.items()}, CodecConfig(method="none"))
    return train_reply(7, RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord(metrics)}))


def test_a_complete_reply_is_ok() -> None:
    checked = check_train_reply(_reply(GOOD), EXPECTED)  # type: ignore[arg-type]
    assert checked.status == "ok" and torch.equal(checked.update["layers.0.q_proj.lora_A.weight"], torch.ones(2, 4))


@pytest.mark.parametrize("key", TRAIN_METRICS[1:])
def test_a_missing_metric_is_named(key: str) -> None:
    checked = check_train_reply(_reply({k: v for k, v in GOOD.items() if k != key}), EXPECTED)  # type: ignore[arg-type]
    assert checked.status == "rejected" and repr(key) in checked.reason


def test_a_nan_loss_is_rejected() -> None:
    checked = check_train_reply(_reply({**GOOD, "train-loss": math.nan}), EXPECTED)  # type: ignore[arg-type]
    assert checked.status == "rejected" and "'train-loss'" in checked.reason


def test_extra_metrics_do_not_reach_the_strategy() -> None:
    checked = check_train_reply(_reply({**GOOD, "battery-level": 0.3}), EXPECTED)  # type: ignore[arg-type]
    assert checked.status == "ok"
    msg = _as_adapter_reply(checked, {7: EXPECTED})
    assert set(msg.content["metrics"]) == set(TRAIN_METRICS)


def test_an_update_for_other_tensors_is_rejected_by_its_layout() -> None:
    rank_1 = {k: v[:1] if ".lora_A." in k else v[:, :1] for k, v in EXPECTED.items()}
    payload = encode({k: torch.ones_like(v) for k, v in rank_1.items()}, CodecConfig(method="none"))
    reply = train_reply(7, RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord(GOOD)}))
    checked = check_train_reply(reply, EXPECTED)  # type: ignore[arg-type]
    assert checked.status == "rejected" and "update payload rejected: layout mismatch" in checked.reason
