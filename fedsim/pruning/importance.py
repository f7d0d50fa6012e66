"""Importance of each KV group and MLP channel, by name: magnitude, activation, first_order, lora_grad.

Every score is a sum of per-weight importances I_ij over the weights of a structure (see
`structure`: a KV group owns G·h rows of q_proj, h rows of k/v_proj and G·h columns of o_proj; a
channel one row of gate/up_proj and one column of down_proj), over the projections the score reads:

    S_s = Σ_p Σ_{(i,j) ∈ s} I^p_ij.

W is the effective weight the model computes with: W₀ + s·B·A where the linear carries LoRA
(W₀ (out, in) frozen, A (r, in), B (out, r), scaling s), else W₀. G_X = ∂L/∂X, L the mean
next-token cross-entropy of a calibration batch (padding excluded).

- `magnitude`:   I_ij = |W_ij|.
- `activation`:  FLAP's fluctuation metric (An et al., 2024, "Fluctuation-based Adaptive Structured
  Pruning for Large Language Models", arXiv:2312.11983), on the inputs of o_proj and down_proj only:
  I_ij = W_ij² · Var_n(X_nj), so Σ_i I_ij = ‖W_:,j‖² · Var(X_j), X_nj input channel j at token n,
  sample variance over the unpadded tokens (forward hooks, no gradients). FLAP's bias compensation
  and per-structure standardisation are not applied.
- `first_order`: LLM-Pruner's element-wise first-order Taylor term (Ma et al., 2023, "LLM-Pruner:
  On the Structural Pruning of Large Language Models", arXiv:2305.11627): I_ij = |W_ij · (G_W₀)_ij|,
  G_W₀ = G_W; the frozen weights get gradients for one backward and are restored afterwards.
- `lora_grad`: LoRAPrune (Zhang et al., 2024, "LoRAPrune: Structured Pruning Meets Low-Rank
  Parameter-Efficient Fine-Tuning", arXiv:2305.18403), FedSpine's default. One SGD step of size η
  on (A, B) changes the merged weight by s·(B − ηG_B)(A − ηG_A) − s·BA ≈ −η·s·(G_B·A + B·G_A), so

      Ĝ_W = s·(G_B·A + B·G_A),    I_ij = |Ĝ_W ⊙ (W₀ + s·B·A)|_ij,

  which needs only the LoRA gradients a training step computes anyway (a frozen factor contributes
  no term). Projections without LoRA are not scored; a layer with LoRA on none of q/k/v/o_proj (or
  none of gate/up/down_proj) cannot rank that kind and is refused, naming the missing targets.
  `ImportanceEMA` smooths it over steps.

All return `Scores`: per layer, one score per KV group and per channel (float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor

from fedsim.config.names import IMPORTANCE_SCORES as SCORES
from fedsim.pruning.structure import ATTENTION, AXIS, MLP, Keep, Scores, decoder_layers, geometry, weight

PerWeight = Callable[[int, str, torch.nn.Module], Tensor | None]  # (layer, projection, module) -> I or None


def importance_scores(
    model: torch.nn.Module, name: str, *, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
) -> Scores:
    """Scores by `name` (one of `SCORES`); all but `magnitude` need the calibration batch.

    `lora_grad` with a batch runs its own backward (the model's gradients are restored after);
    call `lora_grad_scores` instead to read the gradients of a training step already taken.
    """
    if name not in SCORES:
        raise ValueError(f"unknown importance score {name!r}; known: {', '.join(SCORES)}")
    if name == "magnitude":
        return magnitude_scores(model)
    if input_ids is None or attention_mask is None:
        raise ValueError(f"importance score {name!r} needs a calibration batch: pass `input_ids` and `attention_mask`")
    if name == "activation":
        return activation_scores(model, input_ids, attention_mask)
    if name == "first_order":
        return first_order_scores(model, input_ids, attention_mask)
    _check_lora_coverage(model)  # before the backward pass, not after
    with _scoring(model, grads_for=[]):
        lm_loss(model, input_ids, attention_mask).backward()
        return lora_grad_scores(model)


def magnitude_scores(model: torch.nn.Module) -> Scores:
    """S = Σ |W| over the structure's weight slices."""
    return _collect(model, lambda i, name, module: effective_weight(module).abs())


@torch.no_grad()
def activation_scores(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Scores:
    """FLAP fluctuation: S = Σ_j ‖W_:,j‖²·Var(X_j) over the structure's o_proj / down_proj inputs."""
    tokens = attention_mask.bool()
    stats: dict[tuple[int, str], tuple[int, Tensor, Tensor]] = {}  # n, Σx, Σx² per input channel (float64)

    def hook(key: tuple[int, str]) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0][tokens].double()  # (N, in): unpadded tokens only
            zero = torch.zeros(x.shape[1], dtype=torch.float64)
            n, s, s2 = stats.get(key, (0, zero, zero))
            stats[key] = (n + x.shape[0], s + x.sum(0), s2 + (x * x).sum(0))

        return record

    layers = decoder_layers(model)
    handles = [
        getattr(sub, name).register_forward_hook(hook((i, name)))
        for i, layer in enumerate(layers)
        for sub, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj"))
    ]
    try:
        with _scoring(model, grads_for=[]):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if stats[0, "o_proj"][0] < 2:
        raise ValueError("`activation` needs at least 2 unpadded tokens in the calibration batch")

    def per_weight(i: int, name: str, module: torch.nn.Module) -> Tensor | None:
        if (i, name) not in stats:
            return None
        n, s, s2 = stats[i, name]
        variance = ((s2 - s * s / n) / (n - 1)).clamp_min(0)  # (in,)
        return effective_weight(module).double().pow(2) * variance

    return _collect(model, per_weight)


def first_order_scores(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Scores:
    """LLM-Pruner: S = Σ |W ⊙ ∂L/∂W| over the structure's weight slices."""
    modules = _projections(model)
    frozen = [weight(m) for m in modules.values()]
    with _scoring(model, grads_for=frozen):
        lm_loss(model, input_ids, attention_mask).backward()
        grads = {key: _grad(weight(m), key) for key, m in modules.items()}
    return _collect(model, lambda i, name, module: (effective_weight(module) * grads[i, name]).abs())


def lora_grad_scores(model: torch.nn.Module) -> Scores:
    """LoRAPrune: S = Σ |s·(G_B·A + B·G_A) ⊙ (W₀ + s·B·A)|, from the LoRA gradients present now."""
    _check_lora_coverage(model)

    def per_weight(i: int, name: str, module: torch.nn.Module) -> Tensor | None:
        if not isinstance(module, LoraLayer):
            return None
        g_hat = torch.zeros_like(weight(module), dtype=torch.float32)
        for a in _active(module):
            (A, B), s = _factors(module, a), module.scaling[a]
            if A.grad is None and B.grad is None:
                raise ValueError(
                    f"layer {i} {name}: lora_A/lora_B have no gradient; call loss.backward() "
                    "first, or pass a calibration batch to `importance_scores`"
                )
            g_a = A.grad if A.grad is not None else torch.zeros_like(A)
            g_b = B.grad if B.grad is not None else torch.zeros_like(B)
            g_hat += s * (g_b.float() @ A.detach().float() + B.detach().float() @ g_a.float())
        return (g_hat * effective_weight(module)).abs()

    return _collect(model, per_weight)


class ImportanceEMA:
    """Moving average of scores over steps: Ī_1 = I_1, Ī_t = β·Ī_{t−1} + (1 − β)·I_t (LoRAPrune)."""

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be in [0, 1), got {beta}")
        self.beta = beta
        self.value: Scores | None = None

    def update(self, scores: Scores) -> Scores:
        """Fold in one step's scores; returns the average."""
        if self.value is not None:
            old = self.value.groups + self.value.channels
            new = scores.groups + scores.channels
            if [t.shape for t in old] != [t.shape for t in new]:
                raise ValueError("scores changed shape since the last update; after pruning, call `select(keep)`")
            mix = [self.beta * o + (1 - self.beta) * n for o, n in zip(old, new)]
            scores = Scores(tuple(mix[: len(scores.groups)]), tuple(mix[len(scores.groups) :]))
        self.value = scores
        return scores

    def select(self, keep: Keep) -> None:
        """Keep averaging over the structures `keep` kept (call after pruning with it)."""
        if self.value is not None:
            self.value = self.value.select(keep)


# --- helpers -------------------------------------------------------------------------------


def lm_loss(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a calibration batch, padding (mask 0) excluded."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.numel() == 0:
        raise ValueError(
            f"calibration batch: `input_ids` and `attention_mask` must both be (batch, seq_len), "
            f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss


def effective_weight(module: torch.nn.Module) -> Tensor:
    """W₀ + Σ_adapters s·B·A for a PEFT LoRA layer (unmerged active adapters), else W₀; detached."""
    w = weight(module).detach().float()
    if isinstance(module, LoraLayer):
        for a in _active(module):
            A, B = _factors(module, a)
            w = w + module.scaling[a] * (B.detach().float() @ A.detach().float())
    return w


def _factors(module: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
    """(A, B): the (r, in) and (out, r) weights of one LoRA adapter."""
    # nn.Module.__getattr__ is typed Tensor | Module; lora_A / lora_B hold nn.Linear layers
    return cast(Tensor, module.lora_A[adapter].weight), cast(Tensor, module.lora_B[adapter].weight)


def _grad(w: Tensor, key: tuple[int, str]) -> Tensor:
    """A copy of the gradient the calibration loss left on `w`."""
    if w.grad is None:
        raise ValueError(f"layer {key[0]} {key[1]}: the calibration loss left no gradient on its weight")
    return w.grad.detach().clone()


def _active(module: LoraLayer) -> list[str]:
    return [a for a in module.active_adapters if a in module.lora_A and a not in module.merged_adapters]


def _projections(model: torch.nn.Module) -> dict[tuple[int, str], torch.nn.Module]:
    return {
        (i, name): getattr(sub, name)
        for i, layer in enumerate(decoder_layers(model))
        for sub, names in ((layer.self_attn, ATTENTION), (layer.mlp, MLP))
        for name in names
    }


def _collect(model: torch.nn.Module, per_weight: PerWeight) -> Scores:
    """Sum each projection's per-weight importance (out, in) into its KV groups and channels."""
    groups: list[Tensor] = []
    channels: list[Tensor] = []
    for i, (layer, shape) in enumerate(zip(decoder_layers(model), geometry(model))):
        for sub, names, n, out in (
            (layer.self_attn, ATTENTION, shape.groups, groups),
            (layer.mlp, MLP, shape.channels, channels),
        ):
            acc = torch.zeros(n, dtype=torch.float64)
            for name in names:
                importance = per_weight(i, name, getattr(sub, name))
                if importance is not None:
                    per_index = importance.double().sum(dim=1 - AXIS[name]).cpu()  # (out,) or (in,)
                    acc += per_index.view(n, -1).sum(1)  # contiguous blocks: G·h, h or 1 per structure
            out.append(acc)
    return Scores(tuple(groups), tuple(channels))


def _check_lora_coverage(model: torch.nn.Module) -> None:
    for i, layer in enumerate(decoder_layers(model)):
        for sub, names, what in ((layer.self_attn, ATTENTION, "KV groups"), (layer.mlp, MLP, "MLP channels")):
            if not any(isinstance(getattr(sub, n), LoraLayer) for n in names):
                raise ValueError(
                    f"`lora_grad` scores {what} from the LoRA on {', '.join(names)}, but layer {i} has LoRA on none "
                    f"of them; add one to `lora.target_modules` or use another score ({', '.join(SCORES[:3])})"
                )


@contextlib.contextmanager
def _scoring(model: torch.nn.Module, grads_for: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode, gradients on `grads_for` too, every parameter's grad and flags restored after."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.grad = None
        for t in grads_for:
            t.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in modes:
            m.training = training
