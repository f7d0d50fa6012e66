"""Tiny LoRA-shaped updates for the compression tests, built here and seeded."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def make_lora_update(
    seed: int = 0, layers: int = 2, hidden: int = 24, kv: int = 8, rank: int = 4
) -> dict[str, torch.Tensor]:
    """A (B, A) pair per q/v projection per layer, PEFT-named, normal with std 0.01."""
    g = torch.Generator().manual_seed(seed)
    update = {}
    for layer in range(layers):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            update[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.01  # (r, in)
            update[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01  # (out, r)
    return update


@pytest.fixture
def lora_update() -> Callable[..., dict[str, torch.Tensor]]:
    return make_lora_update
