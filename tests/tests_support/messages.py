"""A train reply as a client's node would send it, built outside a running Flower app."""

from __future__ import annotations

import time

from flwr.app import Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata


def train_reply(node: int, content: RecordDict) -> Message:
    """A reply to a train message, from `node` to the server (node 0), holding `content`."""
    meta = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="m",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return make_message(meta, content)
