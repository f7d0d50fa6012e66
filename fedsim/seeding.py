"""Seeds derived from the scenario seed, so that every random draw depends on *what* is drawn
(round, client, purpose) and never on the order in which Ray happens to run clients."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for `parts` under `seed`, stable across processes and Python versions
    (unlike `hash()`, which is salted per process)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
