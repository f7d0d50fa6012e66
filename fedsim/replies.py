"""Validate client replies before they reach a strategy.

Flower's FedAvg raises `InconsistentMessageReplies` on mismatched replies, and `Strategy.start`
does not catch it; one bad client would end the run. Here every reply is checked on its own and a
bad one is set aside with a reason, so it can neither end the run nor touch the global model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from fedsim.adapter import AdapterState

ERROR_NAMES = {2: "ClientApp raised", 4: "TTL expired", 5: "node unavailable", 8: "ClientApp process crashed"}


@dataclass(frozen=True)
class Checked:
    """A reply with its verdict: `reason` is "" for a usable reply."""

    message: Message
    status: str  # ok | failed | rejected
    reason: str


def check_train_reply(msg: Message, expected: AdapterState) -> Checked:
    """A train reply must carry finite tensors with exactly the global adapter's keys and shapes,
    and a positive `num-examples`."""
    if msg.has_error():
        name = ERROR_NAMES.get(msg.error.code, f"error code {msg.error.code}")
        return Checked(msg, "failed", f"{name}: {msg.error.reason}")
    reason = _train_content_problem(msg, expected)
    return Checked(msg, "rejected" if reason else "ok", reason)


def _train_content_problem(msg: Message, expected: AdapterState) -> str:
    content = msg.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord"
    problem = _metrics_problem(msg)
    if problem:
        return problem
    flops = content.metric_records["metrics"].get("flops")
    if not isinstance(flops, (int, float)) or not math.isfinite(flops) or flops < 0:
        return f"'flops' must be a finite number >= 0, got {flops!r}"
    arrays = content.array_records["arrays"]
    if set(arrays.keys()) != set(expected):
        missing = sorted(set(expected) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(expected))
        return f"adapter keys differ from the global adapter: missing {missing[:2]}, unexpected {extra[:2]}"
    for key, ref in expected.items():
        arr = arrays[key]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        values = arr.numpy()
        if values.dtype.kind != "f" or not np.isfinite(values).all():
            return f"{key}: not finite floating-point values (NaN/Inf, or dtype {values.dtype})"
    return ""


def _metrics_problem(msg: Message) -> str:
    metrics = msg.content.metric_records["metrics"]
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or not n > 0 or not math.isfinite(n):
        return f"'num-examples' must be a positive number, got {n!r}"
    return ""


def check_eval_reply(msg: Message) -> Checked:
    if msg.has_error():
        name = ERROR_NAMES.get(msg.error.code, f"error code {msg.error.code}")
        return Checked(msg, "failed", f"{name}: {msg.error.reason}")
    if "metrics" not in msg.content.metric_records:
        return Checked(msg, "rejected", "reply lacks the 'metrics' MetricRecord")
    reason = _metrics_problem(msg)
    return Checked(msg, "rejected" if reason else "ok", reason)
