"""fedsim's ClientApp with a probe on its train handler: for each train message it appends one JSON
line to $FEDSIM_PACKING_PROBE/<pid>.jsonl: the client, whether the message named a pack, and how
many times the handler asked for the process's base model (`clients.app._model`, loaded on first
ask). Everything else is the real `clients.app`; importable by Ray workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import app as real
from fedsim.protocol import CLIENT_ID, CONFIG_RECORD, PACK_ID

PROBE_DIR = "FEDSIM_PACKING_PROBE"  # environment variable: where the lines go
app = ClientApp()


def _asks() -> int:
    info = real._model.cache_info()
    return info.hits + info.misses


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return real.identify(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    before = _asks()
    reply = real.train(msg, context)
    config = msg.content.config_records[CONFIG_RECORD]
    line = {"client": int(config[CLIENT_ID]), "packed": PACK_ID in config, "model_asks": _asks() - before}  # type: ignore[arg-type]
    with open(Path(os.environ[PROBE_DIR]) / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
