"""Per-row LoRA: many clients' adapters on one frozen base, each applied to its own rows of a batch.

A packed batch stacks K clients' rows, client k owning the contiguous rows [o_k, o_k + n_k). On every
target linear y = x Wᵀ the client's own factors are added to its own rows only:

    y[o_k : o_k + n_k] = x_k Wᵀ + s_k · (x_k A_kᵀ) B_kᵀ  (+ x_k Δ_kᵀ with a merged base delta Δ_k)

with A_k (r_k, in), B_k (out, r_k) at the client's own rank and s_k = α / r_k, the same products in
the same order as PEFT's `lora.Linear.forward` (`lora_B(lora_A(x)) * scaling`, the input cast to the
factors' dtype, added to the base output in that dtype, the sum cast back to the base's). Rows never
mix in a decoder (attention, norms and MLP act within a row), so client k's loss depends only on its
own factors and a sum of per-client losses back-propagates to each client exactly the gradient of
its own loss.

Why not PEFT's own mixed-adapter batches (`model(..., adapter_names=[...])`, `lora.Linear.
_mixed_batch_forward`): PEFT 0.21 refuses them in training mode (`LoraModel._enable_peft_forward_hooks`
raises "Cannot pass `adapter_names` when the model is in training mode."); they are an inference
feature. Running them in eval mode to get past the check would (i) silently drop LoRA dropout that a
training model applies, (ii) need one named adapter per client added to and deleted from the shared
model per job, each made trainable by hand (`set_adapter` trains only one), and (iii) gather and
scatter every adapter's rows with Python index lists on every layer (`x[idx]`, `result[idx] += ...`).
Here rows are contiguous, so one `split` and one `cat` per layer suffice, and when every client has as
many rows as the others the K products run as two batched matmuls (ranks zero-padded to the largest,
which adds exact zeros).

The factors live outside the model, so the model is left as it was: `applied` installs forward
hooks on the target linears for one forward pass and removes them. On a `PeftModel` the hooks go on
each LoRA layer's `base_layer`, and `adapters_off` silences PEFT's own adapters meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import peft
import torch
import torch.nn.functional as F

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # PEFT state-dict key suffixes
PEFT_PREFIX = "base_model.model."  # what PEFT puts before a plain model's module names
Hook = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Segment:
    """One client's rows of a packed batch and what its target linears add to them."""

    rows: int  # n_k, contiguous, in the order segments are given
    scale: float  # s_k = α / r_k
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # layer prefix → (A (r, in), B (out, r))
    deltas: Mapping[str, torch.Tensor] = field(default_factory=dict)  # layer prefix → merged base delta (out, in)


def target_linears(model: torch.nn.Module, targets: Sequence[str] = ()) -> dict[str, torch.nn.Linear]:
    """The linears LoRA adapts, keyed by the prefix of their PEFT state-dict names, in module order.

    A `PeftModel`: each LoRA layer's `base_layer` (`targets` ignored). A plain model: the linears whose
    short name is in `targets`, keyed as PEFT would name them (``base_model.model.<module name>``)."""
    if isinstance(model, peft.PeftModel):
        return {
            name: module.base_layer
            for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer) and isinstance(module.base_layer, torch.nn.Linear)
        }
    return {
        PEFT_PREFIX + name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """PEFT's LoRA layers compute their base layer alone inside the block (no-op on a plain model).

    Sets each layer's disable flag directly: PEFT's `disable_adapter()` re-enables through
    `set_adapter`, which makes the active adapter trainable again and so undoes a frozen factor."""
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, flag in zip(layers, saved, strict=True):
            m._disable_adapters = flag


@contextlib.contextmanager
def applied(linears: Mapping[str, torch.nn.Linear], segments: Sequence[Segment]) -> Iterator[None]:
    """Inside the block, each of `linears` adds every segment's LoRA (and base delta) to its rows."""
    handles = [linear.register_forward_hook(_hook(prefix, segments)) for prefix, linear in linears.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(prefix: str, segments: Sequence[Segment]) -> Hook:
    pairs = [s.factors[prefix] for s in segments]
    deltas = [s.deltas.get(prefix) for s in segments]
    rows = [s.rows for s in segments]
    scales = [s.scale for s in segments]
    batched = len(set(rows)) == 1 and all(d is None for d in deltas)

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (N, T, in), N = Σ n_k
        if sum(rows) != x.shape[0]:
            raise ValueError(f"`{prefix}` got {x.shape[0]} rows, the segments cover {sum(rows)}")
        lora = _batched(x, pairs, scales) if batched else _looped(x, pairs, scales, deltas, rows)
        return (out + lora).to(out.dtype)  # summed in the factors' dtype, as PEFT sums

    return hook


def _looped(
    x: torch.Tensor,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scales: Sequence[float],
    deltas: Sequence[torch.Tensor | None],
    rows: Sequence[int],
) -> torch.Tensor:
    """Σ over segments, one pair of matmuls each: s_k (x_k A_kᵀ) B_kᵀ (+ x_k Δ_kᵀ), (N, T, out)."""
    parts = []
    for x_k, (A, B), s, delta in zip(x.split(list(rows)), pairs, scales, deltas, strict=True):
        x_k = x_k.to(A.dtype)
        part = F.linear(F.linear(x_k, A), B) * s  # (n_k, T, out)
        parts.append(part if delta is None else part + F.linear(x_k, delta.to(A.dtype)))
    return torch.cat(parts)


def _batched(
    x: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], scales: Sequence[float]
) -> torch.Tensor:
    """The same with K equal segments as two bmm's, ranks zero-padded to r = max r_k: (N, T, out)."""
    r = max(A.shape[0] for A, _ in pairs)
    A = torch.stack([F.pad(A, (0, 0, 0, r - A.shape[0])) if A.shape[0] < r else A for A, _ in pairs])  # (K, r, in)
    B = torch.stack([F.pad(B, (0, r - B.shape[1])) if B.shape[1] < r else B for _, B in pairs])  # (K, out, r)
    s = torch.tensor(scales, dtype=A.dtype, device=A.device)[:, None, None]  # (K, 1, 1)
    n, t, fan_in = x.shape
    x_k = x.to(A.dtype).reshape(len(pairs), -1, fan_in)  # (K, n_k·T, in)
    y = torch.bmm(torch.bmm(x_k, A.transpose(1, 2)), B.transpose(1, 2)) * s  # (K, n_k·T, out)
    return y.reshape(n, t, -1)
