"""Models and keeps the pruning tests share."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedsim.pruning.structure import Keep

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A small Llama: 3 layers, 8 query heads in 4 KV groups of 2, head_dim 8, 96 channels: a group
# is 3072 weights, a channel 192.
DIMS = dict(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    intermediate_size=96,
    tie_word_embeddings=True,
)

# A per-layer (non-uniform) keep of tiny-llama: 2 layers, 2 KV groups of 2 heads, head_dim 16,
# 176 channels; a layer is 46080 prunable weights.
TINY_KEEP = Keep(
    groups=((1,), (0, 1)),
    channels=((3, 50, 175), tuple(range(0, 176, 2))),
    num_groups=(2, 2),
    num_channels=(176, 176),
    group_size=2,
    head_dim=16,
)


def small_llama(seed: int = 0) -> torch.nn.Module:
    """The DIMS model, seeded, in eval mode (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
