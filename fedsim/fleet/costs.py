"""Cost model of the simulated clock: FLOPs and memory of LoRA training on a (pruned) Llama.

Pure functions of a `ModelShape`, read from the actual nn.Linear weights, so a structurally
pruned model (each layer keeping its own number of heads and MLP channels) is costed as the
smaller model it physically is. Compute time on a device = FLOPs / its throughput.

Notation: B batch, T seq_len, N = B·T tokens, d hidden, V vocab, r LoRA rank; per layer
q = q_out (heads·head_dim), kv = kv_out, m = MLP channels. A multiply-add is 2 FLOPs.

Forward (the linears of a layer, in→out: q,k,v d→q|kv|kv, o q→d, gate,up d→m, down m→d):

    F_lin(in, out)  = 2·N·in·out                  frozen base linear
    F_lora(in, out) = 2·N·r·(in + out)            x·Aᵀ·Bᵀ, on each targeted linear
    F_attn          = 2 · 2·B·T²·q                QKᵀ and P·V over all heads, full T×T
    F_head          = 2·N·d·V                     lm_head on every position
    forward         = Σ_layers [Σ F_lin + Σ_targets F_lora + F_attn] + F_head

F_attn counts the full T×T, as eager attention and SDPA's math backend compute it and as
torch's FlopCounterMode counts every attention (it ignores causality; a causal flash kernel
skips about half). On CPU, FlopCounterMode does not see the fused SDPA op at all, so the
tests count with attention implementation "eager" and with SDPA's math backend. Norms,
rotary, softmax, SiLU, the residual adds and the loss are ignored (a few %).

Backward, base weights frozen: every matmul Y = X·W costs one more matmul per operand that
needs a gradient (dX = dY·Wᵀ, dW = Xᵀ·dY). W is frozen, so a frozen linear costs F_lin only
if its input X carries a gradient ("is live"); a LoRA pair costs dB, d(x·Aᵀ), dA always and dX
if live: 2·F_lora, less 2·N·r·in when X is not live. Attention: dQ, dK for QKᵀ and dP, dV
for P·V, each 2·B·T²·q, for each live operand. The embeddings are frozen, so no gradient
enters layer 0: the stream turns live at the first targeted linear of layer 0, and every
later layer is live. Hence, verified exactly against FlopCounterMode (tests/fedsim):

    train = forward + backward ≈ Σ_layers [2·F_lin + 3·F_lora + 3·F_attn] + 2·F_head

with equality in every layer but the first, where the matmuls upstream of the first
target get no backward. With no target (or r = 0) nothing is trainable: train = forward.

Memory of one training step (bytes; `w` = weight_bytes; activations in the weight dtype, one
dtype throughout):

    weights     = num_params·w
    adapter     = P_lora·4          LoRA factors in float32
    gradients   = P_lora·4
    optimizer   = P_lora·8          AdamW: exp_avg and exp_avg_sq
    activations = N·w·Σ_layers a_layer + [trainable]·N·((d+1)·w + 4·V + 8)

where the last term is the final RMSNorm, the float32 log-probabilities and the int64 label
the loss keeps, and a_layer counts what autograd saves per token of a layer. A tensor is
"live" if it carries a gradient, as above: x the layer input, attn the attention output, h
the residual stream after attention, gate/up their linears' outputs. Attention is "sdpa"
(transformers' default), which keeps q, k, v, its output and a logsumexp per head but never
the T×T probabilities; eager attention would add about 2·heads·T per token.

    a_layer = [x live]·(d+1)                    input RMSNorm: x and 1/rms
            + [q|k|v targeted]·d                LoRA A input: the normed x
            + [attn live]·(q + 2·kv + q/head_dim)   SDPA: q, k, v, logsumexp
            + [attn live or o targeted]·q       attention output (also o_proj's LoRA input)
            + [h live]·(d+1)                    post-attention RMSNorm
            + [gate|up targeted]·d              LoRA A input
            + ([gate live] + [up live] + [gate live])·m   SiLU input, SiLU out, up out
            + [down targeted]·m                 LoRA A input: SiLU(gate)·up
            + r·#targets                        LoRA B inputs x·Aᵀ

Frozen linears save only their weight (already counted). Against the bytes autograd saves
(tests/fedsim/test_costs.py) this is 0.1-2.3% low, the rest being rotary cos/sin (2·T·head_dim,
shared by all layers) and scalars. Assumes lora_dropout = 0 (fedsim's default): dropout makes
each LoRA layer keep its own dropped copy of its input and a mask (+12-38% on the test models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsim.config.names import ATTENTION, PROJECTIONS

# which tensor of a decoder layer each linear reads (names of `_grad_flow`)
_INPUT = {
    "q_proj": "x",
    "k_proj": "x",
    "v_proj": "x",
    "o_proj": "attn",
    "gate_proj": "h",
    "up_proj": "h",
    "down_proj": "act",
}


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer, as its nn.Linear weights are after pruning."""

    q_out: int  # q_proj out features (= heads * head_dim)
    kv_out: int  # k_proj (= v_proj) out features (= kv_heads * head_dim)
    head_dim: int
    mlp: int  # intermediate channels (gate/up out features = down in features)


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family causal LM: embeddings, decoder layers, final norm, lm_head."""

    hidden: int
    vocab: int
    layers: tuple[LayerShape, ...]
    tied_embeddings: bool

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        """Read the actual nn.Linear shapes of a (PEFT-wrapped, pruned) Llama-like model.

        Raises ValueError, naming the model type, for anything else (biased linears too).
        """
        unwrap = getattr(model, "get_base_model", None)  # PEFT-wrapped: the model inside
        base: torch.nn.Module = unwrap() if callable(unwrap) else model
        try:
            embed, layers = base.get_parameter("model.embed_tokens.weight"), base.get_submodule("model.layers")
            head = _weight(base.get_submodule("lm_head"))
            if not isinstance(layers, torch.nn.ModuleList):
                raise ValueError(f"model.layers is a {type(layers).__name__}, not an nn.ModuleList")
            shapes = tuple(_layer_shape(layer, embed.shape[1]) for layer in layers)
        except (AttributeError, ValueError) as err:
            kind = getattr(getattr(base, "config", None), "model_type", None)
            raise ValueError(
                f"{type(base).__name__} (model_type {kind!r}) is not a Llama-like causal LM "
                "with bias-free q/k/v/o_proj and gate/up/down_proj in model.layers, "
                f"embed_tokens and lm_head: {err}"
            ) from err
        if head.shape != embed.shape:
            raise ValueError(f"lm_head {tuple(head.shape)} != embed_tokens {tuple(embed.shape)}")
        vocab, hidden = embed.shape
        return cls(hidden, vocab, shapes, tied_embeddings=head is embed)

    @property
    def num_params(self) -> int:
        """Parameters of the base model: embeddings, lm_head unless tied, linears, norms."""
        d = self.hidden
        layers = sum(sum(i * o for i, o in linear_shapes(layer, d).values()) + 2 * d for layer in self.layers)
        return self.vocab * d * (1 if self.tied_embeddings else 2) + layers + d


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear, or of the frozen one a PEFT LoRA layer wraps."""
    linear = getattr(linear, "base_layer", linear)
    if not isinstance(linear, torch.nn.Linear) or linear.bias is not None:
        raise ValueError(f"expected a bias-free nn.Linear, got {linear}")
    return linear.weight


def _layer_shape(layer: torch.nn.Module, hidden: int) -> LayerShape:
    attn, mlp = layer.get_submodule("self_attn"), layer.get_submodule("mlp")
    q_out, kv_out = _weight(attn.get_submodule("q_proj")).shape[0], _weight(attn.get_submodule("k_proj")).shape[0]
    head_dim = attn.head_dim
    if not isinstance(head_dim, int):
        raise ValueError(f"self_attn.head_dim must be an int, got {head_dim!r}")
    shape = LayerShape(q_out, kv_out, head_dim, _weight(mlp.get_submodule("gate_proj")).shape[0])
    expected = {name: (o, i) for name, (i, o) in linear_shapes(shape, hidden).items()}
    found = {name: tuple(_weight(getattr(attn if name in ATTENTION else mlp, name)).shape) for name in PROJECTIONS}
    if found != expected:
        raise ValueError(f"inconsistent linear shapes {found}, expected {expected}")
    return shape


def linear_shapes(layer: LayerShape, d: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of a decoder layer."""
    q, kv, m = layer.q_out, layer.kv_out, layer.mlp
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, m),
        "up_proj": (d, m),
        "down_proj": (m, d),
    }


def lora_params(shape: ModelShape, rank: int, targets: Sequence[str]) -> int:
    """Trainable LoRA parameters: r·(in + out) per targeted linear of every layer."""
    _check(rank=rank, targets=targets)
    return sum(
        rank * (i + o)
        for layer in shape.layers
        for name, (i, o) in linear_shapes(layer, shape.hidden).items()
        if name in targets
    )


def _check(*, rank: int, targets: Sequence[str], batch: int = 1, seq_len: int = 1, weight_bytes: int = 1) -> None:
    sizes = {"batch": batch, "seq_len": seq_len, "weight_bytes": weight_bytes}
    problems = [f"`{k}` must be >= 1, got {v}" for k, v in sizes.items() if v < 1]
    if rank < 0:
        problems.append(f"`rank` must be >= 0, got {rank}")
    if isinstance(targets, str) or not set(targets) <= set(PROJECTIONS):
        problems.append(f"`targets` must be a sequence of names among {PROJECTIONS}, got {targets!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _grad_flow(adapted: frozenset[str], live: bool) -> dict[str, bool]:
    """Which tensors of a decoder layer carry a gradient, given whether its input `x` does."""
    g = {"x": live}
    for p in "qkv":
        g[p] = live or f"{p}_proj" in adapted  # projection outputs
    g["attn"] = g["q"] or g["k"] or g["v"]  # attention output = o_proj input
    g["h"] = live or g["attn"] or "o_proj" in adapted  # residual stream = MLP input
    g["gate"] = g["h"] or "gate_proj" in adapted
    g["up"] = g["h"] or "up_proj" in adapted
    g["act"] = g["gate"] or g["up"]  # SiLU(gate)·up = down_proj input
    g["out"] = g["h"] or g["act"] or "down_proj" in adapted
    return g


def _layer_flops(
    layer: LayerShape, d: int, b: int, t: int, r: int, adapted: frozenset[str], g: dict[str, bool]
) -> tuple[int, int]:
    """(forward, backward) FLOPs of one decoder layer."""
    n = b * t
    fwd = bwd = 0
    for name, (fan_in, fan_out) in linear_shapes(layer, d).items():
        base, live_in = 2 * n * fan_in * fan_out, g[_INPUT[name]]
        fwd += base
        bwd += base * live_in  # W frozen: only dX = dY·Wᵀ, and only if X needs it
        if name in adapted:
            fwd += 2 * n * r * (fan_in + fan_out)
            bwd += 2 * n * r * (2 * fan_out + fan_in + fan_in * live_in)  # dB, dH, dA, dX
    mm = 2 * b * t * t * layer.q_out  # one of QKᵀ, P·V: (B, H, T, hd) @ (B, H, hd, T)
    fwd += 2 * mm
    bwd += mm * (g["q"] + g["k"] + (g["q"] or g["k"]) + g["v"])  # dQ, dK, dP, dV
    return fwd, bwd


def _flops(shape: ModelShape, b: int, t: int, r: int, targets: Sequence[str]) -> tuple[int, int]:
    """(forward, backward) FLOPs of one step, the gradient flowing from the first target on."""
    adapted = frozenset(targets) if r > 0 else frozenset()
    fwd = bwd = 0
    live = False  # the embeddings are frozen: no gradient enters layer 0
    for layer in shape.layers:
        g = _grad_flow(adapted, live)
        f, bw = _layer_flops(layer, shape.hidden, b, t, r, adapted, g)
        fwd, bwd, live = fwd + f, bwd + bw, g["out"]
    head = 2 * b * t * shape.hidden * shape.vocab
    return fwd + head, bwd + head * live


def forward_flops(shape: ModelShape, *, batch: int, seq_len: int, rank: int = 0, targets: Sequence[str] = ()) -> float:
    """FLOPs of one forward pass over batch·seq_len tokens (module docstring)."""
    _check(batch=batch, seq_len=seq_len, rank=rank, targets=targets)
    return float(_flops(shape, batch, seq_len, rank, targets)[0])


def train_step_flops(shape: ModelShape, *, batch: int, seq_len: int, rank: int, targets: Sequence[str]) -> float:
    """FLOPs of one forward + backward with frozen base weights and trainable LoRA."""
    _check(batch=batch, seq_len=seq_len, rank=rank, targets=targets)
    return float(sum(_flops(shape, batch, seq_len, rank, targets)))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step holds (module docstring)."""

    weights: int
    adapter: int
    optimizer: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.gradients + self.activations


def _layer_activations(layer: LayerShape, d: int, r: int, adapted: frozenset[str], g: dict[str, bool]) -> int:
    """Elements per token that autograd saves in one decoder layer (SDPA attention)."""
    q, kv, m = layer.q_out, layer.kv_out, layer.mlp
    return (
        g["x"] * (d + 1)  # input RMSNorm: x, 1/rms
        + bool(adapted & {"q_proj", "k_proj", "v_proj"}) * d  # LoRA A input
        + g["attn"] * (q + 2 * kv + q // layer.head_dim)  # SDPA: q, k, v, logsumexp
        + (g["attn"] or "o_proj" in adapted) * q  # attention output
        + g["h"] * (d + 1)  # post-attention RMSNorm
        + bool(adapted & {"gate_proj", "up_proj"}) * d  # LoRA A input
        + (g["gate"] + g["up"] + g["gate"]) * m  # SiLU in, SiLU out, up out
        + ("down_proj" in adapted) * m  # LoRA A input
        + r * len(adapted)  # LoRA B inputs
    )


def train_memory(
    shape: ModelShape,
    *,
    batch: int,
    seq_len: int,
    rank: int,
    targets: Sequence[str],
    weight_bytes: int = 4,
) -> MemoryEstimate:
    """Estimated bytes of one training step: weights, LoRA + AdamW state, activations."""
    _check(batch=batch, seq_len=seq_len, rank=rank, targets=targets, weight_bytes=weight_bytes)
    adapted = frozenset(targets) if rank > 0 else frozenset()
    per_token, live = 0, False
    for layer in shape.layers:
        g = _grad_flow(adapted, live)
        per_token += _layer_activations(layer, shape.hidden, rank, adapted, g) * weight_bytes
        live = g["out"]
    per_token += live * ((shape.hidden + 1) * weight_bytes + 4 * shape.vocab + 8)  # norm, loss
    lora = lora_params(shape, rank, targets)
    return MemoryEstimate(
        weights=shape.num_params * weight_bytes,
        adapter=4 * lora,
        optimizer=8 * lora,
        gradients=4 * lora,
        activations=batch * seq_len * per_token,
    )
