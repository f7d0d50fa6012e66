"""A Flower Grid whose SuperNodes live in the test process: each pushed message is handled at once
by fedsim's own ClientApp handlers (`clients.app`), so a federation runs without Ray."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

from clients import app
from fedsim.config.scenario import Scenario
from fedsim.model.adapter import AdapterState, get_state

HANDLERS = {"query": app.identify, "train": app.train, "evaluate": app.evaluate}


@dataclass
class Exchange:
    """One train message, its reply, and the client's LoRA state when it replied (before it cut anything)."""

    message: Message
    reply: Message
    local: AdapterState


class InProcessGrid:
    """Node 100 + k holds partition k; each node keeps its own `Context` across rounds."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.contexts = {
            100 + k: Context(
                run_id=1, node_id=100 + k, node_config={"partition-id": k}, state=RecordDict(), run_config={}
            )
            for k in range(scenario.clients.num_clients)
        }
        self.pending: dict[str, Message] = {}
        self.train: list[Exchange] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid, node = f"m{len(self.pending)}-{time.monotonic_ns()}", m.metadata.dst_node_id
            reply = HANDLERS[m.metadata.message_type](m, self.contexts[node])
            if m.metadata.message_type == "train":
                s = self.scenario
                model = app._model(s.model, s.lora.model_dump_json(), s.train.device)[0]
                self.train.append(Exchange(m, reply, get_state(model)))
            meta = Metadata(
                run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id=mid, group_id="",
                created_at=time.time(), ttl=60.0, message_type=m.metadata.message_type,
            )  # fmt: skip
            self.pending[mid] = make_message(meta, reply.content)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]
