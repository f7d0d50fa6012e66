"""fedsim.fleet.costs against the real thing: FlopCounterMode and the tensors autograd saves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import peft
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedsim.config.names import PROJECTIONS
from fedsim.fleet.costs import (
    LayerShape,
    ModelShape,
    forward_flops,
    lora_params,
    train_memory,
    train_step_flops,
)
from fedsim.model.loader import load_model

QV = ("q_proj", "v_proj")
HEAD_DIM = 16  # of the bigger model: 128 hidden / 8 heads


def _tiny() -> torch.nn.Module:
    return load_model("tiny-llama")[0]  # 2 layers, hidden 64, 4 heads, 2 kv heads, tied


def _bigger() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=344,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def _shrink(linear: torch.nn.Linear, out: int | None = None, in_: int | None = None) -> torch.nn.Linear:
    weight = linear.weight.data[:out, :in_]  # keep the first rows (out) and columns (in)
    smaller = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    smaller.weight.data.copy_(weight)
    return smaller


# layer index -> (heads kept of 8, MLP channels kept of 344); kv heads stay 2
PRUNING = {1: (4, 200), 2: (2, 96), 3: (6, 344)}


def _pruned() -> torch.nn.Module:
    """The bigger model with structured pruning: uneven heads and MLP channels per layer."""
    model = _bigger()
    for i, (heads, mlp) in PRUNING.items():
        attn, ffn = model.model.layers[i].self_attn, model.model.layers[i].mlp
        attn.q_proj = _shrink(attn.q_proj, out=heads * HEAD_DIM)
        attn.o_proj = _shrink(attn.o_proj, in_=heads * HEAD_DIM)
        attn.num_key_value_groups = heads // 2
        ffn.gate_proj, ffn.up_proj = _shrink(ffn.gate_proj, out=mlp), _shrink(ffn.up_proj, out=mlp)
        ffn.down_proj = _shrink(ffn.down_proj, in_=mlp)
    return model


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny": _tiny,
    "bigger": _bigger,
    "pruned": _pruned,
}


def _lora(model: torch.nn.Module, targets: Sequence[str], rank: int = 8) -> peft.PeftModel:
    config = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=list(targets), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return peft.get_peft_model(model, config).train()


def _batch(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _attention(model: torch.nn.Module, impl: str) -> Iterator[None]:
    """eager, or SDPA on its math backend: FlopCounterMode cannot see CPU's fused SDPA."""
    model.config._attn_implementation = "eager" if impl == "eager" else "sdpa"
    with sdpa_kernel(SDPBackend.MATH) if impl == "sdpa-math" else contextlib.nullcontext():
        yield


def _counted_flops(model: torch.nn.Module, b: int, t: int, impl: str) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs as torch counts them."""
    ids = _batch(b, t)
    with _attention(model, impl), FlopCounterMode(display=False) as counter:
        loss = model(input_ids=ids, labels=ids).loss
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


def _saved_bytes(model: torch.nn.Module, b: int, t: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward (SDPA)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return x

    ids = _batch(b, t)
    model.config._attn_implementation = "sdpa"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(saved.values())


# --- shapes ------------------------------------------------------------------------


def test_from_model_reads_uneven_pruned_shapes() -> None:
    shape = ModelShape.from_model(_pruned())

    full = LayerShape(q_out=128, kv_out=32, head_dim=16, mlp=344)
    expected = (full, *(LayerShape(h * HEAD_DIM, 32, 16, m) for h, m in PRUNING.values()))
    assert shape == ModelShape(hidden=128, vocab=1000, layers=expected, tied_embeddings=False)


@pytest.mark.parametrize("name", MODELS)
def test_num_params_matches_the_model(name: str) -> None:
    model = MODELS[name]()
    shape = ModelShape.from_model(model)

    assert shape.num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets", [QV, PROJECTIONS])
@pytest.mark.parametrize("name", MODELS)
def test_from_model_unwraps_peft_and_counts_lora_params(name: str, targets: tuple[str, ...]) -> None:
    model = MODELS[name]()
    shape = ModelShape.from_model(model)

    wrapped = _lora(model, targets, rank=4)

    assert ModelShape.from_model(wrapped) == shape
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert lora_params(shape, 4, targets) == trainable


def test_from_model_names_a_model_that_is_not_llama_like() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))

    with pytest.raises(ValueError, match="GPT2LMHeadModel.*'gpt2'.*not a Llama-like"):
        ModelShape.from_model(gpt2)


# --- FLOPs -------------------------------------------------------------------------


def _flops(shape: ModelShape, b: int, t: int, r: int, targets: Sequence[str]) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs as fedsim.fleet.costs estimates them."""
    return (
        forward_flops(shape, batch=b, seq_len=t, rank=r, targets=targets),
        train_step_flops(shape, batch=b, seq_len=t, rank=r, targets=targets),
    )


@pytest.mark.parametrize("impl", ["eager", "sdpa-math"])
@pytest.mark.parametrize("rank", [4, 16])
@pytest.mark.parametrize("targets", [QV, PROJECTIONS])
@pytest.mark.parametrize("name", MODELS)
def test_flops_match_flop_counter(name: str, targets: tuple[str, ...], rank: int, impl: str) -> None:
    model = _lora(MODELS[name](), targets, rank)
    shape = ModelShape.from_model(model)
    b, t = 2, 24

    counted = _counted_flops(model, b, t, impl)

    assert _flops(shape, b, t, rank, targets) == pytest.approx(counted, rel=1e-3)


@pytest.mark.parametrize("targets", [("o_proj",), ("down_proj",), ("k_proj", "up_proj")])
def test_flops_match_when_the_gradient_starts_mid_layer(targets: tuple[str, ...]) -> None:
    model = _lora(_pruned(), targets)
    shape = ModelShape.from_model(model)

    counted = _counted_flops(model, 3, 16, "eager")

    assert _flops(shape, 3, 16, 8, targets) == pytest.approx(counted, rel=1e-3)


def _linear_flops(layer: LayerShape, d: int, n: int, r: int, targets: Sequence[str]) -> tuple[int, int]:
    """Σ 2·N·in·out and Σ_targets 2·N·r·(in + out), written out by hand."""
    q, kv, m = layer.q_out, layer.kv_out, layer.mlp
    io = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
          "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}  # fmt: skip
    base = sum(2 * n * i * o for i, o in io.values())
    lora = sum(2 * n * r * (i + o) for name, (i, o) in io.items() if name in targets)
    return base, lora


@pytest.mark.parametrize("targets", [QV, PROJECTIONS, ("gate_proj",)])
def test_every_layer_after_the_first_trains_at_2_3_3(targets: tuple[str, ...]) -> None:
    first = LayerShape(q_out=128, kv_out=32, head_dim=16, mlp=344)
    uneven = (LayerShape(64, 32, 16, 200), LayerShape(32, 32, 16, 96), LayerShape(96, 16, 16, 500))
    b, t, r, d = 3, 40, 8, 128

    def cost(*layers: LayerShape) -> tuple[float, float]:
        shape = ModelShape(hidden=d, vocab=1000, layers=layers, tied_embeddings=False)
        return _flops(shape, b, t, r, targets)

    for layer in uneven:  # train = 2·F_lin + 3·F_lora + 3·F_attn, whatever comes before
        base, lora = _linear_flops(layer, d, b * t, r, targets)
        attn = 2 * 2 * b * t * t * layer.q_out
        with_it = cost(first, *uneven)
        without = cost(first, *(u for u in uneven if u is not layer))
        assert with_it[0] - without[0] == base + lora + attn
        assert with_it[1] - without[1] == 2 * base + 3 * lora + 3 * attn


def test_nothing_trainable_means_forward_only() -> None:
    shape = ModelShape.from_model(_tiny())

    train = train_step_flops(shape, batch=2, seq_len=16, rank=0, targets=QV)

    assert train == forward_flops(shape, batch=2, seq_len=16)
    assert train_memory(shape, batch=2, seq_len=16, rank=0, targets=QV).activations == 0


# --- memory ------------------------------------------------------------------------


@pytest.mark.parametrize("b, t", [(2, 32), (1, 64), (4, 16)])
@pytest.mark.parametrize("targets", [QV, PROJECTIONS, ("down_proj",)])
@pytest.mark.parametrize("name", MODELS)
def test_activations_match_saved_tensors(name: str, targets: tuple[str, ...], b: int, t: int) -> None:
    model = _lora(MODELS[name](), targets)
    shape = ModelShape.from_model(model)

    measured = _saved_bytes(model, b, t)

    estimate = train_memory(shape, batch=b, seq_len=t, rank=8, targets=targets)
    assert estimate.activations == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("name", MODELS)
def test_activations_scale_linearly_with_batch(name: str) -> None:
    shape = ModelShape.from_model(MODELS[name]())

    measured = [_saved_bytes(_lora(MODELS[name](), QV), b, 16) for b in (2, 4, 8)]

    assert measured[2] / measured[0] == pytest.approx(4, rel=0.02)
    assert measured[1] / measured[0] == pytest.approx(2, rel=0.02)
    estimate = [train_memory(shape, batch=b, seq_len=16, rank=8, targets=QV) for b in (2, 8)]
    assert estimate[1].activations == 4 * estimate[0].activations


@pytest.mark.parametrize("weight_bytes", [2, 4])
def test_memory_parts(weight_bytes: int) -> None:
    shape = ModelShape.from_model(_bigger())
    lora = lora_params(shape, 8, PROJECTIONS)

    mem = train_memory(shape, batch=2, seq_len=32, rank=8, targets=PROJECTIONS, weight_bytes=weight_bytes)

    assert (mem.weights, mem.adapter, mem.gradients, mem.optimizer) == (
        shape.num_params * weight_bytes,
        4 * lora,
        4 * lora,
        8 * lora,
    )
    assert mem.total == mem.weights + mem.adapter + mem.gradients + mem.optimizer + mem.activations


def test_bad_arguments_are_all_reported() -> None:
    shape = ModelShape.from_model(_tiny())

    with pytest.raises(ValueError) as err:
        train_step_flops(shape, batch=0, seq_len=-1, rank=-2, targets=("qkv",))

    for field in ("`batch`", "`seq_len`", "`rank`", "`targets`", "'qkv'"):
        assert field in str(err.value)
