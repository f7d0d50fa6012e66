"""The compressed downlink: clients in sync get a compressed delta and end up holding exactly
the server's broadcast adapter; anyone else gets the whole adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.compression import CodecConfig, CodecError, layout_of
from fedsim.compression.downlink import Downlink, apply_down
from fedsim.protocol import DOWN_DELTA, DOWN_FULL


def adapter(seed: int, rank: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(rank, 64, generator=g), "b": torch.randn(64, rank, generator=g)}


LAYOUT = layout_of(adapter(0))  # what the client's model holds


def test_clients_in_sync_get_a_delta_and_hold_the_broadcast_exactly() -> None:
    down = Downlink(CodecConfig(method="compeft", density=0.1), num_clients=3)
    b1 = down.advance(adapter(0), server_round=1)
    first = down.record_for(0)
    assert first["kind"] == DOWN_FULL
    held = apply_down(first, None, -1, LAYOUT)
    assert all(torch.equal(held[k], b1[k]) for k in b1)
    down.mark_received(np.array([0]))

    global2 = {k: v + 0.1 * adapter(1)[k] for k, v in adapter(0).items()}
    b2 = down.advance(global2, server_round=2)
    delta, stale = down.record_for(0), down.record_for(1)
    assert delta["kind"] == DOWN_DELTA and stale["kind"] == DOWN_FULL
    assert len(delta["payload"]) * 8 < len(stale["payload"])  # d = 0.1: far fewer bytes
    got = apply_down(delta, held, 1, LAYOUT)
    assert all(torch.equal(got[k], b2[k]) for k in b2)
    assert all(torch.equal(apply_down(stale, None, -1, LAYOUT)[k], b2[k]) for k in b2)


def test_what_the_delta_drops_is_sent_later() -> None:
    """Server-side error feedback: with the global adapter fixed, the broadcast converges to it."""
    down = Downlink(CodecConfig(method="topk", density=0.2), num_clients=1)
    down.advance(adapter(0), 1)
    target = adapter(5)
    errors = []
    for k in range(2, 12):
        broadcast = down.advance(target, k)
        errors.append(sum(float((broadcast[n] - target[n]).norm()) for n in target))
    assert errors[-1] < 1e-6 < errors[0]


def test_a_delta_on_the_wrong_base_is_refused() -> None:
    down = Downlink(CodecConfig(method="compeft", density=0.1), num_clients=1)
    down.advance(adapter(0), 1)
    down.mark_received(np.array([0]))
    down.advance(adapter(1), 2)
    with pytest.raises(ValueError, match="based on version 1, but this client holds 0"):
        apply_down(down.record_for(0), adapter(0), 0, LAYOUT)


def test_a_payload_for_another_adapter_is_refused() -> None:
    """No names or shapes travel: a client whose model holds another rank cannot misread one."""
    down = Downlink(CodecConfig(method="compeft", density=0.1), num_clients=1)
    down.advance(adapter(0), 1)
    with pytest.raises(CodecError, match="layout mismatch: the payload was encoded for 2 tensors"):
        apply_down(down.record_for(0), None, -1, layout_of(adapter(0, rank=4)))
