"""FedSpeed's client rule against hand-written computations: the merged-gradient step on a linear model
with closed-form gradients, the correction term and x̂; on the tiny LM, one SGD step against torch.func
and the whole loop against train_lora's FedProx when the ascent is off."""

from __future__ import annotations

import pytest
import torch

from fedsim.config.scenario import LoraConfig
from fedsim.data.tasks import generate
from fedsim.model.adapter import attach_lora, get_state, set_state
from fedsim.model.fedspeed import (
    ASCENT_EPS,
    check_hyperparameters,
    corrected,
    correction_for,
    fedspeed_step,
    sent,
    train_fedspeed,
)
from fedsim.model.loader import load_model
from fedsim.model.training import collate, train_lora

# --- a linear model, gradients in closed form ---------------------------------------------------


def linear_problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 3, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(1, generator=g, dtype=torch.float64))
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    return model, X, y


def grad_by_hand(
    w: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ of f = ½·mean((X wᵀ + b − y)²): (mean of r xᵀ, mean of r), r the residuals."""
    r = X @ w.T + b - y  # (n, 1)
    return (r.T @ X) / len(X), r.mean(0)


def test_two_merged_gradient_steps_and_the_correction_match_the_rule_by_hand() -> None:
    model, X, y = linear_problem()
    rho, alpha, lam, eta = 0.3, 0.6, 2.0, 0.1
    params = list(model.parameters())  # weight (1, 3), bias (1,)
    anchor = [p.detach().clone() for p in params]
    held = [torch.full_like(p, 0.05) for p in params]  # ĝ from an earlier round
    opt = torch.optim.SGD(params, lr=eta)

    w, b = (p.detach().clone() for p in params)
    for _ in range(2):  # by hand
        g1 = grad_by_hand(w, b, X, y)
        norm = torch.stack([(g**2).sum() for g in g1]).sum().sqrt()
        yw, yb = (p + rho * g / (norm + ASCENT_EPS) for p, g in zip((w, b), g1))
        g2 = grad_by_hand(yw, yb, X, y)
        d = [(1 - alpha) * a + alpha * c - h + (p - p0) / lam for a, c, h, p, p0 in zip(g1, g2, held, (w, b), anchor)]
        w, b = w - eta * d[0], b - eta * d[1]
    g_new = [h - (p - p0) / lam for h, p, p0 in zip(held, (w, b), anchor)]
    x_hat = [p - lam * h for p, h in zip((w, b), g_new)]

    def loss() -> torch.Tensor:
        return 0.5 * ((model(X) - y) ** 2).mean()

    for _ in range(2):  # by the module
        opt.zero_grad()
        fedspeed_step(params, loss, anchor, held, rho=rho, alpha=alpha, lam=lam)
        opt.step()
    torch.testing.assert_close(params[0].detach(), w)
    torch.testing.assert_close(params[1].detach(), b)
    new = corrected(held, [p.detach() for p in params], anchor, lam)
    torch.testing.assert_close(new, g_new)
    torch.testing.assert_close(sent([p.detach() for p in params], new, lam), x_hat)


def test_the_ascent_is_undone_exactly_and_skipped_when_it_cannot_matter() -> None:
    model, X, y = linear_problem()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    calls = []

    def loss() -> torch.Tensor:
        calls.append(1)
        return 0.5 * ((model(X) - y) ** 2).mean()

    zeros = [torch.zeros_like(p) for p in params]
    for rho, alpha, passes in [(0.5, 1.0, 2), (0.0, 1.0, 1), (0.5, 0.0, 1)]:
        calls.clear()
        fedspeed_step(params, loss, before, zeros, rho=rho, alpha=alpha, lam=1.0)
        assert len(calls) == passes
        assert all(torch.equal(p, q) for p, q in zip(params, before))  # bit for bit
    g1 = grad_by_hand(before[0], before[1], X, y)
    torch.testing.assert_close([p.grad for p in params], list(g1))  # α = 0: d = g₁ at the anchor


def test_stored_correction_is_used_only_when_it_fits_the_parameters() -> None:
    named = [("a", torch.zeros(2, 3)), ("b", torch.zeros(4))]
    held = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    assert all(torch.equal(v, held[k]) for k, v in correction_for(named, held).items())
    for stale in ({"a": torch.ones(1, 3), "b": torch.ones(4)}, {"a": torch.ones(2, 3)}, None):
        assert all(not v.any() for v in correction_for(named, stale).values())


@pytest.mark.parametrize(
    ("rho", "alpha", "lam", "expected"),
    [(-0.1, 1.0, 1.0, "`rho` must be >= 0"), (0.1, 1.5, 1.0, r"`alpha` must be in \[0, 1\]"),
     (0.1, 1.0, 0.0, "`lam` must be > 0 and finite"), (0.1, 1.0, float("inf"), "`lam` must be > 0 and finite")],
)  # fmt: skip
def test_bad_hyperparameters_are_refused_by_name(rho: float, alpha: float, lam: float, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        check_hyperparameters(rho, alpha, lam)


# --- the tiny LM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    base, tokenizer = load_model("tiny-llama")
    model = attach_lora(base, LoraConfig(rank=4, alpha=8.0), seed=0)
    g = torch.Generator().manual_seed(1)  # B ≠ 0, so every factor has a gradient
    set_state(model, {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in get_state(model).items()})
    return model, tokenizer


EXAMPLES = generate("sentiment", 24, seed=0)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_sgd_step_on_the_tiny_lm_matches_torch_func(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    start, x0 = get_state(model), trainable(model)
    rho, alpha, lam, eta, batch_size, seed = 0.05, 0.5, 2.0, 0.1, 4, 3
    held = {n: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for n, v in x0.items()}
    first = torch.randperm(len(EXAMPLES), generator=torch.Generator().manual_seed(seed))[:batch_size].tolist()
    batch = collate(tok, [EXAMPLES[i] for i in first], 64)

    def grads(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        leaves = {n: v.clone().requires_grad_(True) for n, v in values.items()}
        loss = torch.func.functional_call(model, leaves, args=(), kwargs=batch).loss
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    model.train()
    g1 = grads(x0)
    norm = torch.stack([(g**2).sum() for g in g1.values()]).sum().sqrt()
    g2 = grads({n: x0[n] + rho * g1[n] / (norm + 1e-7) for n in x0})
    x1 = {n: x0[n] - eta * ((1 - alpha) * g1[n] + alpha * g2[n] - held[n]) for n in x0}  # x_0 = x^t: no prox yet
    g_new = {n: held[n] - (x1[n] - x0[n]) / lam for n in x0}

    result, correction = train_fedspeed(
        model, tok, EXAMPLES, steps=1, batch_size=batch_size, max_len=64, lr=eta, weight_decay=0.0, grad_clip=0.0,
        seed=seed, step_flops=lambda b, t: float(b * t), rho=rho, alpha=alpha, lam=lam, correction=held,
        optimizer="sgd",
    )  # fmt: skip
    after = trainable(model)
    set_state(model, start)
    for n in x0:
        torch.testing.assert_close(correction[n], g_new[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(after[n], x1[n] - lam * g_new[n], rtol=1e-4, atol=1e-6)
    ids = batch["input_ids"]
    assert result.flops == 2 * ids.shape[0] * ids.shape[1]  # two passes over the batch
    assert result.tokens == 2 * int(batch["attention_mask"].sum())


def test_without_the_ascent_the_loop_is_fedprox_then_the_correction(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    start, x0 = get_state(model), trainable(model)
    lam = 0.5
    kwargs = dict(steps=5, batch_size=4, max_len=64, lr=1e-2, weight_decay=0.01, grad_clip=1.0, seed=2,
                  step_flops=lambda b, t: float(b * t))  # fmt: skip
    prox = train_lora(model, tok, EXAMPLES, proximal_mu=1 / lam, **kwargs)  # type: ignore[arg-type]
    x_k = trainable(model)
    set_state(model, start)
    speed, correction = train_fedspeed(model, tok, EXAMPLES, rho=0.0, lam=lam, **kwargs)  # type: ignore[arg-type]
    after = trainable(model)
    set_state(model, start)
    assert (speed.tokens, speed.flops, speed.steps) == (prox.tokens, prox.flops, prox.steps)  # same batches, once
    assert speed.train_loss == pytest.approx(prox.train_loss, rel=1e-5)
    for n in x0:  # ĝ' = −(x_K − x^t)/λ from ĝ = 0, and x̂ = x_K − λĝ' = 2x_K − x^t
        torch.testing.assert_close(correction[n], -(x_k[n] - x0[n]) / lam, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(after[n], 2 * x_k[n] - x0[n], rtol=1e-4, atol=1e-6)


def test_train_fedspeed_refuses_an_unknown_optimizer(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    with pytest.raises(ValueError, match=r"`optimizer` must be one of \('adamw', 'sgd'\), got 'adam'"):
        train_fedspeed(model, tok, EXAMPLES, steps=1, batch_size=2, max_len=32, lr=0.1, weight_decay=0.0,
                       grad_clip=0.0, seed=0, optimizer="adam")  # fmt: skip
