"""fedsim's ClientApp, except that it refuses the identity query: fedsim's own simulation must
never send one (`fedsim.server.federation.assign_clients`)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import app as real

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    raise RuntimeError("fedsim's simulation assigns clients: no node is asked who it is")


@app.train()
def train(msg: Message, context: Context) -> Message:
    return real.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
