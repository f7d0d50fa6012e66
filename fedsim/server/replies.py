"""Validate client replies before they reach a strategy.

Flower's FedAvg raises `InconsistentMessageReplies` on mismatched replies, and `Strategy.start`
does not catch it; one bad client would end the run. Here every reply is checked on its own and a
bad one (an error, a truncated/corrupted/foreign payload, wrong keys or shapes, NaNs) is set aside
with a reason, so it can neither end the run nor touch the global model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import Message, MetricRecord

from fedsim.compression import CodecError, decode, layout_of
from fedsim.model.adapter import AdapterState
from fedsim.protocol import FLOPS, METRICS_RECORD, NUM_EXAMPLES, PAYLOAD, TRAIN_METRICS, UPDATE_RECORD

ERROR_NAMES = {2: "ClientApp raised", 4: "TTL expired", 5: "node unavailable", 8: "ClientApp process crashed"}


@dataclass(frozen=True)
class Checked:
    """A reply with its verdict: `reason` is "" for a usable reply, whose decoded update
    (local − global adapter) is in `update`."""

    message: Message
    status: str  # ok | failed | rejected
    reason: str
    update: AdapterState | None = None


def check_train_reply(msg: Message, expected: AdapterState) -> Checked:
    """A train reply must carry a payload that decodes (`fedsim.compression`) against the layout
    of `expected`, the adapter the strategy expects from this client (so exactly its keys and
    shapes), to finite tensors, with a positive example count and FLOPs (`fedsim.protocol`: the
    train reply)."""
    if msg.has_error():
        return _failed(msg)
    update, reason = _decoded_update(msg, expected)
    return Checked(msg, "rejected" if reason else "ok", reason, update if not reason else None)


def _decoded_update(msg: Message, expected: AdapterState) -> tuple[AdapterState | None, str]:
    content = msg.content
    if UPDATE_RECORD not in content.config_records or METRICS_RECORD not in content.metric_records:
        return None, f"reply lacks the {UPDATE_RECORD!r} ConfigRecord or the {METRICS_RECORD!r} MetricRecord"
    problem = _metrics_problem(msg)
    if problem:
        return None, problem
    metrics = content.metric_records[METRICS_RECORD]
    bad = [k for k in TRAIN_METRICS if not _finite_number(metrics.get(k))]
    if bad:
        return None, f"metrics {bad} must be finite numbers (a train reply carries {', '.join(TRAIN_METRICS)})"
    flops = metrics[FLOPS]
    assert isinstance(flops, (int, float))  # checked just above
    if flops < 0:
        return None, f"{FLOPS!r} must be a finite number >= 0, got {flops!r}"
    payload = content.config_records[UPDATE_RECORD].get(PAYLOAD)
    if not isinstance(payload, bytes):
        return None, f"{PAYLOAD!r} must be bytes, got {type(payload).__name__}"
    try:  # against what the strategy expects: a payload for other tensors is refused, nothing more is allocated
        update = decode(payload, layout_of(expected))
    except CodecError as exc:
        return None, f"update payload rejected: {exc}"
    for key, value in update.items():
        if not bool(torch.isfinite(value).all()):
            return None, f"{key}: not finite (NaN/Inf)"
    return {k: v.to(torch.float32) for k, v in update.items()}, ""


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def reply_metric(msg: Message, key: str, default: float | None = None) -> float:
    """The number `key` of a reply's metrics (`default`, if given, when it has none); a checked
    reply's metrics are numbers, so anything else is a TypeError."""
    metrics = msg.content[METRICS_RECORD]
    if not isinstance(metrics, MetricRecord):
        raise TypeError(f"the reply's {METRICS_RECORD!r} is a {type(metrics).__name__}, not a MetricRecord")
    value = metrics[key] if default is None else metrics.get(key, default)
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} of the reply must be a number, got {value!r}")
    return value


def _failed(msg: Message) -> Checked:
    name = ERROR_NAMES.get(msg.error.code, f"error code {msg.error.code}")
    return Checked(msg, "failed", f"{name}: {msg.error.reason}")


def _metrics_problem(msg: Message) -> str:
    metrics = msg.content.metric_records[METRICS_RECORD]
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not n > 0 or not math.isfinite(n):
        return f"{NUM_EXAMPLES!r} must be a positive number, got {n!r}"
    return ""


def check_eval_reply(msg: Message) -> Checked:
    if msg.has_error():
        return _failed(msg)
    if METRICS_RECORD not in msg.content.metric_records:
        return Checked(msg, "rejected", f"reply lacks the {METRICS_RECORD!r} MetricRecord")
    reason = _metrics_problem(msg)
    return Checked(msg, "rejected" if reason else "ok", reason)
