"""The aggregation math of federated LoRA, per adapted layer, for every strategy fedsim runs.

A client k sends, per layer, A_k (r_k, in) and B_k (out, r_k) trained with scaling s_k (PEFT's
``lora_alpha / r``, or ``/ sqrt(r)`` under rsLoRA); its update is ΔW_k = s_k B_k A_k. Weights p_k
are normalised here to Σ_k p_k = 1 (the caller passes n_k, or ones). The *ideal* update is

    ΔW* = Σ_k p_k s_k B_k A_k                                                  (`weighted_product`)

Scaling normalisation (all strategies). With mixed ranks the clients' scalings differ, so averaging
raw B_k would weight the updates by 1/s_k. Every function that returns global factors (A, B) folds
each client's scaling into its B relative to the global adapter's scaling s_g (the caller's
``alpha / r_max``; by default the clients' common scaling, an error when they differ):

    B'_k = (s_k / s_g) B_k,   so that   s_g B'_k A_k = s_k B_k A_k,

and the global adapter, used with scaling s_g, carries s_g·B·A. Heterogeneous ranks are aligned by
zero-padding to r_max (rows of A, columns of B), which leaves B_k A_k unchanged.

Mixed ranks. A rank-r_k client receives the first r_k ranks of the global adapter (A_g, B_g) and
holds nothing beyond them. Two readings of its reply (`RANK_PADDINGS`):

- "zeros": its missing ranks are zeros it holds. Every rule below on zero-padded factors; the
  ideal update is ΔW* = Σ_k p_k s_k B_k A_k. A round in which every client returns what it was sent
  shrinks rank j of the global adapter by the weight share of the clients that hold it (HetLoRA
  does this on purpose; FlexLoRA's mean of full products does it too).
- "holders": a client moves only what it holds. Each rank coordinate of the factors is averaged
  over the clients that hold it (the pruning masks' `fill_uncovered`, with ranks as coverage), and
  the ideal update is the global product moved by the weighted mean of each client's change from
  the truncation it received (`update_stack`):

      ΔW* = s_g B_g A_g + Σ_k p_k (s_k B_k A_k − s_g B_g[:, :r_k] A_g[:r_k, :]).

  With every r_k = r_max both readings agree; a client that returns what it was sent moves nothing.

Rules, each on the folded, padded factors:

- FedIT (Zhang et al., 2024, "Towards Building the Federated GPT", arXiv:2305.05644):
  A = Σ p_k A_k, B = Σ p_k B'_k. Biased: s_g B A ≠ ΔW* (`aggregation_bias`).
- HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
  Models", arXiv:2401.06432): as FedIT with sparsity weights p_k ∝ w_k ‖s_k B_k A_k‖_F (w_k = 1 is
  the paper's rule); client k gets the global factors truncated to r_k and trains with the penalty
  λ ‖B[:, ⌊γ r_k⌋:r_k] A[⌊γ r_k⌋:r_k, :]‖_F on its tail ranks (`hetlora_rank_penalty`).
- FlexLoRA (Bai et al., 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous
  Tasks and Client Resources", arXiv:2402.11505): ΔW* = U Σ Vᵀ; client k gets the rank-r_k truncated
  SVD split as the paper does, B_k = U_r Σ_r / s_k, A_k = V_rᵀ, so s_k B_k A_k = U_r Σ_r V_rᵀ, the best
  rank-r_k approximation (Eckart–Young). A's rows stay orthonormal, so a rank whose singular value
  is near zero still trains (its B column gets the gradient G V_r). The SVD is taken from QRs of
  the stacked factors (`product_svd`), never of the dense out × in matrix.
- FLoRA (Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
  Low-Rank Adaptations", arXiv:2409.05976): A = [A_1; …; A_K], B = [p_1 s_1 B_1, …, p_K s_K B_K],
  so B A = ΔW* exactly (scaling 1); the server merges it into the base weights (`merge_into_base`)
  and clients start a fresh adapter.
- FFA-LoRA (Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning",
  arXiv:2403.12313): A is frozen and shared, B = Σ p_k B'_k; exact because ΔW is linear in B.
- FedSA-LoRA (Guo et al., 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
  Learning", arXiv:2410.01463): A = Σ p_k A_k is shared; each client keeps its own B.
- FedEx-LoRA (Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
  Fine-Tuning of Foundation Models", arXiv:2410.09432): FedIT's (A, B) plus the residual
  ΔW* − s_g B A, folded into the frozen base so base + residual + s_g B A = base + ΔW*.
- LoRA-FAIR (Bian et al., 2024, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
  Initialization Refinement", arXiv:2411.14961): FedIT's (Ā, B̄), then B̄ + ΔB with
  ΔB = argmin (1 − cos(ΔW*, s_g (B̄ + ΔB) Ā)) + λ ‖ΔB‖_F.

Everything here is pure: tensors in, new tensors out; inputs are never modified.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

RANK_PADDINGS = ("holders", "zeros")  # how a reply's missing ranks are read (module docstring)

_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


# --- state dicts ---------------------------------------------------------------------------


def layer_pairs(state: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Layer prefix → (A key, B key) for PEFT names ``<prefix>.lora_A[.<adapter>].weight``.

    Keys that are not LoRA factors are ignored; a factor without its partner is a ValueError.
    """
    found: dict[str, dict[str, str]] = {}
    for key in state:
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        slot = found.setdefault(match["prefix"], {})
        if match["factor"] in slot:
            raise ValueError(f"`{key}` and `{slot[match['factor']]}` are both lora_{match['factor']} of one layer")
        slot[match["factor"]] = key
    for prefix, slot in found.items():
        if len(slot) == 1:
            (have, key), missing = next(iter(slot.items())), "B" if "A" in slot else "A"
            raise ValueError(
                f"`{key}` has no matching `{prefix}.lora_{missing}.weight` (lora_{have} without lora_{missing})"
            )
    return {prefix: (slot["A"], slot["B"]) for prefix, slot in found.items()}


def apply_per_layer(
    states: Sequence[Mapping[str, Tensor]],
    fn: Callable[[list[Tensor], list[Tensor]], tuple[Tensor, Tensor]],
) -> dict[str, Tensor]:
    """{A key: A, B key: B} with (A, B) = fn([A_k], [B_k]) for every layer of ``states[0]``.

    Bind scales, weights and the rule with a lambda, e.g.
    ``apply_per_layer(states, lambda As, Bs: fedit(As, Bs, scales, weights, r_max, s_g=s_g))``.
    """
    out: dict[str, Tensor] = {}
    for prefix, (a_key, b_key) in layer_pairs(states[0]).items():
        for k, state in enumerate(states):
            if a_key not in state or b_key not in state:
                raise ValueError(f"client {k} has no `{a_key}`/`{b_key}` pair (layer `{prefix}`)")
        out[a_key], out[b_key] = fn([s[a_key] for s in states], [s[b_key] for s in states])
    return out


# --- validation and helpers ----------------------------------------------------------------


def _sum(terms: Iterable[Tensor]) -> Tensor:
    """Σ of a non-empty sequence of same-shape tensors."""
    return functools.reduce(operator.add, terms)


def _check_pair(A: Tensor, B: Tensor) -> tuple[int, int, int]:
    """(rank, in, out) of a factor pair A (r, in), B (out, r)."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"expected A (r, in) and B (out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}")
    return A.shape[0], A.shape[1], B.shape[0]


def _check_rank(r: int, in_features: int, out_features: int) -> None:
    limit = min(in_features, out_features)
    if not 1 <= r <= limit:
        raise ValueError(f"`r` must be in [1, min(in_features, out_features) = {limit}] for this layer, got {r}")


def _normalise(weights: Sequence[float], n: int) -> list[float]:
    """p_k = w_k / Σ_j w_j, checking w_k ≥ 0, finite, and Σ_j w_j > 0."""
    if len(weights) != n:
        raise ValueError(f"`weights` must have one entry per client ({n}), got {len(weights)}")
    for k, w in enumerate(weights):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"`weights[{k}]` must be finite and >= 0, got {w}")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"`weights` must have a positive sum, got {list(weights)}")
    return [w / total for w in weights]


def _check_clients(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float], weights: Sequence[float]
) -> list[float]:
    """Validate one layer's client factors; return the normalised weights p_k."""
    if not As or len(As) != len(Bs) or len(As) != len(scales):
        raise ValueError(f"need one A, B and scale per client, got {len(As)} A, {len(Bs)} B, {len(scales)} scales")
    _, in0, out0 = _check_pair(As[0], Bs[0])
    for k, (A, B) in enumerate(zip(As, Bs)):
        _, in_k, out_k = _check_pair(A, B)
        if (in_k, out_k) != (in0, out0):
            raise ValueError(f"client {k} has layer shape (out, in) = {(out_k, in_k)}, client 0 has {(out0, in0)}")
    for k, s in enumerate(scales):
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"`scales[{k}]` must be finite and > 0, got {s}")
    return _normalise(weights, len(As))


def _global_scale(scales: Sequence[float], s_g: float | None) -> float:
    """s_g as given, else the clients' common scaling (an error when they differ)."""
    if s_g is None:
        if not all(math.isclose(s, scales[0], rel_tol=1e-9) for s in scales):
            raise ValueError(f"clients' scalings differ ({list(scales)}); pass `s_g`, the global alpha / r_max")
        return scales[0]
    if not (math.isfinite(s_g) and s_g > 0):
        raise ValueError(f"`s_g` must be finite and > 0, got {s_g}")
    return s_g


# --- rank alignment (HetLoRA) --------------------------------------------------------------


def zero_pad(A: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Pad A (r_k, in) with zero rows and B (out, r_k) with zero columns to rank r ≥ r_k; B A is unchanged."""
    r_k, in_features, out_features = _check_pair(A, B)
    _check_rank(r, in_features, out_features)
    if r < r_k:
        raise ValueError(f"`r` = {r} is below the factors' rank {r_k}; use `truncate`")
    A_pad = torch.cat([A, A.new_zeros(r - r_k, in_features)], dim=0)  # (r, in)
    B_pad = torch.cat([B, B.new_zeros(out_features, r - r_k)], dim=1)  # (out, r)
    return A_pad, B_pad


def truncate(A: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Keep the first r ≤ r_k rows of A and columns of B (HetLoRA's downlink to a rank-r client)."""
    r_k, in_features, out_features = _check_pair(A, B)
    _check_rank(r, in_features, out_features)
    if r > r_k:
        raise ValueError(f"`r` = {r} exceeds the factors' rank {r_k}; use `zero_pad`")
    return A[:r].clone(), B[:, :r].clone()


def _padded_means(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float], p: Sequence[float], r: int, s_g: float
) -> tuple[Tensor, Tensor]:
    """(Σ p_k pad(A_k), Σ p_k (s_k / s_g) pad(B_k)) at rank r."""
    padded = [zero_pad(A, B, r) for A, B in zip(As, Bs)]
    A = _sum(p_k * A_k for p_k, (A_k, _) in zip(p, padded))
    B = _sum(p_k * (s_k / s_g) * B_k for p_k, s_k, (_, B_k) in zip(p, scales, padded))
    return A, B  # (r, in), (out, r)


# --- rules ---------------------------------------------------------------------------------


def weighted_product(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float], weights: Sequence[float]
) -> Tensor:
    """The ideal update ΔW* = Σ_k p_k s_k B_k A_k, shape (out, in); ranks may differ."""
    p = _check_clients(As, Bs, scales, weights)
    return _sum(p_k * s_k * (B_k @ A_k) for p_k, s_k, A_k, B_k in zip(p, scales, As, Bs))


def fedit(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    r_max: int,
    *,
    s_g: float | None = None,
) -> tuple[Tensor, Tensor]:
    """FedIT: A = Σ p_k pad(A_k) (r_max, in), B = Σ p_k (s_k / s_g) pad(B_k) (out, r_max)."""
    p = _check_clients(As, Bs, scales, weights)
    return _padded_means(As, Bs, scales, p, r_max, _global_scale(scales, s_g))


def hetlora_weights(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float], weights: Sequence[float]
) -> list[float]:
    """HetLoRA's sparsity weights p_k ∝ w_k ‖s_k B_k A_k‖_F (w_k alone when every update is zero)."""
    w = _check_clients(As, Bs, scales, weights)
    norms = [w_k * s_k * torch.linalg.matrix_norm(B_k @ A_k).item() for w_k, s_k, A_k, B_k in zip(w, scales, As, Bs)]
    return _normalise(norms, len(w)) if math.fsum(norms) > 0 else w


def hetlora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    r_max: int,
    *,
    s_g: float | None = None,
) -> tuple[Tensor, Tensor]:
    """HetLoRA: FedIT's zero-padded, scale-folded means with p_k = `hetlora_weights` (pass ones for the paper)."""
    p = hetlora_weights(As, Bs, scales, weights)
    return _padded_means(As, Bs, scales, p, r_max, _global_scale(scales, s_g))


def hetlora_rank_penalty(B: Tensor, A: Tensor, r_k: int, gamma: float, lam: float = 1.0) -> Tensor:
    """HetLoRA's rank self-pruning regulariser λ ‖B[:, t:r_k] A[t:r_k, :]‖_F with t = ⌊γ r_k⌋ (0 when t = r_k).

    Differentiable (add it to the client's loss); a client whose tail norm shrinks prunes to r_k ← t.
    """
    r, _, _ = _check_pair(A, B)
    if not 1 <= r_k <= r:
        raise ValueError(f"`r_k` must be in [1, {r}] (the factors' rank), got {r_k}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"`gamma` must be in [0, 1], got {gamma}")
    t = math.floor(gamma * r_k)
    return lam * torch.linalg.matrix_norm(B[:, t:r_k] @ A[t:r_k, :])


def update_stack(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    received: tuple[Tensor, Tensor, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """(B_s (out, R), A_s (R, in)) with B_s A_s = ΔW*, the ideal update, never formed densely.

    Without `received`: the "zeros" reading, ΔW* = Σ_k p_k s_k B_k A_k (FLoRA's stack, R = Σ r_k).
    With `received` = (A_g, B_g, s_g), the global adapter the clients were sent: the "holders"
    reading, ΔW* = s_g B_g A_g + Σ_k p_k (s_k B_k A_k − s_g B_g[:, :r_k] A_g[:r_k]), stacked as one more
    block s_g B_g diag(1 − P_j), A_g with P_j = Σ_{k: r_k > j} p_k (R = Σ r_k + r_max).
    """
    A_s, B_s = flora_stack(As, Bs, scales, weights)
    if received is None:
        return B_s, A_s
    A_g, B_g, s_g = received
    r_max, _, _ = _check_pair(A_g, B_g)
    p = _normalise(weights, len(As))
    held = torch.tensor(
        [math.fsum(p_k for p_k, A_k in zip(p, As) if A_k.shape[0] > j) for j in range(r_max)], dtype=B_g.dtype
    )
    return torch.cat([B_s, s_g * B_g * (1 - held)[None, :]], dim=1), torch.cat([A_s, A_g], dim=0)


def product_svd(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U (out, rank), S (rank,), Vh (rank, in)): the top-`rank` SVD of B A, from QRs of the factors.

    B = Q_B R_B and Aᵀ = Q_A R_A give B A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so only the small core is decomposed:
    O((out + in)·R²) for B (out, R), A (R, in), against O(out·in·min(out, in)) for the dense SVD.
    Computed in float64, returned in B's dtype. Where B A has fewer than `rank` components, Vh is
    completed with orthonormal rows and S with zeros.
    """
    dtype = B.dtype
    Q_B, R_B = torch.linalg.qr(B.double())  # (out, m), (m, R)
    Q_A, R_A = torch.linalg.qr(A.double().T)  # (in, n), (n, R)
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)  # (m, q), (q,), (q, n)
    U, Vh = Q_B @ U_c, Vh_c @ Q_A.T  # (out, q), (q, in)
    missing = rank - S.shape[0]
    if missing > 0:
        basis = torch.linalg.qr(torch.cat([Vh.T, torch.eye(Vh.shape[1], missing, dtype=Vh.dtype)], dim=1))[
            0
        ]  # (in, q + missing)
        Vh = torch.cat([Vh, basis[:, S.shape[0] :].T])
        U = torch.cat([U, U.new_zeros(U.shape[0], missing)], dim=1)
        S = torch.cat([S, S.new_zeros(missing)])
    return U[:, :rank].to(dtype), S[:rank].to(dtype), Vh[:rank].to(dtype)


def flexlora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    ranks_out: Sequence[int],
    s_g_per_client: Sequence[float],
    received: tuple[Tensor, Tensor, float] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """FlexLoRA: ΔW* = U Σ Vᵀ (`update_stack`'s ΔW*, `received` as there); output j gets
    A_j = V_rᵀ, B_j = U_r Σ_r / s_j with r = ranks_out[j], so s_j B_j A_j = U_r Σ_r V_rᵀ."""
    B_s, A_s = update_stack(As, Bs, scales, weights, received)
    if len(ranks_out) != len(s_g_per_client):
        raise ValueError(f"need one scale per output rank, got {len(ranks_out)} ranks and {len(s_g_per_client)} scales")
    for j, (r, s) in enumerate(zip(ranks_out, s_g_per_client)):
        _check_rank(r, A_s.shape[1], B_s.shape[0])
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"`s_g_per_client[{j}]` must be finite and > 0, got {s}")
    U, S, Vh = product_svd(B_s, A_s, max(ranks_out))
    return [
        (Vh[:r].clone(), U[:, :r] * (S[:r] / s)[None, :]) for r, s in zip(ranks_out, s_g_per_client)
    ]  # (r, in), (out, r)


def flora_stack(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """FLoRA: A = [A_1; …; A_K] (Σr_k, in), B = [p_1 s_1 B_1, …, p_K s_K B_K] (out, Σr_k); B A = ΔW*, scaling 1."""
    p = _check_clients(As, Bs, scales, weights)
    A_stack = torch.cat(list(As), dim=0)
    B_stack = torch.cat([p_k * s_k * B_k for p_k, s_k, B_k in zip(p, scales, Bs)], dim=1)
    return A_stack, B_stack


def merge_into_base(W: Tensor, delta: Tensor) -> Tensor:
    """W + ΔW, the base weight after merging an update (FLoRA, FedEx-LoRA's residual)."""
    if W.shape != delta.shape:
        raise ValueError(f"update shape {tuple(delta.shape)} does not match base weight {tuple(W.shape)}")
    return W + delta


def ffa_lora(
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    A_frozen: Tensor,
    *,
    s_g: float | None = None,
) -> Tensor:
    """FFA-LoRA: B = Σ p_k (s_k / s_g) B_k with A frozen, so s_g B A = Σ p_k s_k B_k A exactly."""
    p = _check_clients([A_frozen] * len(Bs), Bs, scales, weights)
    s_g = _global_scale(scales, s_g)
    return _sum(p_k * (s_k / s_g) * B_k for p_k, s_k, B_k in zip(p, scales, Bs))


def fedsa_lora(As: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """FedSA-LoRA: the shared A = Σ p_k A_k (all of one shape); each client keeps its B."""
    p = _normalise(weights, len(As))
    for k, A in enumerate(As):
        if A.shape != As[0].shape:
            raise ValueError(f"client {k} has A {tuple(A.shape)}, client 0 has {tuple(As[0].shape)}")
    return _sum(p_k * A_k for p_k, A_k in zip(p, As))


def fedex_lora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    r_max: int,
    *,
    s_g: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FedEx-LoRA on zero-padded factors: FedIT's (A, B) and the residual ΔW* − s_g B A (out, in) for
    the frozen base (`fedex_residual` for any (A, B) and ΔW*)."""
    s_g = _global_scale(scales, s_g)
    A, B = fedit(As, Bs, scales, weights, r_max, s_g=s_g)
    return A, B, fedex_residual(A, B, s_g, *update_stack(As, Bs, scales, weights))


def fedex_residual(A: Tensor, B: Tensor, s_g: float, B_s: Tensor, A_s: Tensor) -> Tensor:
    """ΔW* − s_g B A (out, in), with ΔW* = B_s A_s (`update_stack`): what the adapter misses of the ideal update."""
    return B_s @ A_s - s_g * (B @ A)


def lora_fair(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    weights: Sequence[float],
    lam: float = 0.01,
    steps: int = 50,
    lr: float = 0.1,
    *,
    r_max: int | None = None,
    s_g: float | None = None,
) -> tuple[Tensor, Tensor]:
    """LoRA-FAIR on zero-padded factors: FedIT's (Ā, B̄), then `lora_fair_refine` toward ΔW* = Σ p_k s_k B_k A_k."""
    p = _check_clients(As, Bs, scales, weights)
    s_g = _global_scale(scales, s_g)
    A, B = _padded_means(As, Bs, scales, p, r_max or max(A_k.shape[0] for A_k in As), s_g)  # (r, in), (out, r)
    return A, lora_fair_refine(A, B, *update_stack(As, Bs, scales, weights), lam=lam, steps=steps, lr=lr)


def lora_fair_refine(
    A: Tensor, B: Tensor, B_s: Tensor, A_s: Tensor, lam: float = 0.01, steps: int = 50, lr: float = 0.1
) -> Tensor:
    """B̄ + ΔB with ΔB ≈ argmin (1 − cos(ΔW*, (B̄ + ΔB) Ā)) + λ ‖ΔB‖_F, ΔW* = B_s A_s (`update_stack`).

    With X = B̄ + ΔB the cosine is ⟨X, ΔW* Āᵀ⟩ / (‖ΔW*‖_F √⟨X Ā Āᵀ, X⟩) (the adapter's scaling cancels),
    so each step costs O(out·r·R), never O(out·in). Deterministic descent from ΔB = 0:
    normalised-gradient steps of length lr·‖B̄‖_F, grown ×1.25 when the objective falls, halved (and
    not taken) when it does not, so the objective never rises. λ‖ΔB‖_F is in B's units (the paper's
    form): ΔB stays 0 where ‖∇_B cos‖_F ≤ λ. Returns B̄ unchanged when ΔW* or B̄ Ā is zero (the
    cosine is undefined).
    """
    target = B_s @ (A_s @ A.T)  # ΔW* Āᵀ (out, r)
    gram, ideal_norm = A @ A.T, _product_norm(B_s, A_s)  # (r, r), ()
    if ideal_norm == 0 or torch.linalg.matrix_norm(B @ A) == 0:
        return B

    def objective(dB: Tensor) -> Tensor:
        X = B + dB  # (out, r)
        cos = (X * target).sum() / (ideal_norm * ((X @ gram) * X).sum().clamp_min(0).sqrt())
        return 1 - cos + lam * torch.linalg.matrix_norm(dB)

    delta, step = torch.zeros_like(B), lr * torch.linalg.matrix_norm(B).item()
    for _ in range(steps):
        x = delta.detach().requires_grad_(True)
        loss = objective(x)
        (grad,) = torch.autograd.grad(loss, x)
        g_norm = torch.linalg.matrix_norm(grad)
        if not g_norm > 0:
            break
        with torch.no_grad():
            candidate = delta - step * grad / g_norm
            better = bool(objective(candidate) < loss)
        delta, step = (candidate, step * 1.25) if better else (delta, step * 0.5)
    return B + delta


def _product_norm(B: Tensor, A: Tensor) -> Tensor:
    """‖B A‖_F = √tr((BᵀB)(A Aᵀ)), without forming B A."""
    return ((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt()


def aggregation_bias(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float], weights: Sequence[float]
) -> float:
    """‖(Σ p_k s_k B_k)(Σ p_k A_k) − ΔW*‖_F / ‖ΔW*‖_F, zero-padded to max r_k.

    0 for identical clients; 0 when both norms are 0, inf when only ΔW* is 0.
    """
    p = _check_clients(As, Bs, scales, weights)
    A, sB = _padded_means(As, Bs, scales, p, max(A_k.shape[0] for A_k in As), 1.0)
    ideal = weighted_product(As, Bs, scales, weights)
    error, norm = torch.linalg.matrix_norm(sB @ A - ideal).item(), torch.linalg.matrix_norm(ideal).item()
    if norm == 0:
        return 0.0 if error == 0 else math.inf
    return error / norm
