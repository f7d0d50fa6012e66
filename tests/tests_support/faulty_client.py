"""A ClientApp that misbehaves on purpose: client 1 returns NaN tensors, client 2 raises.
Everyone else behaves like the real `clients.app`."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients import app as real

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return real.identify(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cid = int(context.node_config["partition-id"])
    if cid == 2:
        raise RuntimeError("deliberate crash")
    reply = real.train(msg, context)
    if cid == 1:
        arrays = reply.content["arrays"].to_torch_state_dict()
        poisoned = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in arrays.items()})
        reply = Message(RecordDict({"arrays": poisoned, "metrics": reply.content["metrics"]}), reply_to=msg)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
