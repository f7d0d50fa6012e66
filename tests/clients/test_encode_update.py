"""The client's side of compression: the update as codec bytes, error feedback in the context."""

from __future__ import annotations

import torch
from flwr.app import Context, RecordDict

from clients.app import EF_KEY, encode_update
from fedsim.compression import CodecConfig, compress, decode, layout_of
from fedsim.config.scenario import CompressionConfig


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def states(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    glob = {"a": torch.randn(16, 32, generator=g), "b": torch.randn(32, 16, generator=g)}
    local = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in glob.items()}
    return local, glob


def diff(local: dict[str, torch.Tensor], glob: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: local[k] - glob[k] for k in local}


def test_lossless_default_sends_the_exact_update() -> None:
    local, glob = states(0)
    sent = decode(encode_update(diff(local, glob), CompressionConfig(), context()), layout_of(local))
    for k in local:
        assert torch.equal(sent[k], local[k] - glob[k])


def test_compeft_sends_what_the_rule_defines() -> None:
    local, glob = states(1)
    cfg = CompressionConfig(method="compeft", density=0.1, alpha=2.0)
    sent = decode(encode_update(diff(local, glob), cfg, context()), layout_of(local))
    expected = compress({k: local[k] - glob[k] for k in local}, CodecConfig(method="compeft", density=0.1, alpha=2.0))
    for k in local:
        assert torch.equal(sent[k], expected[k])
    assert sum(int((v != 0).sum()) for v in sent.values()) == 103  # ceil(0.1 * 1024)


def test_error_feedback_carries_what_was_not_sent() -> None:
    cfg = CompressionConfig(method="compeft", density=0.05, error_feedback=True)
    ctx = context()
    local, glob = states(2)
    update1 = {k: local[k] - glob[k] for k in local}
    sent1 = decode(encode_update(diff(local, glob), cfg, ctx), layout_of(local))
    carried = ctx.state.array_records[EF_KEY].to_torch_state_dict()
    for k in update1:  # residual + sent == update
        torch.testing.assert_close(carried[k] + sent1[k].double(), update1[k].double(), rtol=0, atol=1e-6)
    local2, glob2 = states(3)
    sent2 = decode(encode_update(diff(local2, glob2), cfg, ctx), layout_of(local2))
    with_feedback = {k: (local2[k] - glob2[k]).double() + carried[k] for k in local2}
    expected = compress({k: v.float() for k, v in with_feedback.items()}, CodecConfig(method="compeft", density=0.05))
    for k in local2:
        assert torch.equal(sent2[k], expected[k])
