"""Position codes: bitmap and Golomb–Rice round trips, the Rice bit layout, the optimal parameter,
and the decoders' refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.compression import CodecError
from fedsim.compression.positions import (
    bitmap_decode,
    bitmap_encode,
    gaps,
    pack_bits,
    rice_bits,
    rice_decode,
    rice_encode,
    rice_parameter,
    unpack_bits,
)


def patterns() -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    return {
        "empty": (np.zeros(0, dtype=np.int64), 10),
        "all": (np.arange(13), 13),
        "first": (np.array([0]), 9),
        "last": (np.array([99]), 100),
        "sparse": (np.sort(rng.choice(5000, 50, replace=False)), 5000),
        "dense": (np.sort(rng.choice(300, 200, replace=False)), 300),
        "clustered": (np.concatenate([np.arange(10, 20), np.arange(4000, 4004)]), 4096),
    }


def brute_force_rice_bits(g: np.ndarray, b: int) -> int:
    return sum(int(x) // 2**b + 1 + b for x in g)


@pytest.mark.parametrize("name", list(patterns()))
def test_bitmap_round_trip(name):
    positions, n = patterns()[name]

    data = bitmap_encode(positions, n)

    assert len(data) == math.ceil(n / 8)
    assert np.array_equal(bitmap_decode(data, n, len(positions)), positions)


@pytest.mark.parametrize("b", range(0, 12))
@pytest.mark.parametrize("name", list(patterns()))
def test_rice_round_trip_and_length(name, b):
    positions, n = patterns()[name]

    data = rice_encode(positions, b)

    assert len(data) == math.ceil(brute_force_rice_bits(gaps(positions), b) / 8)
    assert np.array_equal(rice_decode(data, n, len(positions), b), positions)


def test_rice_bit_layout():
    # gaps 0, 2, 0, 7 with b = 1: q = 0, 1, 0, 3 → unary 1 01 1 0001; r = 0, 0, 0, 1 → 0 0 0 1
    data = rice_encode(np.array([0, 3, 4, 12]), 1)

    assert data == bytes([0b1011_0001, 0b0001_0000])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 2**20), max_size=60))
def test_rice_parameter_is_the_exact_minimum(gap_list):
    g = np.array(gap_list, dtype=np.int64)

    b = rice_parameter(g)

    costs = [brute_force_rice_bits(g, c) for c in range(32)]
    assert rice_bits(g, b) == min(costs) and b == costs.index(min(costs))


def test_flag_bits_round_trip():
    flags = np.array([True, False, True, True, False, False, False, True, True])

    data = pack_bits(flags)

    assert data == bytes([0b1011_0001, 0b1000_0000])
    assert np.array_equal(unpack_bits(data, 9), flags)


@pytest.mark.parametrize(
    ("decode", "match"),
    [
        (lambda: unpack_bits(bytes([0b1000_0001]), 7), "padding bits"),
        (lambda: unpack_bits(bytes(2), 7), "2 bytes for 7 bits"),
        (lambda: bitmap_decode(bytes([0b1100_0000]), 8, 1), "marks 2 entries, the header says 1"),
        (lambda: bitmap_decode(bytes([0b0000_0001]), 7, 0), "padding bits"),
        (lambda: rice_decode(bytes([0b0001_0000]), 100, 2, 0), "fewer than the 2 gaps"),
        (lambda: rice_decode(bytes([0b1000_0000, 0]), 100, 1, 0), "padding bits not zero"),
        (lambda: rice_decode(bytes([0b1000_0001]), 100, 1, 0), "padding bits not zero"),
        (lambda: rice_decode(bytes([0b0000_0001]), 5, 1, 0), "beyond the tensor"),
        (lambda: rice_decode(bytes([0b1100_0000]), 1, 2, 0), "beyond the tensor"),
        (lambda: rice_decode(bytes([0b1000_0000]), 5, 0, 0), "0 gaps has 1 bytes"),
        (lambda: rice_decode(bytes([0b1000_0000]), 5, 1, 32), "Rice parameter 32"),
        (lambda: rice_decode(bytes([0xFF]), 2**31, 3, 5), "cannot hold 3 gaps"),
    ],
)
def test_decoders_refuse_bad_streams(decode, match):
    with pytest.raises(CodecError, match=match):
        decode()
