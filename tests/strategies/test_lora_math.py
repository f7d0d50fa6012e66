"""`strategies.lora_math` against direct torch computations of each paper's formula.

Every reference here is written out from the formula (einsum products, hand-built zero padding,
norms as square roots of sums of squares) rather than through the module's own helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.lora_math import (
    aggregation_bias,
    apply_per_layer,
    fedex_lora,
    fedit,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora_stack,
    hetlora,
    hetlora_rank_penalty,
    hetlora_weights,
    layer_pairs,
    lora_fair,
    merge_into_base,
    product_svd,
    truncate,
    update_stack,
    weighted_product,
    zero_pad,
)

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)
F64 = torch.float64


# --- references and builders ---------------------------------------------------------------


@dataclass
class Layer:
    As: list[torch.Tensor]  # (r_k, in)
    Bs: list[torch.Tensor]  # (out, r_k)
    scales: list[float]
    weights: list[float]

    @property
    def p(self) -> list[float]:
        return [w / sum(self.weights) for w in self.weights]


def make_layer(seed: int, in_: int, out: int, ranks: list[int], scales=None, weights=None) -> Layer:
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, in_, generator=g, dtype=F64) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=F64) for r in ranks]
    k = len(ranks)
    return Layer(As, Bs, scales or [1.0 + i for i in range(k)], weights or [1.0 + 2 * i for i in range(k)])


def ideal(layer: Layer) -> torch.Tensor:
    """Σ_k p_k s_k B_k A_k, written out."""
    terms = [p * s * torch.einsum("or,ri->oi", B, A) for p, s, A, B in zip(layer.p, layer.scales, layer.As, layer.Bs)]
    return torch.stack(terms).sum(0)


def pad(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    A_pad, B_pad = torch.zeros(r, A.shape[1], dtype=A.dtype), torch.zeros(B.shape[0], r, dtype=B.dtype)
    A_pad[: A.shape[0]], B_pad[:, : B.shape[1]] = A, B
    return A_pad, B_pad


def padded_means(layer: Layer, r: int, s_g: float, p: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ p_k pad(A_k), Σ p_k (s_k / s_g) pad(B_k)), written out."""
    p = p or layer.p
    pairs = [pad(A, B, r) for A, B in zip(layer.As, layer.Bs)]
    A = torch.stack([p_k * A_k for p_k, (A_k, _) in zip(p, pairs)]).sum(0)
    B = torch.stack([p_k * s_k / s_g * B_k for p_k, s_k, (_, B_k) in zip(p, layer.scales, pairs)]).sum(0)
    return A, B


def frobenius(M: torch.Tensor) -> float:
    return math.sqrt((M**2).sum().item())


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()


@st.composite
def layers(draw, max_clients: int = 4, max_dim: int = 8) -> Layer:
    in_, out = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_clients))
    ranks = draw(st.lists(st.integers(1, min(in_, out)), min_size=k, max_size=k))
    scales = draw(st.lists(st.floats(0.1, 4.0), min_size=k, max_size=k))
    weights = draw(st.lists(st.floats(0.1, 10.0), min_size=k, max_size=k))
    return make_layer(draw(st.integers(0, 2**16)), in_, out, ranks, scales, weights)


# --- identical clients: every rule returns their update -------------------------------------

R, S = 3, 2.0  # the clients' rank and scaling (alpha 6 / r 3)

STRATEGIES = {
    "weighted_product": lambda L: weighted_product(L.As, L.Bs, L.scales, L.weights),
    "fedit": lambda L: S * torch.matmul(*fedit(L.As, L.Bs, L.scales, L.weights, R)[::-1]),
    "fedit-padded": lambda L: S * torch.matmul(*fedit(L.As, L.Bs, L.scales, L.weights, R + 2)[::-1]),
    "hetlora": lambda L: S * torch.matmul(*hetlora(L.As, L.Bs, L.scales, L.weights, R + 1)[::-1]),
    "flexlora": lambda L: S * torch.matmul(*flexlora(L.As, L.Bs, L.scales, L.weights, [R], [S])[0][::-1]),
    "flora": lambda L: torch.matmul(*flora_stack(L.As, L.Bs, L.scales, L.weights)[::-1]),
    "ffa_lora": lambda L: S * ffa_lora(L.Bs, L.scales, L.weights, L.As[0]) @ L.As[0],
    "fedsa_lora": lambda L: S * L.Bs[0] @ fedsa_lora(L.As, L.weights),
    "fedex_lora": lambda L: (lambda A, B, res: res + S * B @ A)(*fedex_lora(L.As, L.Bs, L.scales, L.weights, R)),
    "lora_fair": lambda L: S * torch.matmul(*lora_fair(L.As, L.Bs, L.scales, L.weights)[::-1]),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_identical_clients_get_their_own_update_back(name):
    one = make_layer(seed=1, in_=7, out=5, ranks=[R])
    clients = Layer([one.As[0]] * 3, [one.Bs[0]] * 3, [S] * 3, [1.0, 2.0, 5.0])

    product = STRATEGIES[name](clients)

    torch.testing.assert_close(product, S * one.Bs[0] @ one.As[0], rtol=1e-9, atol=1e-9)


# --- ideal update and FLoRA -----------------------------------------------------------------


@PROPERTY
@given(layers())
def test_weighted_product_is_the_weighted_mean_of_scaled_products(layer):
    torch.testing.assert_close(weighted_product(layer.As, layer.Bs, layer.scales, layer.weights), ideal(layer))


@PROPERTY
@given(layers())
def test_flora_stack_product_is_the_ideal_update_with_mixed_ranks(layer):
    A_stack, B_stack = flora_stack(layer.As, layer.Bs, layer.scales, layer.weights)

    assert A_stack.shape == (sum(A.shape[0] for A in layer.As), layer.As[0].shape[1])
    assert B_stack.shape == (layer.Bs[0].shape[0], A_stack.shape[0])
    torch.testing.assert_close(B_stack @ A_stack, ideal(layer))


def test_merge_into_base_adds_and_checks_shape():
    W, delta = torch.ones(3, 4), torch.full((3, 4), 0.5)

    assert torch.equal(merge_into_base(W, delta), torch.full((3, 4), 1.5))
    assert torch.equal(W, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"\(4, 3\) does not match base weight \(3, 4\)"):
        merge_into_base(W, delta.T)


# --- FlexLoRA: Eckart–Young -----------------------------------------------------------------


@PROPERTY
@given(layers(), st.data())
def test_flexlora_gives_each_client_the_best_rank_r_approximation(layer, data):
    out, in_ = layer.Bs[0].shape[0], layer.As[0].shape[1]
    ranks_out = data.draw(st.lists(st.integers(1, min(in_, out)), min_size=1, max_size=3))
    s_out = data.draw(st.lists(st.floats(0.1, 4.0), min_size=len(ranks_out), max_size=len(ranks_out)))
    delta = ideal(layer)
    U, sigma, Vh = torch.linalg.svd(delta, full_matrices=False)

    factors = flexlora(layer.As, layer.Bs, layer.scales, layer.weights, ranks_out, s_out)

    for (A, B), r, s in zip(factors, ranks_out, s_out):
        assert A.shape == (r, in_) and B.shape == (out, r)
        torch.testing.assert_close(s * B @ A, U[:, :r] @ torch.diag(sigma[:r]) @ Vh[:r], rtol=1e-7, atol=1e-7)
        discarded = math.sqrt((sigma[r:] ** 2).sum().item())
        assert frobenius(delta - s * B @ A) == pytest.approx(discarded, rel=1e-7, abs=1e-7)


@pytest.mark.parametrize("in_, out, ranks, r_out", [(9, 7, [2, 4, 3], 2), (6, 10, [5, 1], 3), (8, 8, [4, 4, 4, 4], 1)])
def test_flexlora_is_not_beaten_by_rank_r_perturbations(in_, out, ranks, r_out):
    layer = make_layer(seed=3, in_=in_, out=out, ranks=ranks)
    delta, g = ideal(layer), torch.Generator().manual_seed(4)
    [(A, B)] = flexlora(layer.As, layer.Bs, layer.scales, layer.weights, [r_out], [0.5])
    best = frobenius(delta - 0.5 * B @ A)

    for eps in (1e-3, 1e-2, 1e-1):
        for _ in range(10):
            A_p = A + eps * torch.randn(A.shape, generator=g, dtype=F64)
            B_p = B + eps * torch.randn(B.shape, generator=g, dtype=F64)
            assert frobenius(delta - 0.5 * B_p @ A_p) >= best - 1e-12


# --- FFA-LoRA and FedSA-LoRA ----------------------------------------------------------------


@PROPERTY
@given(layers())
def test_ffa_lora_keeps_a_frozen_and_is_exact_with_mixed_scalings(layer):
    A_frozen, out, g = layer.As[0], layer.Bs[0].shape[0], torch.Generator().manual_seed(21)
    Bs = [torch.randn(out, A_frozen.shape[0], generator=g, dtype=F64) for _ in layer.Bs]  # all of A's rank
    before = A_frozen.clone()

    B = ffa_lora(Bs, layer.scales, layer.weights, A_frozen, s_g=0.7)

    assert torch.equal(A_frozen, before)
    expected = torch.stack([p * s * B_k @ A_frozen for p, s, B_k in zip(layer.p, layer.scales, Bs)]).sum(0)
    torch.testing.assert_close(0.7 * B @ A_frozen, expected)


def test_fedsa_lora_averages_a_only():
    layer = make_layer(seed=5, in_=6, out=4, ranks=[2, 2, 2])

    A = fedsa_lora(layer.As, layer.weights)

    torch.testing.assert_close(A, sum(p * A_k for p, A_k in zip(layer.p, layer.As)))
    with pytest.raises(ValueError, match=r"client 1 has A \(3, 6\)"):
        fedsa_lora([layer.As[0], torch.zeros(3, 6)], [1.0, 1.0])


# --- HetLoRA --------------------------------------------------------------------------------


@PROPERTY
@given(layers(), st.data())
def test_zero_pad_then_truncate_is_the_identity_and_keeps_the_product(layer, data):
    A, B = layer.As[0], layer.Bs[0]
    r_k, limit = A.shape[0], min(A.shape[1], B.shape[0])
    r = data.draw(st.integers(r_k, limit))

    A_pad, B_pad = zero_pad(A, B, r)
    A_back, B_back = truncate(A_pad, B_pad, r_k)

    assert A_pad.shape == (r, A.shape[1]) and B_pad.shape == (B.shape[0], r)
    assert torch.equal(A_pad[r_k:], torch.zeros_like(A_pad[r_k:])) and not B_pad[:, r_k:].any()
    assert torch.equal(A_back, A) and torch.equal(B_back, B)
    torch.testing.assert_close(B_pad @ A_pad, B @ A)


@PROPERTY
@given(layers())
def test_hetlora_weights_are_proportional_to_update_norms(layer):
    direct = [w * s * frobenius(B @ A) for w, s, A, B in zip(layer.weights, layer.scales, layer.As, layer.Bs)]

    p = hetlora_weights(layer.As, layer.Bs, layer.scales, layer.weights)
    paper = hetlora_weights(layer.As, layer.Bs, layer.scales, [1.0] * len(layer.As))

    assert p == pytest.approx([d / sum(direct) for d in direct], rel=1e-9)
    norms = [s * frobenius(B @ A) for s, A, B in zip(layer.scales, layer.As, layer.Bs)]
    assert paper == pytest.approx([n / sum(norms) for n in norms], rel=1e-9)


@PROPERTY
@given(layers(), st.data())
def test_hetlora_aggregate_matches_direct_and_truncation_commutes(layer, data):
    limit = min(layer.As[0].shape[1], layer.Bs[0].shape[0])
    r_max = data.draw(st.integers(max(A.shape[0] for A in layer.As), limit))
    r = data.draw(st.integers(1, r_max))
    norms = [w * s * frobenius(B @ A) for w, s, A, B in zip(layer.weights, layer.scales, layer.As, layer.Bs)]
    p = [n / sum(norms) for n in norms]

    A, B = hetlora(layer.As, layer.Bs, layer.scales, layer.weights, r_max, s_g=1.5)
    A_r, B_r = truncate(A, B, r)

    A_ref, B_ref = padded_means(layer, r_max, 1.5, p)
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(B, B_ref)
    # client j's downlink = the norm-weighted mean of every client's first r ranks, zero-filled
    A_cut = [pad(A_k[:r], B_k[:, :r], r)[0] for A_k, B_k in zip(layer.As, layer.Bs)]
    B_cut = [pad(A_k[:r], B_k[:, :r], r)[1] for A_k, B_k in zip(layer.As, layer.Bs)]
    torch.testing.assert_close(A_r, sum(p_k * A_k for p_k, A_k in zip(p, A_cut)))
    torch.testing.assert_close(B_r, sum(p_k * s_k / 1.5 * B_k for p_k, s_k, B_k in zip(p, layer.scales, B_cut)))


def test_hetlora_falls_back_to_sample_weights_when_every_update_is_zero():
    As, Bs = [torch.ones(2, 4), torch.ones(2, 4)], [torch.zeros(3, 2), torch.zeros(3, 2)]

    assert hetlora_weights(As, Bs, [1.0, 1.0], [1.0, 3.0]) == [0.25, 0.75]


@pytest.mark.parametrize("r_k, gamma, tail", [(8, 0.5, slice(4, 8)), (6, 0.75, slice(4, 6)), (5, 1.0, slice(5, 5))])
def test_hetlora_rank_penalty_is_the_norm_of_the_tail_product(r_k, gamma, tail):
    layer = make_layer(seed=6, in_=10, out=9, ranks=[8])
    A, B = layer.As[0].clone().requires_grad_(True), layer.Bs[0].clone().requires_grad_(True)

    penalty = hetlora_rank_penalty(B, A, r_k, gamma, lam=0.3)
    penalty.backward()

    assert penalty.item() == pytest.approx(0.3 * frobenius(B[:, tail] @ A[tail]), rel=1e-12, abs=1e-15)
    assert not A.grad[: tail.start].any() and not B.grad[:, : tail.start].any()  # head ranks are free
    assert not A.grad[r_k:].any()  # ranks beyond r_k (padding) are not penalised


# --- FedIT scaling and FedEx-LoRA -----------------------------------------------------------


def test_fedit_folds_mixed_scalings_so_a_shared_a_is_exact():
    layer = make_layer(seed=7, in_=6, out=5, ranks=[3, 3, 3], scales=[16 / 3, 8 / 3, 32 / 3])  # alpha 16, 8, 32
    shared = Layer([layer.As[0]] * 3, layer.Bs, layer.scales, layer.weights)
    s_g = 16 / 4  # global alpha 16, r_max 4

    A, B = fedit(shared.As, shared.Bs, shared.scales, shared.weights, r_max=4, s_g=s_g)

    torch.testing.assert_close(s_g * B @ A, ideal(shared))
    naive = sum(p * pad(layer.As[0], B_k, 4)[1] for p, B_k in zip(shared.p, shared.Bs))  # unscaled mean of B
    assert frobenius(s_g * naive @ A - ideal(shared)) > 0.1 * frobenius(ideal(shared))


def test_fedit_zero_pads_mixed_ranks_to_r_max():
    layer = make_layer(seed=8, in_=7, out=6, ranks=[2, 4, 3])

    A, B = fedit(layer.As, layer.Bs, layer.scales, layer.weights, r_max=5, s_g=2.0)

    assert A.shape == (5, 7) and B.shape == (6, 5)
    assert not A[4:].any() and not B[:, 4:].any()
    A_ref, B_ref = padded_means(layer, 5, 2.0)
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(B, B_ref)


@PROPERTY
@given(layers(), st.floats(0.1, 4.0))
def test_fedex_residual_makes_the_merged_model_exact(layer, s_g):
    r_max = max(A.shape[0] for A in layer.As)
    base = torch.randn(
        layer.Bs[0].shape[0], layer.As[0].shape[1], generator=torch.Generator().manual_seed(9), dtype=F64
    )

    A, B, residual = fedex_lora(layer.As, layer.Bs, layer.scales, layer.weights, r_max, s_g=s_g)

    torch.testing.assert_close(merge_into_base(base, residual) + s_g * B @ A, base + ideal(layer))
    A_ref, B_ref = padded_means(layer, r_max, s_g)
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(B, B_ref)


# --- LoRA-FAIR ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, ranks", [(10, [4, 4, 4]), (11, [2, 4, 3]), (12, [1, 3])])
def test_lora_fair_improves_the_cosine_and_lambda_bounds_the_correction(seed, ranks):
    layer = make_layer(seed=seed, in_=12, out=10, ranks=ranks)
    s_g, target = 1.0, ideal(layer)
    A_bar, B_bar = padded_means(layer, max(ranks), s_g)
    rng = torch.get_rng_state()

    A, B = lora_fair(layer.As, layer.Bs, layer.scales, layer.weights, lam=0.01, s_g=s_g)

    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(A, A_bar)
    before, after = cosine(target, s_g * B_bar @ A_bar), cosine(target, s_g * B @ A)
    assert after > before
    assert 0.01 * frobenius(B - B_bar) <= after - before + 1e-12  # the objective did not rise
    A2, B2 = lora_fair(layer.As, layer.Bs, layer.scales, layer.weights, lam=0.01, s_g=s_g)
    assert torch.equal(A2, A) and torch.equal(B2, B)  # deterministic


def test_lora_fair_large_lambda_keeps_the_mean():
    layer = make_layer(seed=13, in_=12, out=10, ranks=[3, 3, 3])

    _, B = lora_fair(layer.As, layer.Bs, layer.scales, layer.weights, lam=100.0, s_g=1.0)

    torch.testing.assert_close(B, padded_means(layer, 3, 1.0)[1], rtol=0, atol=0)


# --- aggregation bias -----------------------------------------------------------------------


def test_aggregation_bias_is_zero_for_identical_clients():
    one = make_layer(seed=14, in_=6, out=5, ranks=[3])

    assert aggregation_bias([one.As[0]] * 4, [one.Bs[0]] * 4, [2.0] * 4, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        0, abs=1e-12
    )


@PROPERTY
@given(layers())
def test_aggregation_bias_matches_direct_computation(layer):
    A_mean, sB_mean = padded_means(layer, max(A.shape[0] for A in layer.As), 1.0)
    direct = frobenius(sB_mean @ A_mean - ideal(layer)) / frobenius(ideal(layer))

    assert aggregation_bias(layer.As, layer.Bs, layer.scales, layer.weights) == pytest.approx(
        direct, rel=1e-7, abs=1e-9
    )


def test_aggregation_bias_is_positive_for_diverse_clients():
    layer = make_layer(seed=15, in_=8, out=8, ranks=[2, 4, 3])

    assert aggregation_bias(layer.As, layer.Bs, layer.scales, layer.weights) > 0.1


# --- state dicts ----------------------------------------------------------------------------


def peft_state(seed: int, rank: int, adapter: str = "") -> dict[str, torch.Tensor]:
    g, state = torch.Generator().manual_seed(seed), {}
    for layer in range(2):
        for module, out in (("q_proj", 8), ("v_proj", 4)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A{adapter}.weight"] = torch.randn(rank, 8, generator=g)
            state[f"{prefix}.lora_B{adapter}.weight"] = torch.randn(out, rank, generator=g)
    state["base_model.model.lm_head.weight"] = torch.zeros(3, 8)  # not LoRA: ignored
    return state


@pytest.mark.parametrize("adapter", ["", ".default"])
def test_layer_pairs_maps_prefixes_to_peft_keys(adapter):
    pairs = layer_pairs(peft_state(seed=16, rank=2, adapter=adapter))

    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    assert len(pairs) == 4
    assert pairs[prefix] == (f"{prefix}.lora_A{adapter}.weight", f"{prefix}.lora_B{adapter}.weight")


def test_apply_per_layer_runs_the_rule_on_every_layer():
    states = [peft_state(seed=17, rank=2), peft_state(seed=18, rank=2)]

    out = apply_per_layer(states, lambda As, Bs: fedit(As, Bs, [1.0, 1.0], [1.0, 3.0], 2))

    assert set(out) == set(states[0]) - {"base_model.model.lm_head.weight"}
    for key, value in out.items():
        torch.testing.assert_close(value, 0.25 * states[0][key] + 0.75 * states[1][key])


def test_layer_pairs_refuses_two_adapters_on_one_layer():
    state = peft_state(seed=22, rank=2) | peft_state(seed=23, rank=2, adapter=".other")

    with pytest.raises(ValueError, match=r"lora_A\.other\.weight` and `.*lora_A\.weight` are both lora_A"):
        layer_pairs(state)


def test_apply_per_layer_names_the_client_missing_a_layer():
    states = [peft_state(seed=24, rank=2), peft_state(seed=25, rank=2)]
    del states[1]["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]

    with pytest.raises(ValueError, match=r"client 1 has no .*layers\.1\.self_attn\.q_proj\.lora_A\.weight"):
        apply_per_layer(states, lambda As, Bs: fedit(As, Bs, [1.0, 1.0], [1.0, 1.0], 2))


# --- errors ---------------------------------------------------------------------------------

LIMIT = r"min\(in_features, out_features\) = 4"


@pytest.mark.parametrize(
    "call",
    [
        lambda A, B: zero_pad(A, B, 5),
        lambda A, B: truncate(torch.randn(6, 4), torch.randn(6, 6), 5),
        lambda A, B: fedit([A], [B], [1.0], [1.0], r_max=7),
        lambda A, B: flexlora([A], [B], [1.0], [1.0], ranks_out=[5], s_g_per_client=[1.0]),
    ],
    ids=["zero_pad", "truncate", "fedit", "flexlora"],
)
def test_rank_beyond_the_layer_names_the_limit(call):
    A, B = torch.randn(2, 4), torch.randn(6, 2)  # in 4, out 6

    with pytest.raises(ValueError, match=LIMIT):
        call(A, B)


def test_incomplete_pair_names_the_key():
    state = peft_state(seed=19, rank=2)
    del state["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]

    with pytest.raises(ValueError, match=r"`base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight`"):
        layer_pairs(state)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda L: fedit(L.As, L.Bs, [1.0, 2.0], L.weights, 3), r"scalings differ .* pass `s_g`"),
        (lambda L: fedit(L.As, L.Bs, L.scales, [1.0, -1.0], 3, s_g=1.0), r"`weights\[1\]` must be finite and >= 0"),
        (lambda L: fedit(L.As, L.Bs, L.scales, [0.0, 0.0], 3, s_g=1.0), r"`weights` must have a positive sum"),
        (lambda L: weighted_product(L.As, L.Bs, [1.0, 0.0], L.weights), r"`scales\[1\]` must be finite and > 0"),
        (lambda L: zero_pad(L.As[1], L.Bs[1], 2), r"below the factors' rank 3; use `truncate`"),
        (lambda L: truncate(L.As[0], L.Bs[0], 3), r"exceeds the factors' rank 2; use `zero_pad`"),
        (lambda L: weighted_product(L.As, [L.Bs[1], L.Bs[0]], L.scales, L.weights), r"expected A \(r, in\)"),
        (lambda L: hetlora_rank_penalty(L.Bs[0], L.As[0], 2, 1.5), r"`gamma` must be in \[0, 1\]"),
    ],
)
def test_bad_inputs_are_refused_with_the_field_named(call, message):
    layer = make_layer(seed=20, in_=6, out=5, ranks=[2, 3])

    with pytest.raises(ValueError, match=message):
        call(layer)


# --- SVD of a product from its factors, and the "holders" ideal update ----------------------


@pytest.mark.parametrize(("out", "in_", "R", "rank"), [(12, 10, 6, 4), (5, 7, 9, 5), (12, 10, 2, 6)])
def test_product_svd_is_the_dense_svd_of_the_product(out: int, in_: int, R: int, rank: int) -> None:
    g = torch.Generator().manual_seed(out * in_ + R)
    B, A = torch.randn(out, R, generator=g, dtype=torch.float64), torch.randn(R, in_, generator=g, dtype=torch.float64)
    U, S, Vh = product_svd(B, A, rank)
    U_d, S_d, Vh_d = torch.linalg.svd(B @ A)
    k = min(rank, R)  # B A has rank R: beyond it S is zero and Vh is completed
    torch.testing.assert_close(S[:k], S_d[:k])
    assert S.shape == (rank,) and not S[k:].any()
    torch.testing.assert_close(U * S @ Vh, U_d[:, :k] * S_d[:k] @ Vh_d[:k])  # the best rank-`rank` approximation
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(rank, dtype=torch.float64))


def test_update_stack_holders_is_the_global_moved_by_the_clients_mean_change() -> None:
    layer = make_layer(seed=3, in_=9, out=7, ranks=[2, 4], weights=[1.0, 3.0])
    g = torch.Generator().manual_seed(4)
    A_g, B_g, s_g = (
        torch.randn(6, 9, generator=g, dtype=torch.float64),
        torch.randn(7, 6, generator=g, dtype=torch.float64),
        0.5,
    )
    B_s, A_s = update_stack(layer.As, layer.Bs, layer.scales, layer.weights, (A_g, B_g, s_g))
    p = [w / sum(layer.weights) for w in layer.weights]
    expected = s_g * B_g @ A_g + sum(
        p_k * (s_k * B_k @ A_k - s_g * B_g[:, : A_k.shape[0]] @ A_g[: A_k.shape[0]])
        for p_k, s_k, A_k, B_k in zip(p, layer.scales, layer.As, layer.Bs)
    )
    torch.testing.assert_close(B_s @ A_s, expected)
    torch.testing.assert_close(
        torch.matmul(*update_stack(layer.As, layer.Bs, layer.scales, layer.weights)), ideal(layer)
    )
