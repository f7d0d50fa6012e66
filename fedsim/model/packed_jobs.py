"""What the packed trainer (`fedsim.model.packed`) is given and gives back, and how it sizes a pack.

- `PackedJob`: one client's local training, everything `train_lora` takes, with the adapter it
  received as a state dict (PEFT names, the client's rank r_k, s_k = α / r_k) instead of a model.
- `JobResult`: `train_lora`'s `TrainResult` and the trained adapter, or the reason the job failed.
- `token_bytes`, `job_bytes`, `available_bytes`: how much memory a pack needs (estimate below), and has.
- `check_job`: why a job cannot be packed (`PackedTrainer.can_pack`).

Memory of a pack of K jobs (bytes), with W the largest `max_len` among them (no row is wider):

    Σ_k batch_size_k · W · (token_bytes + 4 · r_k · n_k)  +  Σ_k 24 · P_k  +  Σ_k 4 · |Δ_k|

with n_k the layers job k adapts at rank r_k (4 · r_k · n_k: the float32 x·Aᵀ each keeps per
token), 24 bytes per LoRA parameter P_k (the factor, its gradient, AdamW's two moments, FedProx's
anchor) and |Δ_k| the elements of its merged base deltas. `token_bytes` (w bytes per weight, d
hidden, m MLP channels, q = heads·head_dim, kv = kv_heads·head_dim, h heads, V vocabulary, L layers):

    token_bytes = w · L · (4d + 2q + 2kv + h + 4m + 2)  +  V · (w + 4·[w < 4] + 12)  +  (d + 1) · w + 8

The first term is `fedsim.fleet.costs`'s per-layer activations (what autograd saves under SDPA
attention) with every tensor live and every linear adapted, an upper bound for any targets; the
second the vocabulary-sized tensors of the loss, the largest of a step: the logits (w), their
float32 copy when w < 4, the saved log-probabilities, and during backward their gradient and the
logits' gradient (3 · 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from fedsim.model.adapter import BASE_DELTA, AdapterState, split_state
from fedsim.model.rowlora import LORA_A, LORA_B
from fedsim.model.training import TrainResult

Regulariser = Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]
STATE_BYTES_PER_PARAM = 24  # factor, gradient, AdamW exp_avg and exp_avg_sq, FedProx anchor (float32 each)


@dataclass(frozen=True)
class PackedJob:
    """One client's local training, as `train_lora` runs it on a model holding `state`."""

    key: int  # the caller's id for the job (its client id); unique in a call, orders the packs
    state: AdapterState  # LoRA A/B per adapted layer at rank r_k (PEFT names), plus any `.base_delta`s
    scale: float  # s_k = α / r_k, PEFT's scaling of this rank
    examples: Sequence[dict[str, str]]
    steps: int
    batch_size: int
    max_len: int
    lr: float
    weight_decay: float
    grad_clip: float
    seed: int  # of the batch order (`fedsim.model.training.batch_order`)
    freeze: str = ""  # factors not trained: "A" for FFA-LoRA
    proximal_mu: float = 0.0  # FedProx's μ/2·‖θ − θ₀‖², θ₀ the trainable factors as received
    regulariser: Regulariser | None = None  # added to every step's objective; gets the (A, B) pairs in layer order
    step_flops: Callable[[int, int], float] | None = None  # `train_lora`'s: FLOPs of a (batch, seq_len) step


@dataclass(frozen=True)
class JobResult:
    """A job's outcome: `result` and `state` when it trained, else `error` says why it did not."""

    key: int
    result: TrainResult | None = None
    state: AdapterState | None = None  # the trained LoRA tensors (float32, CPU), keys as received
    error: str | None = None

    def unwrap(self) -> tuple[TrainResult, AdapterState]:
        """(result, state), or raises `PackedJobError` with the job's error."""
        if self.error is not None or self.result is None or self.state is None:
            raise PackedJobError(f"packed job {self.key} failed: {self.error}")
        return self.result, self.state


class PackedJobError(RuntimeError):
    """A packed job that did not train; the message names the job and the reason."""


def token_bytes(config: PretrainedConfig, weight_bytes: int) -> int:
    """Peak bytes per token of a packed training step (module docstring), for a decoder config."""
    c = config.get_text_config()
    d, m, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    q, kv = heads * head_dim, (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    layer = 4 * d + 2 * q + 2 * kv + heads + 4 * m + 2
    loss = vocab * (weight_bytes + 4 * (weight_bytes < 4) + 12)
    return weight_bytes * layers * layer + loss + (d + 1) * weight_bytes + 8


def job_bytes(job: PackedJob, width: int, per_token: int) -> int:
    """What `job` adds to a pack whose rows are `width` tokens wide (module docstring)."""
    factors = [v for k, v in job.state.items() if k.endswith(LORA_A)]
    lora = sum(v.numel() for k, v in job.state.items() if not k.endswith(BASE_DELTA))
    deltas = sum(v.numel() for k, v in job.state.items() if k.endswith(BASE_DELTA))
    rank_bytes = 4 * sum(A.shape[0] for A in factors)  # per token: x·Aᵀ of every adapted layer
    return job.batch_size * width * (per_token + rank_bytes) + STATE_BYTES_PER_PARAM * lora + 4 * deltas


def available_bytes(device: torch.device) -> int:
    """90 % of the memory free on `device` now (CPU: of /proc/meminfo's MemAvailable; unknown: 2⁶²)."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 2**62  # no way to tell: only `max_clients_per_step` bounds a pack
    return int(0.9 * 1024 * kib)


def check_job(job: PackedJob, linears: Mapping[str, torch.nn.Linear], half: bool) -> str | None:
    """Why `job` cannot train in a pack over a base adapted at `linears` (half: its weights are not
    float32), or None: every problem found, joined by "; "."""
    problems = [p for p in (_check_fields(job), _check_state(job.state, linears, half)) if p]
    return "; ".join(problems) or None


def _check_fields(job: PackedJob) -> str | None:
    problems = []
    if not job.examples:
        problems.append("no examples")
    for name in ("steps", "batch_size", "max_len"):
        if getattr(job, name) < 1:
            problems.append(f"`{name}` must be >= 1, got {getattr(job, name)}")
    if not set(job.freeze) <= set("AB") or set(job.freeze) == set("AB"):
        problems.append(f"`freeze` must be '', 'A' or 'B', got {job.freeze!r}")
    if not (math.isfinite(job.scale) and job.scale > 0):
        problems.append(f"`scale` must be finite and > 0, got {job.scale}")
    if any(not k.endswith((LORA_A, LORA_B, BASE_DELTA)) for k in job.state):
        problems.append("the state holds tensors other than LoRA factors and base deltas")
    return "; ".join(problems) or None


def _check_state(state: AdapterState, linears: Mapping[str, torch.nn.Linear], half: bool) -> str | None:
    adapter, deltas = split_state(state)
    expected = {prefix + suffix for prefix in linears for suffix in (LORA_A, LORA_B)}
    if set(adapter) != expected:
        missing, unexpected = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
        return f"adapter keys do not match the shared model: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for prefix, linear in linears.items():
        A, B = adapter[prefix + LORA_A], adapter[prefix + LORA_B]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
            return f"`{prefix}`: A {tuple(A.shape)} and B {tuple(B.shape)} are not a LoRA pair"
        if (B.shape[0], A.shape[1]) != (linear.out_features, linear.in_features):
            return (
                f"`{prefix}`: the adapter is (out, in) = {(B.shape[0], A.shape[1])}, the shared base's "
                f"layer {(linear.out_features, linear.in_features)} (a pruned client trains alone)"
            )
    for prefix, delta in deltas.items():
        if prefix not in linears:
            return f"base delta for `{prefix}`, which is not an adapted layer"
        if half:
            return "base deltas on a half-precision base are computed in float32 alone (`apply_base_delta`)"
        if tuple(delta.shape) != tuple(linears[prefix].weight.shape):
            return f"base delta for `{prefix}` has shape {tuple(delta.shape)}"
    return None
