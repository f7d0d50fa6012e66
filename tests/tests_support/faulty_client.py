"""A ClientApp that misbehaves on purpose: client 1 sends an update full of NaNs, client 2
raises, client 3 sends a truncated payload. Everyone else behaves like the real `clients.app`."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients import app as real
from fedsim.compression import CodecConfig, decode, encode, layout_of
from fedsim.config.scenario import Scenario
from fedsim.model.adapter import from_record

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return real.identify(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    cid = real.client_id(context, Scenario.from_json(str(config["scenario"])), config)  # the client it plays
    if cid == 2:
        raise RuntimeError("deliberate crash")
    reply = real.train(msg, context)
    payload = reply.content["update"]["payload"]
    if cid == 1:
        sent = from_record(msg.content["arrays"])  # the tiny scenario's FedIT: the update covers what was sent
        nan = {k: torch.full_like(v, float("nan")) for k, v in decode(payload, layout_of(sent)).items()}
        payload = encode(nan, CodecConfig(method="none"))
    elif cid == 3:
        payload = payload[: len(payload) // 2]
    content = RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": reply.content["metrics"]})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
