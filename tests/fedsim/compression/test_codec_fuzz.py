"""Property tests of the wire format: any bytes decode to tensors or raise `CodecError`, nothing
else; any single flipped bit is refused; random updates round-trip to `compress` at the
predicted size.

Mutated payloads are decoded twice: as they are (the checksum refuses nearly all of them) and
resealed with a fresh checksum, so that the parser behind it sees them too. Every decode is
against the base payload's layout, which bounds what it may allocate.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsim.compression import CodecConfig, CodecError, compress, decode, encode, encoded_size, layout_of

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def base_update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.0.lora_A": torch.randn(4, 24, generator=g),  # dense enough for a bitmap
        "layer.0.lora_B": torch.randn(24, 4, generator=g),
        "scalar": torch.tensor(-0.25),
        "empty": torch.zeros(0, 2),
    }


def base_payloads() -> list[bytes]:
    configs = [
        CodecConfig(density=0.5),
        CodecConfig(density=0.05, per_tensor=True),  # Rice codes, per-tensor scales
        CodecConfig(method="topk", density=0.1, dtype="float16"),
        CodecConfig(method="none", dtype="bfloat16"),
    ]
    return [encode(base_update(), c) for c in configs]


BASES = base_payloads()
LAYOUT = layout_of(base_update())


def decodes_or_refuses(payload: bytes) -> None:
    try:
        out = decode(payload, LAYOUT)
    except CodecError:
        return
    assert list(out) == list(LAYOUT)
    assert all(isinstance(v, torch.Tensor) and tuple(v.shape) == LAYOUT[k] for k, v in out.items())


def resealed(payload: bytes) -> bytes:
    """`payload` with its last 4 bytes replaced by the CRC-32 of the rest (as if sent so)."""
    body = payload[:-4] if len(payload) >= 4 else payload
    return body + struct.pack("<I", zlib.crc32(body))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        header_biased = st.one_of(st.integers(0, min(len(data), 64)), st.integers(0, len(data)))
        at = min(draw(header_biased), max(len(data) - 1, 0))
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "extend", "insert", "delete"]))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        elif op == "truncate":
            del data[at:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_payloads_decode_or_raise_codec_error(payload):
    decodes_or_refuses(payload)
    decodes_or_refuses(resealed(payload))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"CPFT\x02" + b)))
def test_random_bytes_decode_or_raise_codec_error(payload):
    decodes_or_refuses(payload)
    decodes_or_refuses(resealed(payload))


values = st.one_of(st.floats(-1e3, 1e3, width=32), st.sampled_from([0.0, -0.0, 0.5, -0.5]))


@st.composite
def updates(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    shapes = draw(st.lists(st.lists(st.integers(0, 7), max_size=3), max_size=4))
    tensors = [draw(arrays(np.float32, tuple(shape), elements=values)) for shape in shapes]
    return {f"t{i}": torch.from_numpy(t) for i, t in enumerate(tensors)}


configs = st.builds(
    CodecConfig,
    method=st.sampled_from(["none", "topk", "compeft"]),
    density=st.floats(1e-3, 1.0),
    alpha=st.floats(1e-2, 10.0),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    per_tensor=st.booleans(),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(updates(), configs)
def test_random_updates_round_trip_at_the_predicted_size(update, config):
    payload = encode(update, config)

    out = decode(payload, layout_of(update))

    expected = compress(update, config)
    assert list(out) == list(expected) and len(payload) == encoded_size(update, config)
    assert all(out[n].dtype == expected[n].dtype and torch.equal(out[n], expected[n]) for n in expected)


@st.composite
def larger_updates(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Up to 6 LoRA-named tensors of up to 64 × 64 normal entries: payloads of up to ~100 KB."""
    shapes = draw(st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return {f"layers.{i // 2}.lora_{'AB'[i % 2]}.weight": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(updates(), larger_updates()), configs, st.data())
def test_any_single_flipped_bit_is_refused(update, config, data):
    payload = bytearray(encode(update, config))
    bit = data.draw(st.integers(0, 8 * len(payload) - 1), label="bit")

    payload[bit // 8] ^= 0x80 >> (bit % 8)

    with pytest.raises(CodecError):
        decode(bytes(payload), layout_of(update))
