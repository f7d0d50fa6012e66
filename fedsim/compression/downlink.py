"""Compressed downlink: the server sends the *change* of the global adapter, compressed.

The server keeps the adapter that in-sync clients hold, the broadcast B. Each round k:

    B_k = B_{k-1} + C(G − B_{k-1})        G: the current global adapter, C: the codec's rule

A client that holds B_{k-1} receives encode(G − B_{k-1}) and applies the decoded delta itself;
any other client (new, or one that missed a round) receives B_k whole, lossless. Whatever C
drops this round stays in G − B_k and is sent later: error feedback on the server side. Clients
train from B_k, so their update is local − B_k, and the server rebuilds local = B_k + update.

The server's only per-client state is one integer, the broadcast version each client holds.
A client keeps its copy of B in its node context (`context.state`), which Flower keeps across
rounds in simulation and on a SuperNode.

Payloads carry no tensor names or shapes (`fedsim.compression.codec`): a client decodes both kinds
against the layout of the adapter its own model holds. That is the broadcast's layout because the
downlink carries one adapter for every client: one rank, no pruned clients, no base-weight merges
or personal factors (`fedsim.config.scenario` refuses the downlink otherwise).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord

from fedsim.compression import CodecConfig, Layout, compress, decode, encode
from fedsim.model.adapter import AdapterState
from fedsim.protocol import DOWN_BASE, DOWN_DELTA, DOWN_FULL, DOWN_KIND, DOWN_VERSION, PAYLOAD

LOSSLESS = CodecConfig(method="none")


class Downlink:
    """What each client holds, and the payload each one needs this round."""

    def __init__(self, codec: CodecConfig, num_clients: int) -> None:
        self.codec = codec
        self.broadcast: AdapterState | None = None
        self.version = 0  # the round whose broadcast is current
        self.held = np.full(num_clients, -1, dtype=np.int64)  # version each client holds (-1: none)
        self._delta = b""
        self._full = b""
        self._base = -1  # the version the current delta applies to

    def advance(self, global_state: AdapterState, server_round: int) -> AdapterState:
        """Move the broadcast toward `global_state` for `server_round`; returns B_k, the adapter
        clients will train from."""
        if self.broadcast is None:
            self.broadcast = {k: v.clone() for k, v in global_state.items()}
            self._delta = b""
        else:
            delta = {k: global_state[k] - self.broadcast[k] for k in global_state}
            sent = compress(delta, self.codec)
            self.broadcast = {k: self.broadcast[k] + sent[k].to(torch.float32) for k in delta}
            self._delta = encode(delta, self.codec)
        self._full = encode(self.broadcast, LOSSLESS)
        self._base, self.version = self.version, server_round
        return self.broadcast

    def record_for(self, client_id: int) -> ConfigRecord:
        """The downlink record for one client (`fedsim.protocol.DOWN_RECORD`): the delta if it
        holds the previous broadcast."""
        if self._delta and self.held[client_id] == self._base:
            return ConfigRecord(
                {DOWN_KIND: DOWN_DELTA, PAYLOAD: self._delta, DOWN_BASE: self._base, DOWN_VERSION: self.version}
            )
        return ConfigRecord({DOWN_KIND: DOWN_FULL, PAYLOAD: self._full, DOWN_BASE: -1, DOWN_VERSION: self.version})

    def mark_received(self, client_ids: np.ndarray) -> None:
        self.held[np.asarray(client_ids, dtype=np.int64)] = self.version


def apply_down(record: ConfigRecord, held: AdapterState | None, held_version: int, layout: Layout) -> AdapterState:
    """The client's side: the broadcast adapter from a downlink record and the copy it holds.

    `layout`: the adapter this client's model holds, names and shapes (`layout_of` of its state);
    the whole adapter and the delta both decode against it, in its order, and a payload for any
    other layout is refused (`CodecError`)."""
    raw, base = record[PAYLOAD], record[DOWN_BASE]
    if not isinstance(raw, bytes) or not isinstance(base, int):
        raise TypeError(
            f"a downlink record carries bytes {PAYLOAD!r} and int {DOWN_BASE!r}, got {type(raw).__name__} and "
            f"{type(base).__name__}"
        )
    payload = decode(raw, layout)
    if record[DOWN_KIND] == DOWN_FULL:
        return {k: v.to(torch.float32) for k, v in payload.items()}
    if held is None or held_version != base:
        raise ValueError(
            f"downlink delta is based on version {base}, but this client holds {held_version}; "
            "the server sends the full adapter next time"
        )
    return {k: held[k] + payload[k].to(torch.float32) for k in payload}
