"""A client's update in the coordinates the server sums: the global adapter's, at r_max and the
unpruned shape (the update space of `fedsim.privacy`).

    Δ'_k = scatter(pad(fold(Δ_k, s_k, s_g), r_max), keep_k)

fold: every `lora_B` tensor times s_k / s_g (`clipping.folded`); pad: A (r_k, in) gets zero rows and
B (out, r_k) zero columns up to r_max; scatter: a pruned client's slice goes back to the unpruned
shape, zeros where it kept nothing (`fedsim.pruning.slicing.scatter_adapter`). Padding and
scattering add only zeros, so ‖Δ'_k‖₂ = ‖fold(Δ_k, s_k, s_g)‖₂: the norm the client clipped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsim.privacy.clipping import Update, folded
from fedsim.pruning.slicing import scatter_adapter
from fedsim.pruning.structure import Keep


def update_rank(update: Mapping[str, torch.Tensor]) -> int:
    """r_k, read from the first LoRA factor of `update` (A: its rows, B: its columns)."""
    for name in sorted(update):
        if ".lora_A." in name:
            return int(update[name].shape[0])
        if ".lora_B." in name and name.endswith(".weight"):
            return int(update[name].shape[1])
    raise ValueError(f"the update holds no LoRA factor: {sorted(update)[:3]}")


def to_global(
    update: Mapping[str, torch.Tensor],
    scale: float,
    global_scale: float,
    like: Mapping[str, torch.Tensor],
    keep: Keep | None = None,
) -> Update:
    """`update` (scaling s_k = `scale`, sliced by `keep` if the client pruned) in the coordinates of
    `like` (names and shapes of the zero update at r_max, unpruned); ValueError when it names other
    tensors or a shape does not fit."""
    if set(update) != set(like):
        raise ValueError(
            f"the update names other tensors than the global adapter: {sorted(set(update) ^ set(like))[:3]}"
        )
    padded = {
        name: _pad_rank(name, t, tuple(like[name].shape)) for name, t in folded(update, scale, global_scale).items()
    }
    out = scatter_adapter(padded, keep, {k: v.shape for k, v in like.items()})[0] if keep is not None else padded
    for name, t in out.items():
        if t.shape != like[name].shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(like[name].shape)}")
    return out


def _pad_rank(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A (r_k, in) with zero rows, B (out, r_k) with zero columns, to the rank of `shape`; others as they are."""
    if ".lora_A." in name and t.ndim == 2 and t.shape[0] < shape[0]:
        return torch.cat([t, t.new_zeros(shape[0] - t.shape[0], t.shape[1])], dim=0)
    if ".lora_B." in name and name.endswith(".weight") and t.ndim == 2 and t.shape[1] < shape[1]:
        return torch.cat([t, t.new_zeros(t.shape[0], shape[1] - t.shape[1])], dim=1)
    return t
