"""FedSpeed's client (Sun et al., ICLR 2023, "FedSpeed: Larger Local Interval, Less Communication
Round, and Higher Generalization Accuracy", arXiv:2302.10429), on a model's trainable (LoRA) parameters.

Client i in round t starts from the global x^t with its prox-correction term ĝ_i (zeros until it
first trains), which it keeps between rounds. Local step k on batch ε_k:

    g₁  = ∇f_i(x_k; ε_k)                                    stochastic gradient
    y_k = x_k + ρ · g₁ / (‖g₁‖ + 10⁻⁷)                        extra ascent step (‖·‖ over all parameters)
    g₂  = ∇f_i(y_k; ε_k)                                    gradient at the perturbed point
    d_k = (1 − α) g₁ + α g₂ − ĝ_i + (x_k − x^t) / λ           merged gradient, prox term, its correction
    x_{k+1} = x_k − η d_k                                    the paper's SGD step (`optimizer`: AdamW on d_k)

and after K steps (`corrected`, `sent`):

    ĝ_i ← ĝ_i − (x_K − x^t) / λ,      x̂_i = x_K − λ ĝ_i

x̂_i is what the client sends (its update x̂_i − x^t), the server averages them (`strategies.fedspeed`);
in a client's first round x̂_i = x^t + 2 (x_K − x^t).

Checked against the authors' code (github.com/woodenchild95/FL-Simulator: `client/fedspeed.py`,
`optimizer/ESAM.py`, `server/FedSpeed.py`, `train.py`): the ascent is normalised by the gradient's
global norm plus 10⁻⁷ and undone before the descent; their `lamb` is 1/λ (SGD weight decay lamb·x plus
the loss lamb·⟨x, h_i − x^t⟩, h_i = Σ of the client's past updates = −λ ĝ_i); they descend along g₂
alone (α = 1); `--rho 0.1`, `--lamb 0.1` (README: SAM lr 0.1, proxy coefficient 0.1). Hence the
defaults ρ = 0.1, α = 1, λ = 10.

Each step computes two gradients (one when ρ = 0 or α = 0): `TrainResult.flops` and `tokens` count
both passes. The term ĝ_i is named by the model's parameter names (`correction_for`); the ClientApp
keeps it in its node's `context.state`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fedsim.model.training import TrainResult, _batch_loss, _probe_loss, batch_order, collate
from fedsim.protocol import FEDSPEED_ALPHA, FEDSPEED_LAMBDA, FEDSPEED_RHO  # noqa: F401 (re-exported)

RHO, ALPHA, LAMBDA = 0.1, 1.0, 10.0  # the authors' defaults (module docstring)
ASCENT_EPS = 1e-7  # added to ‖g₁‖ in the ascent step, as the authors' ESAM does
OPTIMIZERS = ("adamw", "sgd")


Params = Sequence[torch.Tensor]
Named = Sequence[tuple[str, torch.Tensor]]


def check_hyperparameters(rho: float, alpha: float, lam: float) -> None:
    """ValueError naming each of ρ ≥ 0, α ∈ [0, 1], λ > 0 (finite) that does not hold."""
    problems = [f"`rho` must be >= 0, got {rho}"] if not 0 <= rho < float("inf") else []
    problems += [f"`alpha` must be in [0, 1], got {alpha}"] if not 0 <= alpha <= 1 else []
    problems += [f"`lam` must be > 0 and finite, got {lam}"] if not 0 < lam < float("inf") else []
    if problems:
        raise ValueError("FedSpeed: " + "; ".join(problems))


def correction_for(named: Named, held: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """ĝ_i for the trainable parameters `named` (name, tensor): `held` when it names exactly them at
    their shapes, else zeros (a client's first round, or its rank or adapter changed)."""
    fresh = {n: torch.zeros_like(p, dtype=torch.float32, device="cpu") for n, p in named}
    held = held or {}
    same = set(held) == set(fresh) and all(held[n].shape == v.shape for n, v in fresh.items())
    return {n: held[n].detach().to("cpu", torch.float32).clone() for n in fresh} if same else fresh


def ascent_scale(g1: Params, rho: float) -> torch.Tensor:
    """ρ / (‖g₁‖ + 10⁻⁷), ‖·‖ the 2-norm over every parameter's gradient."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in g1]))
    return rho / (norm + ASCENT_EPS)


def merged_direction(
    g1: Params, g2: Params, x: Params, anchor: Params, correction: Params, *, alpha: float, lam: float
) -> list[torch.Tensor]:
    """d = (1 − α) g₁ + α g₂ − ĝ + (x − x^t) / λ, per parameter."""
    return [
        (1 - alpha) * a + alpha * b - c + (p - p0) / lam
        for a, b, p, p0, c in zip(g1, g2, x, anchor, correction, strict=True)
    ]


def corrected(correction: Params, x_end: Params, anchor: Params, lam: float) -> list[torch.Tensor]:
    """ĝ' = ĝ − (x_K − x^t) / λ, per parameter."""
    return [c - (p - p0) / lam for c, p, p0 in zip(correction, x_end, anchor, strict=True)]


def sent(x_end: Params, correction: Params, lam: float) -> list[torch.Tensor]:
    """x̂ = x_K − λ ĝ' (with the corrected ĝ'), per parameter."""
    return [p - lam * c for p, c in zip(x_end, correction, strict=True)]


def _grads(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def fedspeed_step(
    params: Sequence[torch.nn.Parameter],
    loss_fn: Callable[[], torch.Tensor],
    anchor: Params,
    correction: Params,
    *,
    rho: float,
    alpha: float,
    lam: float,
) -> torch.Tensor:
    """Set each parameter's `.grad` to d_k at the current x_k (module docstring) and return the loss
    at x_k. The ascent point y_k is evaluated and the parameters put back exactly (copied, not
    subtracted); with ρ = 0 or α = 0 the second pass is skipped (g₂ would be g₁, or unused)."""
    loss = loss_fn()
    g1 = _grads(loss, params)
    g2 = g1
    if rho > 0 and alpha > 0:
        scale, saved = ascent_scale(g1, rho), [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, g1, strict=True):
                p.add_(g * scale.to(g.dtype))
        g2 = _grads(loss_fn(), params)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    d = merged_direction(g1, g2, [p.detach() for p in params], anchor, correction, alpha=alpha, lam=lam)
    for p, g in zip(params, d, strict=True):
        p.grad = g.detach()
    return loss.detach()


def train_fedspeed(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    *,
    steps: int,
    batch_size: int,
    max_len: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    step_flops: Callable[[int, int], float] | None = None,
    rho: float = RHO,
    alpha: float = ALPHA,
    lam: float = LAMBDA,
    correction: Mapping[str, torch.Tensor] | None = None,
    optimizer: str = "adamw",
) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """`train_lora`'s contract with FedSpeed's local rule: `steps` steps on the trainable parameters,
    batches from the same seeded permutation of `examples`, each along d_k (clipped to `grad_clip` when
    > 0) by `optimizer` ("adamw" as train_lora, "sgd" the paper's); the model is left at x̂ (what the
    client sends; `loss_after` is its probe loss). `correction` is the ĝ_i the client kept
    (`correction_for`: zeros if it does not fit); returns the result and the corrected ĝ_i, by name."""
    if not examples:
        raise ValueError("train_fedspeed needs at least one example")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"train_fedspeed: `optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
    check_hyperparameters(rho, alpha, lam)
    start = time.perf_counter()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [p.detach().clone() for p in params]  # x^t
    held = [c.to(p.device, p.dtype) for c, p in zip(correction_for(named, correction).values(), params, strict=True)]
    make = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    opt = make(params, lr=lr, weight_decay=weight_decay)
    probe = collate(tokenizer, examples[:batch_size], max_len)
    loss_before = _probe_loss(model, probe)
    passes = 2 if rho > 0 and alpha > 0 else 1

    model.train()
    losses, tokens, flops = [], 0, 0.0
    for idx in batch_order(len(examples), steps, batch_size, seed):
        batch = collate(tokenizer, [examples[i] for i in idx], max_len)
        opt.zero_grad(set_to_none=True)
        loss = fedspeed_step(
            params, functools.partial(_batch_loss, model, batch), anchor, held, rho=rho, alpha=alpha, lam=lam
        )
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(loss.item())
        tokens += passes * int(batch["attention_mask"].sum())
        if step_flops is not None:
            flops += passes * step_flops(*batch["input_ids"].shape)
    with torch.no_grad():
        new = corrected(held, [p.detach() for p in params], anchor, lam)
        for p, x_hat in zip(params, sent([p.detach() for p in params], new, lam), strict=True):
            p.copy_(x_hat)
    model.eval()
    result = TrainResult(
        steps=steps,
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
        loss_before=loss_before,
        loss_after=_probe_loss(model, probe),
        tokens=tokens,
        flops=flops,
        wall_time_s=time.perf_counter() - start,
    )
    return result, {n: c.detach().to("cpu", torch.float32).clone() for (n, _), c in zip(named, new, strict=True)}


__all__ = [
    "ALPHA", "FEDSPEED_ALPHA", "FEDSPEED_LAMBDA", "FEDSPEED_RHO", "LAMBDA", "RHO", "ascent_scale",
    "check_hyperparameters", "corrected", "correction_for", "fedspeed_step", "merged_direction", "sent",
    "train_fedspeed",
]  # fmt: skip
