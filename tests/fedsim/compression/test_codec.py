"""The wire format: round trips equal `compress`, sizes equal the layout's formula, hand-built
payloads decode as documented, and every malformed payload is refused with a `CodecError`."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from fedsim.compression import MAX_NUMEL, CodecConfig, CodecError, compress, decode, encode, encoded_size, read_header

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


def header(count: int, *, magic=b"CPFT", version=1, method=2, dtype=0, flags=0, density=0.5, scale=1.0) -> bytes:
    return struct.pack("<4sBBBBdfI", magic, version, method, dtype, flags, density, scale, count)


def record(name: bytes = b"w", shape: tuple[int, ...] = (8,), kept: int = 2, code: int = 0, rice: tuple = ()) -> bytes:
    head = struct.pack("<H", len(name)) + name + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
    return head + struct.pack("<IB", kept, code) + (struct.pack("<BI", *rice) if rice else b"")


# bitmap 1000_0001 keeps entries 0 and 7; sign bits 01: entry 0 positive, entry 7 negative
VALID = header(1) + record() + bytes([0b1000_0001]) + bytes([0b0100_0000])


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_of_encode_is_compress_exactly(lora_update, name):
    update, config = lora_update(seed=11), CONFIGS[name]

    out = decode(encode(update, config))

    expected = compress(update, config)
    assert list(out) == list(expected)
    for n in expected:
        assert out[n].dtype == expected[n].dtype and out[n].shape == expected[n].shape
        assert torch.equal(out[n], expected[n]), n


def test_none_float32_round_trip_is_the_update_bit_for_bit(lora_update):
    update = lora_update(seed=12)
    update["odd"] = torch.tensor([[float("nan"), -0.0], [float("inf"), 1e-45]])

    out = decode(encode(update, CodecConfig(method="none")))

    assert all(out[n].numpy().tobytes() == update[n].numpy().tobytes() for n in update)


def test_empty_and_zero_size_tensors_round_trip():
    update = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "w": torch.tensor([1.0, -3.0, 0.5])}

    for config in CONFIGS.values():
        out = decode(encode(update, config))
        assert all(torch.equal(out[n], v) for n, v in compress(update, config).items())
    assert decode(encode({}, CodecConfig())) == {}


def test_a_hand_built_payload_decodes_as_documented():
    out = decode(VALID)

    assert torch.equal(out["w"], torch.tensor([1.0, 0, 0, 0, 0, 0, 0, -1.0]))


def test_read_header_reports_the_config(lora_update):
    payload = encode(lora_update(), CodecConfig(method="topk", density=0.25, dtype="float16", per_tensor=True))

    h = read_header(payload)

    assert (h.method, h.dtype, h.per_tensor, h.density, h.scale, h.count) == ("topk", "float16", True, 0.25, 0.0, 8)


# --- sizes ---------------------------------------------------------------------------------


def expected_compeft_size(update: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], per_tensor: bool):
    """The layout's formula, from the kept positions (the non-zeros of `sent`, γ > 0)."""
    size, codes = 24, []
    for name, tensor in update.items():
        positions = torch.nonzero(sent[name].reshape(-1)).reshape(-1).numpy()
        n, k = tensor.numel(), len(positions)
        g = np.diff(positions, prepend=-1) - 1
        rice = math.ceil(min(int(np.sum(g // 2**b)) + k * (1 + b) for b in range(32)) / 8)
        bitmap = math.ceil(n / 8)
        code = "rice" if rice + 5 < bitmap else "bitmap"
        codes.append(code)
        record_bytes = 2 + len(name.encode()) + 1 + 4 * tensor.dim() + 4 * per_tensor + 4 + 1
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
    records = sum(2 + len(n.encode()) + 1 + 4 * t.dim() for n, t in update.items())
    n = sum(t.numel() for t in update.values())

    none = encode(update, CodecConfig(method="none", dtype=dtype))
    topk = CodecConfig(method="topk", dtype=dtype, density=1.0)  # every position kept: bitmaps

    assert len(none) == 24 + records + n * itemsize == encoded_size(update, CodecConfig(method="none", dtype=dtype))
    bitmaps = sum(math.ceil(t.numel() / 8) for t in update.values())
    assert len(encode(update, topk)) == 24 + records + 5 * len(update) + bitmaps + n * itemsize


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (header(1, magic=b"XPFT") + VALID[24:], "magic"),
        (header(1, version=2) + VALID[24:], "format version 2"),
        (header(1, method=3) + VALID[24:], "unknown method"),
        (header(1, dtype=3) + VALID[24:], "unknown method"),
        (header(1, flags=2) + VALID[24:], "flags 0x02"),
        (header(1, density=0.0) + VALID[24:], "density"),
        (header(1, density=float("nan")) + VALID[24:], "density"),
        (header(1, scale=-1.0) + VALID[24:], "scale"),
        (header(1, scale=float("inf")) + VALID[24:], "scale"),
        (header(1000) + VALID[24:], "declares 1000 tensors"),
        (header(1) + record(kept=9) + bytes(3), "keeps 9 entries of 8"),
        (header(1) + record(shape=(2**31, 2)), "counts overflow"),
        (header(1) + record(shape=(2**32 - 1,) * 3), "counts overflow"),
        (header(2) + VALID[24:] + record(b"v", shape=(2**31,)), "counts overflow"),
        (header(1) + record(shape=(1,) * 65), "65 dims"),
        (header(1) + record(code=2) + bytes(2), "unknown position code 2"),
        (header(1) + record(code=1, rice=(40, 1)) + bytes(2), "Rice parameter 40"),
        (header(2) + VALID[24:] * 2, "appears twice"),
        (header(1) + record(name=b"\xff") + VALID[-2:], "not UTF-8"),
        (VALID + b"\x00", "1 trailing bytes"),
        (header(1) + record() + bytes([0b1100_0001, 0b0100_0000]), "marks 3 entries"),
        (header(1) + record() + bytes([0b1000_0001, 0b0100_0001]), "sign bits: padding"),
        (header(1) + record(code=1, rice=(0, 2)) + bytes([0, 0b0000_0011, 0]), "gap beyond the tensor"),
        (header(1, method=0) + record()[:8] + bytes(31), "truncated payload: tensor 0 \\('w'\\)'s values"),
        (b"CPF", "truncated payload: the header"),
        (b"", "truncated payload: the header"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload, match):
    with pytest.raises(CodecError, match=match):
        decode(payload)


@pytest.mark.parametrize("name", ["compeft", "compeft-sparse", "topk-bf16-per-tensor", "none-fp16"])
def test_every_truncation_is_refused(name):
    update = {"a": torch.tensor([[0.3, -1.2, 0.0], [2.0, -0.1, 0.7]]), "bias": torch.linspace(-1, 1, 40)}
    payload = encode(update, CONFIGS[name])

    for length in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:length])


def test_max_numel_caps_what_a_payload_may_allocate(lora_update):
    update = lora_update()
    n = sum(t.numel() for t in update.values())
    payload = encode(update, CodecConfig())

    assert len(decode(payload, max_numel=n)) == len(update)
    with pytest.raises(CodecError, match="counts overflow"):
        decode(payload, max_numel=n - 1)
    with pytest.raises(ValueError, match="max_numel"):
        decode(payload, max_numel=MAX_NUMEL + 1)


def test_a_payload_must_be_bytes():
    with pytest.raises(TypeError, match="payload is bytes"):
        decode("CPFT")  # type: ignore[arg-type]
