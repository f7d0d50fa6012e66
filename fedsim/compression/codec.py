"""The wire format of a compressed update: `encode` to bytes, `decode` back to `compress(update)`.

ComPEFT (Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization", arXiv:2311.13171) sends, per tensor, the positions of the kept
entries, one sign bit each, and the scale γ once (rule: `fedsim.compression.methods`). This module
lays that out as bytes; `decode(encode(x, c), layout_of(x)) == compress(x, c)` exactly, tensor for
tensor.

Both ends know the adapter's layout (its tensors' names and shapes), so names and shapes do not
travel: the payload carries an 8-byte fingerprint of the layout, and the receiver decodes against
the layout it expects, refusing a payload of any other. Tensors travel in the layout's canonical
order, sorted by name (UTF-8 bytes), whatever the order of the update's dict, so neither end needs
the other's dict order; `decode` returns them in the order of the layout it was given.

Wire layout, little-endian throughout (`struct` format in brackets), in this order:

    header   magic b"CPFT" [4s], version [B] = 2, method [B] (0 none, 1 topk, 2 compeft),
             dtype [B] (0 float32, 1 float16, 2 bfloat16), flags [B] (bit 0: per_tensor),
             density [d], γ [f] (whole-update compeft, else 0), tensor count [I],
             layout fingerprint [8s]                                                     32 bytes
    then per tensor, in canonical order, for topk/compeft a record followed by its body
    (for none, the body alone):
    record   γ [f] (per-tensor compeft only), kept count k [I], position code [B] (0 bitmap,
             1 rice), and for rice: Rice parameter b [B], rice code length in bytes [I]
    body     none     numel × itemsize bytes: the values in dtype
             topk     positions, then k × itemsize bytes: the kept values in dtype
             compeft  positions, then ⌈k/8⌉ bytes: one sign bit per kept entry, set = negative
             positions: a bitmap of ⌈numel/8⌉ bytes or a Rice code of the gaps, whichever makes
             the tensor shorter (Rice's 5 record bytes counted; a tie goes to the bitmap), see
             `fedsim.compression.positions`
    trailer  CRC-32 [I] (`zlib.crc32`) of every byte before it                           4 bytes

The layout fingerprint is the first 8 bytes of SHA-256 over, per tensor in canonical order, name
length [H], name (UTF-8), ndim [B], dims [ndim × I] (what version 1 sent in every record).

So a whole-update compeft payload is exactly
    36 + Σ_t [5 + (5 if rice) + positions_t + ⌈k_t/8⌉] bytes,
per-tensor compeft adds 4 bytes (γ) per tensor, topk sends k_t × itemsize in place of ⌈k_t/8⌉,
none is 36 + Σ_t numel_t × itemsize, and `encoded_size` returns that without building the bodies.

`decode(payload, layout)` checks, in this order: magic and version (version 1 is refused with its
own message), length, the checksum (it catches every error confined to 32 consecutive bits, so
every flipped bit, and a random corruption but for a chance of about 2⁻³²), the header's fields,
the tensor count and fingerprint against `layout`'s; then it parses every record (lengths checked
against the bytes left, counts against the layout's numel) before it allocates any tensor, and
checks each body (bitmap popcount, Rice stream, padding bits, positions < numel). The layout
bounds what it allocates: the layout's tensors and at most their numel positions, whatever the
payload says. Any malformed payload raises `CodecError` with the reason; nothing else escapes.
"""

from __future__ import annotations

import hashlib
import math
import operator
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.compression.errors import CodecError
from fedsim.compression.methods import (
    DTYPES,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_NUMEL,
    METHODS,
    CodecConfig,
    Sparse,
    Update,
    cast_to,
    check_update,
    densify,
    name_bytes,
    sparsify,
)
from fedsim.compression.positions import (
    MAX_RICE_PARAMETER,
    bitmap_decode,
    bitmap_encode,
    bitmap_nbytes,
    gaps,
    pack_bits,
    rice_decode,
    rice_encode,
    rice_nbytes,
    rice_parameter,
    unpack_bits,
)

MAGIC = b"CPFT"
VERSION = 2
BITMAP, RICE = 0, 1
DTYPE_NAMES = tuple(DTYPES)  # wire id = index
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_NUMPY: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2")}

Layout = Mapping[str, tuple[int, ...]]  # tensor name → shape

_PREFIX = struct.Struct("<4sB")  # magic, version: read before anything else
_HEADER = struct.Struct("<4sBBBBdfI8s")
_CRC = struct.Struct("<I")
_FINGERPRINT_BYTES = 8
_SCALE = struct.Struct("<f")
_KEPT = struct.Struct("<IB")  # kept count, position code
_RICE = struct.Struct("<BI")  # Rice parameter, code length
OVERHEAD = _HEADER.size + _CRC.size  # bytes of every payload besides its tensors: 36


@dataclass(frozen=True)
class Header:
    """The fixed header of a payload: how it was compressed, and for which layout."""

    method: str
    dtype: str
    per_tensor: bool
    density: float
    scale: float  # γ for whole-update compeft, else 0
    count: int  # tensors
    fingerprint: bytes  # the layout's (8 bytes, `layout_fingerprint`)


# --- layouts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One tensor of a layout, validated, with its canonical record (what the fingerprint hashes)."""

    name: str
    shape: tuple[int, ...]
    record: bytes  # name length [H], name, ndim [B], dims [ndim × I]


def layout_of(adapter: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The layout (name → shape, in `adapter`'s order) that `decode` needs to read an update of
    `adapter`'s tensors."""
    return {name: tuple(tensor.shape) for name, tensor in adapter.items()}


def layout_fingerprint(layout: Layout) -> bytes:
    """The 8-byte fingerprint of `layout` (module docstring); the order of `layout` is irrelevant.
    ValueError or TypeError where `layout` is not one the codec can carry."""
    return _fingerprint(_entries(layout))


def _fingerprint(entries: list[_Entry]) -> bytes:
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.record)
    return digest.digest()[:_FINGERPRINT_BYTES]


def _entries(layout: Layout) -> list[_Entry]:
    """`layout`'s tensors in canonical order (sorted by UTF-8 name), each checked: a str name of
    at most `MAX_NAME_BYTES` bytes, a tuple shape of ≤ `MAX_NDIM` ints in [0, 2**32), at most
    `MAX_NUMEL` entries in all. A bad layout is the caller's error: TypeError or ValueError."""
    if not isinstance(layout, Mapping):
        raise TypeError(f"a layout is a mapping of name → shape (`layout_of(adapter)`), got {type(layout).__name__}")
    entries, total = [], 0
    for name, shape in layout.items():
        encoded = name_bytes(name)
        if encoded is None:
            raise ValueError(f"layout name {name!r}: a name is a str of at most {MAX_NAME_BYTES} bytes of UTF-8")
        dims = _shape(name, shape)
        total += math.prod(dims)
        record = struct.pack(f"<H{len(encoded)}sB{len(dims)}I", len(encoded), encoded, len(dims), *dims)
        entries.append(_Entry(name, dims, record))
    if total > MAX_NUMEL:
        raise ValueError(f"the layout has {total} entries, more than the codec's {MAX_NUMEL}")
    return sorted(entries, key=lambda e: e.name)  # code point order = UTF-8 byte order


def _shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list):
        raise TypeError(f"layout[{name!r}] must be a shape (a tuple of ints), got {type(shape).__name__}")
    dims = tuple(operator.index(d) for d in shape)
    if len(dims) > MAX_NDIM or not all(0 <= d < 2**32 for d in dims):
        raise ValueError(f"layout[{name!r}] = {dims}: at most {MAX_NDIM} dims, each in [0, 2**32)")
    return dims


# --- encode --------------------------------------------------------------------------------


def encode(update: Mapping[str, torch.Tensor], config: CodecConfig) -> bytes:
    """`update` compressed under `config`, as bytes (layout in the module docstring); the
    receiver decodes it with `decode(payload, layout_of(update))`."""
    check_update(update)
    entries = _entries(layout_of(update))
    if config.method == "none":
        parts = [_header(config, entries, 0.0)]
        parts += [_raw(cast_to(e.name, update[e.name], config.dtype)) for e in entries]
        return _sealed(parts)
    kept = sparsify(update, config)
    parts = [_header(config, entries, _whole_scale(kept, config))]
    for entry in entries:
        sparse = kept[entry.name]
        code, b, positions = _positions(sparse)
        parts += [_sparse_record(sparse, config, code, b, len(positions)), positions, _values(sparse)]
    return _sealed(parts)


def encoded_size(update: Mapping[str, torch.Tensor], config: CodecConfig) -> int:
    """`len(encode(update, config))`, from the code lengths, without packing any body."""
    if config.method == "none":
        check_update(update)
        return OVERHEAD + sum(t.numel() * ITEMSIZE[config.dtype] for t in update.values())
    size = OVERHEAD
    for sparse in sparsify(update, config).values():
        code, b, nbytes = _position_code(sparse)
        k = len(sparse.positions)
        values = (k + 7) // 8 if config.method == "compeft" else k * ITEMSIZE[config.dtype]
        size += len(_sparse_record(sparse, config, code, b, nbytes)) + nbytes + values
    return size


def _header(config: CodecConfig, entries: list[_Entry], scale: float) -> bytes:
    method, dtype, flags = METHODS.index(config.method), DTYPE_NAMES.index(config.dtype), int(config.per_tensor)
    fp = _fingerprint(entries)
    return _HEADER.pack(MAGIC, VERSION, method, dtype, flags, config.density, scale, len(entries), fp)


def _sealed(parts: list[bytes]) -> bytes:
    """`parts` joined, with the CRC-32 trailer."""
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def _whole_scale(kept: dict[str, Sparse], config: CodecConfig) -> float:
    if config.method != "compeft" or config.per_tensor or not kept:
        return 0.0
    return next(iter(kept.values())).scale  # one γ for the whole update


def _sparse_record(sparse: Sparse, config: CodecConfig, code: int, b: int, nbytes: int) -> bytes:
    scale = _SCALE.pack(sparse.scale) if config.method == "compeft" and config.per_tensor else b""
    rice = _RICE.pack(b, nbytes) if code == RICE else b""
    return scale + _KEPT.pack(len(sparse.positions), code) + rice


def _position_code(sparse: Sparse) -> tuple[int, int, int]:
    """(code, Rice parameter, bytes) of the shorter position code, counting the 5 bytes a Rice
    code adds to the record (parameter and length); a tie goes to the bitmap."""
    bitmap = bitmap_nbytes(math.prod(sparse.shape))
    g = gaps(sparse.positions)
    b = rice_parameter(g)
    rice = rice_nbytes(g, b)
    return (RICE, b, rice) if rice + _RICE.size < bitmap else (BITMAP, 0, bitmap)


def _positions(sparse: Sparse) -> tuple[int, int, bytes]:
    code, b, _ = _position_code(sparse)
    if code == RICE:
        return code, b, rice_encode(sparse.positions, b)
    return code, b, bitmap_encode(sparse.positions, math.prod(sparse.shape))


def _values(sparse: Sparse) -> bytes:
    if sparse.values is None:
        return pack_bits(sparse.negative)
    return _raw(sparse.values)


def _raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy().tobytes()


# --- decode --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    name: str
    shape: tuple[int, ...]
    scale: float
    kept: int
    code: int
    rice_parameter: int
    positions: memoryview
    body: memoryview


class _Reader:
    """A cursor over the payload whose every read is checked against the bytes left."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.at = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left:
            raise CodecError(f"truncated payload: {what} needs {n} bytes at offset {self.at}, {self.left} left")
        self.at += n
        return self.data[self.at - n : self.at]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def read_header(payload: bytes | bytearray | memoryview) -> Header:
    """The validated fixed header of `payload` (e.g. to check a client used the agreed config),
    its checksum verified; `CodecError` as `decode`."""
    return _read_header(_Reader(_verified(_view(payload))))


def decode(payload: bytes | bytearray | memoryview, layout: Layout) -> Update:
    """The update `payload` encodes, its tensors named and shaped by `layout` (name → shape, the
    adapter the receiver expects, e.g. `layout_of(expected)`) and in its order.

    `CodecError` with the reason if the payload is malformed in any way or was encoded for another
    layout; the layout bounds what is allocated (module docstring). A bad `layout` itself is the
    caller's error (TypeError or ValueError)."""
    data = _view(payload)
    entries = _entries(layout)
    reader = _Reader(_verified(data))
    header = _read_header(reader)
    _check_layout(header, entries)
    records = [_read_record(reader, header, entry) for entry in entries]
    if reader.left:
        raise CodecError(f"{reader.left} trailing bytes after the last tensor")
    tensors = {record.name: _decode_body(record, header) for record in records}
    return {name: tensors[name] for name in layout}


def _view(payload: bytes | bytearray | memoryview) -> memoryview:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"a payload is bytes, got {type(payload).__name__}")
    return memoryview(payload).cast("B")


def _verified(data: memoryview) -> memoryview:
    """`data` without its trailer, once its magic, version, length and checksum are right."""
    if len(data) >= _PREFIX.size:
        magic, version = _PREFIX.unpack(data[: _PREFIX.size])
        if magic != MAGIC:
            raise CodecError(f"not a compressed update: magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version == 1:
            raise CodecError(
                f"format version 1 (names and shapes in every payload, no checksum) is no longer read: this decoder "
                f"reads version {VERSION}; encode with the same fedsim on both ends"
            )
        if version != VERSION:
            raise CodecError(f"format version {version} is not supported (this decoder reads {VERSION})")
    if len(data) < OVERHEAD:
        raise CodecError(f"truncated payload: {len(data)} bytes, less than the header and checksum's {OVERHEAD}")
    body, (stored,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if (computed := zlib.crc32(body)) != stored:
        raise CodecError(
            f"checksum mismatch: the trailer says CRC-32 {stored:#010x}, the {len(body)} bytes before it give "
            f"{computed:#010x} (a corrupted or truncated payload)"
        )
    return body


def _read_header(reader: _Reader) -> Header:
    magic, version, method, dtype, flags, density, scale, count, fp = reader.unpack(_HEADER, "the header")
    if method >= len(METHODS) or dtype >= len(DTYPE_NAMES) or flags & ~1:
        raise CodecError(f"unknown method {method}, dtype {dtype} or flags {flags:#04x} in the header")
    if not 0 < density <= 1:
        raise CodecError(f"density {density} outside (0, 1]")
    _check_scale(scale, "header")
    return Header(METHODS[method], DTYPE_NAMES[dtype], bool(flags & 1), density, scale, count, bytes(fp))


def _check_scale(scale: float, where: str) -> None:
    if not 0 <= scale < math.inf:
        raise CodecError(f"scale γ = {scale} in the {where} is not a finite number ≥ 0")


def _check_layout(header: Header, entries: list[_Entry]) -> None:
    expected = _fingerprint(entries)
    if header.count != len(entries) or header.fingerprint != expected:
        raise CodecError(
            f"layout mismatch: the payload was encoded for {header.count} tensors (layout fingerprint "
            f"{header.fingerprint.hex()}), the receiver expects {len(entries)} (fingerprint {expected.hex()})"
        )


def _read_record(reader: _Reader, header: Header, entry: _Entry) -> _Record:
    """One tensor's record, its body located but not decoded."""
    where, numel = f"tensor {entry.name!r}", math.prod(entry.shape)
    if header.method == "none":
        body = reader.take(numel * ITEMSIZE[header.dtype], f"{where}'s values")
        return _Record(entry.name, entry.shape, 0.0, numel, BITMAP, 0, reader.data[:0], body)
    scale = header.scale
    if header.method == "compeft" and header.per_tensor:
        (scale,) = reader.unpack(_SCALE, f"{where}'s scale")
        _check_scale(scale, f"{where}'s record")
    kept, code = reader.unpack(_KEPT, f"{where}'s kept count")
    if kept > numel:
        raise CodecError(f"{where} keeps {kept} entries of {numel}")
    b, nbytes = reader.unpack(_RICE, f"{where}'s Rice code") if code == RICE else (0, bitmap_nbytes(numel))
    if code not in (BITMAP, RICE) or b > MAX_RICE_PARAMETER:
        raise CodecError(f"{where}: unknown position code {code} or Rice parameter {b} > {MAX_RICE_PARAMETER}")
    positions = reader.take(nbytes, f"{where}'s positions")
    values = (kept + 7) // 8 if header.method == "compeft" else kept * ITEMSIZE[header.dtype]
    return _Record(entry.name, entry.shape, scale, kept, code, b, positions, reader.take(values, f"{where}'s values"))


def _decode_body(record: _Record, header: Header) -> torch.Tensor:
    if header.method == "none":
        return _tensor(record.body, header.dtype).reshape(record.shape)
    n, k = math.prod(record.shape), record.kept
    if record.code == RICE:
        positions = rice_decode(record.positions, n, k, record.rice_parameter)
    else:
        positions = bitmap_decode(record.positions, n, k)
    if header.method == "compeft":
        negative = unpack_bits(record.body, k, what=f"{record.name!r}'s sign bits")
        return densify(Sparse(record.shape, positions, negative, None, record.scale))
    values = _tensor(record.body, header.dtype)
    return densify(Sparse(record.shape, positions, (values < 0).numpy(), values, 0.0))


def _tensor(data: memoryview, dtype: str) -> torch.Tensor:
    """(len / itemsize,) tensor of `dtype` read from little-endian `data` (a copy)."""
    flat = torch.from_numpy(np.frombuffer(data, dtype=_NUMPY[dtype]).copy())
    return flat.view(torch.bfloat16) if dtype == "bfloat16" else flat
