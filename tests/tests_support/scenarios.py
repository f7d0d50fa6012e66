"""The tiny scenario, and the overrides that make an in-process federation of it take seconds."""

from __future__ import annotations

from pathlib import Path

TINY = Path(__file__).resolve().parents[2] / "scenarios" / "tiny.toml"
QUICK = [
    "data.central_test_size=8", "eval.max_new_tokens=2", "eval.client_examples=2", "clients.eval_per_round=1",
    "train.local_steps=2",
]  # fmt: skip
