"""The wire format of a compressed update: `encode` to bytes, `decode` back to `compress(update)`.

ComPEFT (Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization", arXiv:2311.13171) sends, per tensor, the positions of the kept
entries, one sign bit each, and the scale γ once (rule: `fedsim.compression.methods`). This module
lays that out as bytes; `decode(encode(x, c)) == compress(x, c)` exactly, tensor for tensor.

Layout, little-endian throughout (`struct` format in brackets), in this order:

    header  magic b"CPFT" [4s], version [B] = 1, method [B] (0 none, 1 topk, 2 compeft),
            dtype [B] (0 float32, 1 float16, 2 bfloat16), flags [B] (bit 0: per_tensor),
            density [d], γ [f] (whole-update compeft, else 0), tensor count [I]      24 bytes
    then per tensor, in the update's order, a record followed by its body:
    record  name length [H], name (UTF-8), ndim [B], dims [ndim × I], and for topk/compeft:
            γ [f] (per-tensor compeft only), kept count k [I], position code [B] (0 bitmap,
            1 rice), and for rice: Rice parameter b [B], rice code length in bytes [I]
    body    none     numel × itemsize bytes: the values in dtype
            topk     positions, then k × itemsize bytes: the kept values in dtype
            compeft  positions, then ⌈k/8⌉ bytes: one sign bit per kept entry, set = negative
            positions: a bitmap of ⌈numel/8⌉ bytes or a Rice code of the gaps, whichever makes
            the tensor shorter (Rice's 5 record bytes counted; a tie goes to the bitmap), see
            `fedsim.compression.positions`

So a whole-update compeft payload is exactly
    24 + Σ_t [2 + |name_t| + 1 + 4·ndim_t + 5 + (5 if rice) + positions_t + ⌈k_t/8⌉] bytes,
and `encoded_size` returns that without building the bodies.

`decode` parses every record (lengths checked against the bytes left, counts against numel,
numel against `max_numel`) before it allocates any tensor, then checks each body (bitmap
popcount, Rice stream, padding bits, positions < numel). Any malformed payload raises
`CodecError` with the reason; nothing else escapes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.compression.errors import CodecError
from fedsim.compression.methods import (
    DTYPES,
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
VERSION = 1
BITMAP, RICE = 0, 1
DTYPE_NAMES = tuple(DTYPES)  # wire id = index
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_NUMPY: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2")}

_HEADER = struct.Struct("<4sBBBBdfI")
_NAME_LEN = struct.Struct("<H")
_NDIM = struct.Struct("<B")
_SCALE = struct.Struct("<f")
_KEPT = struct.Struct("<IB")  # kept count, position code
_RICE = struct.Struct("<BI")  # Rice parameter, code length
_MIN_RECORD = _NAME_LEN.size + _NDIM.size


@dataclass(frozen=True)
class Header:
    """The fixed header of a payload: how it was compressed."""

    method: str
    dtype: str
    per_tensor: bool
    density: float
    scale: float  # γ for whole-update compeft, else 0
    count: int  # tensors


# --- encode --------------------------------------------------------------------------------


def encode(update: Mapping[str, torch.Tensor], config: CodecConfig) -> bytes:
    """`update` compressed under `config`, as bytes (layout in the module docstring)."""
    if config.method == "none":
        check_update(update)
        parts = [_header(config, len(update), 0.0)]
        for name, tensor in update.items():
            parts += [_record(name, tuple(tensor.shape)), _raw(cast_to(name, tensor, config.dtype))]
        return b"".join(parts)
    kept = sparsify(update, config)
    parts = [_header(config, len(kept), _whole_scale(kept, config))]
    for name, sparse in kept.items():
        code, b, positions = _positions(sparse)
        parts += [_sparse_record(name, sparse, config, code, b, len(positions)), positions, _values(sparse)]
    return b"".join(parts)


def encoded_size(update: Mapping[str, torch.Tensor], config: CodecConfig) -> int:
    """`len(encode(update, config))`, from the code lengths, without packing any body."""
    if config.method == "none":
        check_update(update)
        itemsize = ITEMSIZE[config.dtype]
        return _HEADER.size + sum(len(_record(n, tuple(t.shape))) + t.numel() * itemsize for n, t in update.items())
    size = _HEADER.size
    for name, sparse in sparsify(update, config).items():
        code, b, nbytes = _position_code(sparse)
        k = len(sparse.positions)
        values = (k + 7) // 8 if config.method == "compeft" else k * ITEMSIZE[config.dtype]
        size += len(_sparse_record(name, sparse, config, code, b, nbytes)) + nbytes + values
    return size


def _header(config: CodecConfig, count: int, scale: float) -> bytes:
    method, dtype = METHODS.index(config.method), DTYPE_NAMES.index(config.dtype)
    return _HEADER.pack(MAGIC, VERSION, method, dtype, int(config.per_tensor), config.density, scale, count)


def _whole_scale(kept: dict[str, Sparse], config: CodecConfig) -> float:
    if config.method != "compeft" or config.per_tensor or not kept:
        return 0.0
    return next(iter(kept.values())).scale  # one γ for the whole update


def _record(name: str, shape: tuple[int, ...]) -> bytes:
    encoded = name_bytes(name)
    assert encoded is not None  # check_update has vetted every name
    return _NAME_LEN.pack(len(encoded)) + encoded + _NDIM.pack(len(shape)) + struct.pack(f"<{len(shape)}I", *shape)


def _sparse_record(name: str, sparse: Sparse, config: CodecConfig, code: int, b: int, nbytes: int) -> bytes:
    scale = _SCALE.pack(sparse.scale) if config.method == "compeft" and config.per_tensor else b""
    rice = _RICE.pack(b, nbytes) if code == RICE else b""
    return _record(name, sparse.shape) + scale + _KEPT.pack(len(sparse.positions), code) + rice


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
    """The validated fixed header of `payload` (e.g. to check a client used the agreed config)."""
    return _read_header(_Reader(_view(payload)))


def decode(payload: bytes | bytearray | memoryview, *, max_numel: int = MAX_NUMEL) -> Update:
    """The update `payload` encodes; `CodecError` with the reason if it is malformed in any way.

    `max_numel` caps the entries of all tensors together (at most the format's 2**31); a server
    that knows the adapter's size should pass it, so a payload cannot make it allocate more."""
    if not 0 <= max_numel <= MAX_NUMEL:
        raise ValueError(f"`max_numel` must be in [0, {MAX_NUMEL}], got {max_numel}")
    reader = _Reader(_view(payload))
    header = _read_header(reader)
    if header.count > reader.left // _MIN_RECORD:
        raise CodecError(f"header declares {header.count} tensors, but only {reader.left} bytes follow it")
    records: list[_Record] = []
    names: set[str] = set()
    for index in range(header.count):
        records.append(record := _read_record(reader, header, index, names, max_numel))
        names.add(record.name)
        max_numel -= math.prod(record.shape)
    if reader.left:
        raise CodecError(f"{reader.left} trailing bytes after the last tensor")
    return {record.name: _decode_body(record, header) for record in records}


def _view(payload: bytes | bytearray | memoryview) -> memoryview:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"a payload is bytes, got {type(payload).__name__}")
    return memoryview(payload).cast("B")


def _read_header(reader: _Reader) -> Header:
    magic, version, method, dtype, flags, density, scale, count = reader.unpack(_HEADER, "the header")
    if magic != MAGIC:
        raise CodecError(f"not a compressed update: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"format version {version} is not supported (this decoder reads {VERSION})")
    if method >= len(METHODS) or dtype >= len(DTYPE_NAMES) or flags & ~1:
        raise CodecError(f"unknown method {method}, dtype {dtype} or flags {flags:#04x} in the header")
    if not 0 < density <= 1:
        raise CodecError(f"density {density} outside (0, 1]")
    _check_scale(scale, "header")
    return Header(METHODS[method], DTYPE_NAMES[dtype], bool(flags & 1), density, scale, count)


def _check_scale(scale: float, where: str) -> None:
    if not 0 <= scale < math.inf:
        raise CodecError(f"scale γ = {scale} in the {where} is not a finite number ≥ 0")


def _read_record(reader: _Reader, header: Header, index: int, names: set[str], budget: int) -> _Record:
    """One tensor's record, its body located but not decoded; `budget`: entries still allowed."""
    where = f"tensor {index}"
    (name_len,) = reader.unpack(_NAME_LEN, f"{where}'s name length")
    try:
        name = str(reader.take(name_len, f"{where}'s name"), "utf-8")
    except UnicodeDecodeError as e:
        raise CodecError(f"{where}'s name is not UTF-8: {e.reason}") from None
    if name in names:
        raise CodecError(f"tensor {name!r} appears twice")
    where = f"tensor {index} ({name!r})"
    (ndim,) = reader.unpack(_NDIM, f"{where}'s ndim")
    if ndim > MAX_NDIM:
        raise CodecError(f"{where} has {ndim} dims, more than {MAX_NDIM}")
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, f"{where}'s shape"))
    numel = math.prod(shape)
    if numel > budget:
        raise CodecError(f"counts overflow: {where} of shape {shape} has {numel} entries, {budget} left of max_numel")
    if header.method == "none":
        body = reader.take(numel * ITEMSIZE[header.dtype], f"{where}'s values")
        return _Record(name, shape, 0.0, numel, BITMAP, 0, reader.data[:0], body)
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
    return _Record(name, shape, scale, kept, code, b, positions, reader.take(values, f"{where}'s values"))


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
