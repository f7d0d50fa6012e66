"""The wire format: round trips equal `compress`, sizes equal the layout's formula, hand-built
payloads decode as documented, and every malformed payload (a flipped bit, a truncation, another
layout) is refused with a `CodecError`."""

from __future__ import annotations

import hashlib
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from fedsim.compression import (
    MAX_NUMEL,
    CodecConfig,
    CodecError,
    compress,
    decode,
    encode,
    encoded_size,
    layout_fingerprint,
    layout_of,
    read_header,
)

CONFIGS = {
    "compeft": CodecConfig(),
    "compeft-per-tensor": CodecConfig(per_tensor=True, alpha=0.5),
    "compeft-dense": CodecConfig(density=1.0),
    "compeft-sparse": CodecConfig(density=0.013),
    "topk-fp32": CodecConfig(method="topk", density=0.2),
    "topk-bf16-per-tensor": CodecConfig(method="topk", dtype="bfloat16", per_tensor=True),
    "none-fp32": CodecConfig(method="none"),
    "none-fp16": CodecConfig(method="none", dtype="float16"),
    "none-bf16": CodecConfig(method="none", dtype="bfloat16"),
}


LAYOUT = {"w": (8,)}
# the fingerprint: SHA-256 of name length [H], name, ndim [B], dims [I...], first 8 bytes
FINGERPRINT = hashlib.sha256(struct.pack("<H1sBI", 1, b"w", 1, 8)).digest()[:8]


def header(
    count: int = 1, *, magic=b"CPFT", version=2, method=2, dtype=0, flags=0, density=0.5, scale=1.0, fp=FINGERPRINT
) -> bytes:
    return struct.pack("<4sBBBBdfI8s", magic, version, method, dtype, flags, density, scale, count, fp)


def record(kept: int = 2, code: int = 0, rice: tuple = ()) -> bytes:
    return struct.pack("<IB", kept, code) + (struct.pack("<BI", *rice) if rice else b"")


def sealed(body: bytes) -> bytes:
    """`body` with its CRC-32 trailer, so that a test reaches the checks after the checksum."""
    return body + struct.pack("<I", zlib.crc32(body))


# bitmap 1000_0001 keeps entries 0 and 7; sign bits 01: entry 0 positive, entry 7 negative
BODY = record() + bytes([0b1000_0001]) + bytes([0b0100_0000])
VALID = sealed(header() + BODY)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_of_encode_is_compress_exactly(lora_update, name):
    update, config = lora_update(seed=11), CONFIGS[name]

    out = decode(encode(update, config), layout_of(update))

    expected = compress(update, config)
    assert list(out) == list(expected)
    for n in expected:
        assert out[n].dtype == expected[n].dtype and out[n].shape == expected[n].shape
        assert torch.equal(out[n], expected[n]), n


def test_none_float32_round_trip_is_the_update_bit_for_bit(lora_update):
    update = lora_update(seed=12)
    update["odd"] = torch.tensor([[float("nan"), -0.0], [float("inf"), 1e-45]])

    out = decode(encode(update, CodecConfig(method="none")), layout_of(update))

    assert all(out[n].numpy().tobytes() == update[n].numpy().tobytes() for n in update)


def test_empty_and_zero_size_tensors_round_trip():
    update = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "w": torch.tensor([1.0, -3.0, 0.5])}

    for config in CONFIGS.values():
        out = decode(encode(update, config), layout_of(update))
        assert all(torch.equal(out[n], v) for n, v in compress(update, config).items())
    assert decode(encode({}, CodecConfig()), {}) == {}


def test_a_hand_built_payload_decodes_as_documented():
    out = decode(VALID, LAYOUT)

    assert torch.equal(out["w"], torch.tensor([1.0, 0, 0, 0, 0, 0, 0, -1.0]))
    assert layout_fingerprint(LAYOUT) == FINGERPRINT


def test_tensors_travel_in_name_order_and_come_back_in_the_layouts():
    update = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[3.0]]), "c": torch.zeros(0)}
    backwards = dict(reversed(update.items()))
    config = CodecConfig(method="none")

    payload = encode(update, config)

    assert payload == encode(backwards, config)  # the dict's order does not travel
    assert payload[32:36] == struct.pack("<f", 3.0)  # "a" first
    assert list(decode(payload, layout_of(update))) == ["b", "a", "c"]
    assert list(decode(payload, layout_of(backwards))) == ["c", "a", "b"]
    assert layout_fingerprint(layout_of(update)) == layout_fingerprint(layout_of(backwards))


def test_read_header_reports_the_config(lora_update):
    payload = encode(lora_update(), CodecConfig(method="topk", density=0.25, dtype="float16", per_tensor=True))

    h = read_header(payload)

    assert (h.method, h.dtype, h.per_tensor, h.density, h.scale, h.count) == ("topk", "float16", True, 0.25, 0.0, 8)
    assert h.fingerprint == layout_fingerprint(layout_of(lora_update()))


# --- sizes ---------------------------------------------------------------------------------


def expected_compeft_size(update: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], per_tensor: bool):
    """The layout's formula, from the kept positions (the non-zeros of `sent`, γ > 0)."""
    size, codes = 32 + 4, []  # header, checksum
    for name, tensor in update.items():
        positions = torch.nonzero(sent[name].reshape(-1)).reshape(-1).numpy()
        n, k = tensor.numel(), len(positions)
        g = np.diff(positions, prepend=-1) - 1
        rice = math.ceil(min(int(np.sum(g // 2**b)) + k * (1 + b) for b in range(32)) / 8)
        bitmap = math.ceil(n / 8)
        code = "rice" if rice + 5 < bitmap else "bitmap"
        codes.append(code)
        record_bytes = 4 * per_tensor + 4 + 1  # γ, k, position code: no name, no shape
        positions_bytes = rice + 5 if code == "rice" else bitmap
        size += record_bytes + positions_bytes + math.ceil(k / 8)
    return size, set(codes)


@pytest.mark.parametrize(
    ("density", "per_tensor", "code"),
    [
        (1.0, False, "bitmap"),
        (0.5, False, "bitmap"),
        (0.5, True, "bitmap"),
        (0.01, False, "rice"),
        (0.01, True, "rice"),
    ],
)
def test_compeft_size_is_the_formula(lora_update, density, per_tensor, code):
    update = lora_update(seed=13, hidden=256, kv=256, rank=8)
    config = CodecConfig(density=density, per_tensor=per_tensor)

    payload = encode(update, config)

    size, codes = expected_compeft_size(update, compress(update, config), per_tensor)
    assert codes == {code}
    assert len(payload) == size == encoded_size(update, config)


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_none_and_topk_sizes(lora_update, dtype, itemsize):
    update = lora_update(seed=14)
    n = sum(t.numel() for t in update.values())

    none = encode(update, CodecConfig(method="none", dtype=dtype))
    topk = CodecConfig(method="topk", dtype=dtype, density=1.0)  # every position kept: bitmaps

    assert len(none) == 36 + n * itemsize == encoded_size(update, CodecConfig(method="none", dtype=dtype))
    bitmaps = sum(math.ceil(t.numel() / 8) for t in update.values())
    assert len(encode(update, topk)) == 36 + 5 * len(update) + bitmaps + n * itemsize == encoded_size(update, topk)


def test_the_names_and_shapes_no_longer_travel(lora_update):
    """Version 1 spent 2 + |name| + 1 + 4·ndim bytes per tensor on them; version 2 spends 8 + 4 in all."""
    update = lora_update(seed=15)
    names_and_shapes = sum(2 + len(n.encode()) + 1 + 4 * t.dim() for n, t in update.items())
    n = sum(t.numel() for t in update.values())

    assert len(encode(update, CodecConfig(method="none"))) == 36 + 4 * n
    assert names_and_shapes > 36 * len(update)  # 8 tensors named as PEFT does, ~70 bytes each


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (sealed(header(magic=b"XPFT") + BODY), "magic"),
        (sealed(header(version=3) + BODY), "format version 3 is not supported"),
        (sealed(header(version=1) + BODY), "format version 1 .* is no longer read"),
        (VALID[:-1] + bytes([VALID[-1] ^ 0x80]), "checksum mismatch"),
        (header() + BODY + bytes(4), "checksum mismatch"),
        (sealed(header(method=3) + BODY), "unknown method"),
        (sealed(header(dtype=3) + BODY), "unknown method"),
        (sealed(header(flags=2) + BODY), "flags 0x02"),
        (sealed(header(density=0.0) + BODY), "density"),
        (sealed(header(density=float("nan")) + BODY), "density"),
        (sealed(header(scale=-1.0) + BODY), "scale"),
        (sealed(header(scale=float("inf")) + BODY), "scale"),
        (sealed(header(1000) + BODY), "encoded for 1000 tensors .*, the receiver expects 1 "),
        (sealed(header(fp=bytes(8)) + BODY), "layout mismatch: .* fingerprint 0000000000000000"),
        (sealed(header() + record(kept=9) + bytes(3)), "keeps 9 entries of 8"),
        (sealed(header() + record(kept=2**32 - 1) + bytes(3)), "keeps 4294967295 entries of 8"),
        (sealed(header() + record(code=2) + bytes(2)), "unknown position code 2"),
        (sealed(header() + record(code=1, rice=(40, 1)) + bytes(2)), "Rice parameter 40"),
        (sealed(header() + BODY + b"\x00"), "1 trailing bytes"),
        (sealed(header() + record() + bytes([0b1100_0001, 0b0100_0000])), "marks 3 entries"),
        (sealed(header() + record() + bytes([0b1000_0001, 0b0100_0001])), "sign bits: padding"),
        (sealed(header() + record(code=1, rice=(0, 2)) + bytes([0, 0b0000_0011, 0])), "gap beyond the tensor"),
        (sealed(header(method=0) + bytes(31)), "truncated payload: tensor 'w''s values"),
        (sealed(header() + record()[:3]), "truncated payload: tensor 'w''s kept count"),
        (VALID[:35], "truncated payload: 35 bytes"),
        (b"CPF", "truncated payload"),
        (b"", "truncated payload"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload, match):
    with pytest.raises(CodecError, match=match):
        decode(payload, LAYOUT)


def test_a_version_1_payload_is_refused_by_name():
    """What version 1 sent: the tensor's name and shape in its record, no checksum (here a 44-byte
    payload that claimed 2**31 entries: a receiver decoding it allocated 8 GiB)."""
    v1 = struct.pack("<4sBBBBdfI", b"CPFT", 1, 2, 0, 0, 0.5, 1.0, 1) + struct.pack("<H1sBI", 1, b"w", 1, 2**31)
    v1 += struct.pack("<IBBI", 0, 1, 0, 0)

    with pytest.raises(CodecError, match="format version 1 \\(names and shapes in every payload, no checksum\\)"):
        decode(v1, {"w": (2**31,)})


def small_payloads() -> list[bytes]:
    update = {"a": torch.tensor([[0.3, -1.2, 0.0], [2.0, -0.1, 0.7]]), "bias": torch.linspace(-1, 1, 40)}
    configs = ["compeft", "compeft-sparse", "compeft-per-tensor", "topk-bf16-per-tensor", "none-fp16"]
    return [encode(update, CONFIGS[name]) for name in configs]


@pytest.mark.parametrize("payload", small_payloads(), ids=lambda p: f"{len(p)}B")
def test_every_single_bit_flip_is_refused(payload):
    layout = {"a": (2, 3), "bias": (40,)}
    assert decode(payload, layout).keys() == layout.keys()

    for bit in range(8 * len(payload)):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        with pytest.raises(CodecError):
            decode(bytes(flipped), layout)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ({"w": (9,)}, "encoded for 1 tensors .*, the receiver expects 1 "),  # another shape
        ({"v": (8,)}, "encoded for 1 tensors .*, the receiver expects 1 "),  # another name
        ({"w": (8,), "v": (8,)}, "encoded for 1 tensors .*, the receiver expects 2 "),
        ({}, "encoded for 1 tensors .*, the receiver expects 0 "),
    ],
)
def test_a_payload_for_another_layout_is_refused(layout, match):
    with pytest.raises(CodecError, match="layout mismatch: the payload was encoded for"):
        decode(VALID, layout)
    with pytest.raises(CodecError, match=match):
        decode(VALID, layout)


def test_an_update_for_another_rank_is_refused(lora_update):
    payload = encode(lora_update(rank=4), CodecConfig())

    with pytest.raises(CodecError, match="layout mismatch: the payload was encoded for 8 tensors"):
        decode(payload, layout_of(lora_update(rank=3)))
    with pytest.raises(CodecError, match="the receiver expects 4 "):
        decode(payload, dict(list(layout_of(lora_update(rank=4)).items())[:4]))


@pytest.mark.parametrize("name", ["compeft", "compeft-sparse", "topk-bf16-per-tensor", "none-fp16"])
def test_every_truncation_is_refused(name):
    update = {"a": torch.tensor([[0.3, -1.2, 0.0], [2.0, -0.1, 0.7]]), "bias": torch.linspace(-1, 1, 40)}
    payload = encode(update, CONFIGS[name])

    for length in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:length], layout_of(update))


def test_the_layout_is_required(lora_update):
    payload = encode(lora_update(), CodecConfig())

    with pytest.raises(TypeError, match="layout"):
        decode(payload)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="max_numel"):
        decode(payload, max_numel=MAX_NUMEL)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("layout", "error", "match"),
    [
        ({"w": (2**31, 2)}, ValueError, "more than the codec's"),
        ({"w": (2**32,)}, ValueError, "each in \\[0, 2\\*\\*32\\)"),
        ({"w": (1,) * 65}, ValueError, "at most 64 dims"),
        ({"w": torch.zeros(8)}, TypeError, "a shape"),
        ({1: (8,)}, ValueError, "a name is a str"),
        ([("w", (8,))], TypeError, "a mapping of name"),
    ],
)
def test_a_bad_layout_is_the_callers_error(layout, error, match):
    with pytest.raises(error, match=match):
        decode(VALID, layout)


def test_a_payload_must_be_bytes():
    with pytest.raises(TypeError, match="payload is bytes"):
        decode("CPFT", LAYOUT)  # type: ignore[arg-type]
