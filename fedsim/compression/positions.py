"""Position codes: which flat indices of a tensor a sparse update keeps, and packed flag bits.

ComPEFT (Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization", arXiv:2311.13171) sends the positions and signs of the kept
entries. A tensor of n entries keeping k sorted flat indices p_0 < … < p_{k−1} sends its positions
in one of two codes (the codec picks the shorter, see `fedsim.compression.codec`):

    bitmap  ⌈n/8⌉ bytes; bit i (most significant bit of each byte first) is set iff i is kept.
    rice    a Golomb–Rice code of the gaps g_j = p_j − p_{j−1} − 1 (p_{−1} = −1), so g_j ≥ 0.
            With parameter b, g = q·2^b + r: q in unary (q zero bits, then a one), r in b bits,
            most significant first. All k unary codes come first, then all k remainders, so both
            halves decode with vectorised NumPy: the j-th one bit ends the j-th unary code, and the
            remainders have a fixed width. Zero bits pad the stream to a whole byte.
            Size: bits(b) = Σ_j ⌊g_j / 2^b⌋ + k·(1 + b) bits, ⌈bits(b)/8⌉ bytes.

The Rice parameter starts from b₀ = max(0, ⌊log₂(ln 2 · mean gap)⌋), the usual choice for
geometric gaps (Gallager & Van Voorhis, 1975), and then moves to the exact minimiser of bits(b):
bits(b) − bits(b+1) = Σ_j ⌈⌊g_j/2^b⌋ / 2⌉ − k does not increase with b, so bits(b) is convex and
a walk downhill from b₀ ends at the global minimum (the smallest such b on a tie).

Signs (and any other per-entry flags) are packed eight to a byte, in the same bit order, with
zero padding. Decoders check everything a stream could get wrong (length, padding, counts,
positions beyond the tensor) and raise `CodecError`.
"""

from __future__ import annotations

import math

import numpy as np

from fedsim.compression.errors import CodecError

MAX_RICE_PARAMETER = 31  # gaps are < 2**31 (MAX_NUMEL), so a larger b never helps


# --- flag bits -----------------------------------------------------------------------------


def pack_bits(flags: np.ndarray) -> bytes:
    """`flags` (k,) bool → ⌈k/8⌉ bytes, first flag in the most significant bit, zero padded."""
    return np.packbits(np.asarray(flags, dtype=bool)).tobytes()


def unpack_bits(data: bytes | memoryview, count: int, what: str = "flag bits") -> np.ndarray:
    """Inverse of `pack_bits`: (count,) bool. The length must be ⌈count/8⌉ and the padding zero."""
    if len(data) != (count + 7) // 8:
        raise CodecError(f"{what}: {len(data)} bytes for {count} bits, expected {(count + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[count:].any():
        raise CodecError(f"{what}: padding bits after bit {count} are not zero")
    return bits[:count].astype(bool)


# --- bitmap --------------------------------------------------------------------------------


def bitmap_nbytes(n: int) -> int:
    return (n + 7) // 8


def bitmap_encode(positions: np.ndarray, n: int) -> bytes:
    """Sorted flat `positions` (k,) of a tensor of `n` entries → ⌈n/8⌉ bytes."""
    bits = np.zeros(n, dtype=bool)
    bits[positions] = True
    return pack_bits(bits)


def bitmap_decode(data: bytes | memoryview, n: int, k: int) -> np.ndarray:
    """⌈n/8⌉ bytes → the (k,) int64 positions they mark; exactly `k` bits must be set."""
    bits = unpack_bits(data, n, what="position bitmap")
    positions = np.flatnonzero(bits)
    if len(positions) != k:
        raise CodecError(f"position bitmap marks {len(positions)} entries, the header says {k}")
    return positions


# --- Golomb–Rice gaps ----------------------------------------------------------------------


def gaps(positions: np.ndarray) -> np.ndarray:
    """g_j = p_j − p_{j−1} − 1 with p_{−1} = −1: (k,) int64, all ≥ 0 for increasing positions."""
    p = np.asarray(positions, dtype=np.int64)
    return np.diff(p, prepend=np.int64(-1)) - 1


def rice_bits(g: np.ndarray, b: int) -> int:
    """Length in bits of the Rice code of gaps `g` with parameter `b` (before byte padding)."""
    return int(np.sum(g >> b)) + len(g) * (1 + b)


def rice_parameter(g: np.ndarray) -> int:
    """The b minimising `rice_bits(g, b)`, found by walking downhill from the geometric estimate."""
    if len(g) == 0:
        return 0
    mean = float(np.mean(g))
    b = max(0, math.floor(math.log2(mean * math.log(2)))) if mean * math.log(2) >= 1 else 0
    b = min(b, MAX_RICE_PARAMETER)
    cost = rice_bits(g, b)
    while b > 0 and (lower := rice_bits(g, b - 1)) <= cost:
        b, cost = b - 1, lower
    while b < MAX_RICE_PARAMETER and (higher := rice_bits(g, b + 1)) < cost:
        b, cost = b + 1, higher
    return b


def rice_nbytes(g: np.ndarray, b: int) -> int:
    return (rice_bits(g, b) + 7) // 8


def rice_encode(positions: np.ndarray, b: int) -> bytes:
    """Sorted flat `positions` (k,) → the Rice code of their gaps with parameter `b`."""
    g = gaps(positions)
    q = g >> b
    unary_len = int(np.sum(q)) + len(g)
    bits = np.zeros(unary_len + len(g) * b, dtype=np.uint8)
    bits[np.cumsum(q + 1) - 1] = 1  # the one that ends each unary code
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)  # most significant remainder bit first
        bits[unary_len:] = ((g[:, None] >> shifts) & 1).reshape(-1)
    return np.packbits(bits).tobytes()


def rice_decode(data: bytes | memoryview, n: int, k: int, b: int) -> np.ndarray:
    """The Rice code of `k` gaps with parameter `b` → (k,) int64 positions, each < `n`."""
    if not 0 <= b <= MAX_RICE_PARAMETER:
        raise CodecError(f"Rice parameter {b} outside [0, {MAX_RICE_PARAMETER}]")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(bits) < k * (1 + b):
        raise CodecError(f"Rice code: {len(data)} bytes cannot hold {k} gaps with parameter {b}")
    if k == 0:
        if len(data):
            raise CodecError(f"Rice code of 0 gaps has {len(data)} bytes, expected 0")
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(bits[: len(bits) - k * b])[:k]  # the ones that end the unary codes
    if len(ends) < k:
        raise CodecError(f"Rice code holds fewer than the {k} gaps the header declares")
    unary_len = int(ends[-1]) + 1
    total = unary_len + k * b
    if len(data) != (total + 7) // 8 or bits[total:].any():
        raise CodecError(f"Rice code: {len(data)} bytes for {total} bits, or padding bits not zero")
    q = np.diff(ends, prepend=np.int64(-1)) - 1
    if int(q.max()) > (n >> b):  # keeps q << b well inside int64 before the exact check below
        raise CodecError(f"Rice code has a gap beyond the tensor's {n} entries")
    r = np.zeros(k, dtype=np.int64)
    if b:
        weights = np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64)
        r = bits[unary_len:total].reshape(k, b).astype(np.int64) @ weights
    g = (q << b) + r
    if int(g.max()) >= n:  # so the sum below stays < k·n ≤ 2**62
        raise CodecError(f"Rice code has a gap beyond the tensor's {n} entries")
    positions = np.cumsum(g + 1) - 1
    if int(positions[-1]) >= n:
        raise CodecError(f"Rice code puts position {int(positions[-1])} beyond the tensor's {n} entries")
    return positions
