"""The strategies as Flower strategies: per-node messages at each client's rank, and aggregation
of mixed-rank replies, checked against direct torch computations of each paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam
from tests_support.grids import NodesOnly
from tests_support.messages import train_reply

from fedsim.config.names import ASYNC_STRATEGIES
from fedsim.model.adapter import AdapterState, from_record, split_state
from strategies import STRATEGIES, FedIT, LoraStrategy
from strategies.fedex_lora import FedExLoRA
from strategies.fedsa_lora import FedSALoRA
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.flower_optimizers import SAMPLING, fedprox
from strategies.hetlora import HetLoRA
from strategies.lora_fair import LoRAFAIR

R_MAX, ALPHA = 8, 16.0
LAYERS = {
    "base_model.model.model.layers.0.self_attn.q_proj": (12, 10),
    "base_model.model.model.layers.1.mlp.down_proj": (9, 12),
}  # (in, out)
RANKS = {101: 2, 102: 4, 103: 8}  # node id → rank
EXAMPLES = {101: 10.0, 102: 30.0, 103: 20.0}
ALL = [FedIT, HetLoRA, FlexLoRA, FLoRA, FFALoRA, FedSALoRA, FedExLoRA, LoRAFAIR]


def a_key(prefix: str) -> str:
    return f"{prefix}.lora_A.weight"


def b_key(prefix: str) -> str:
    return f"{prefix}.lora_B.weight"


def global_state(seed: int = 0) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (i, o) in LAYERS.items():
        out[a_key(prefix)] = torch.randn(R_MAX, i, generator=g, dtype=torch.float64).float()
        out[b_key(prefix)] = torch.randn(o, R_MAX, generator=g, dtype=torch.float64).float()
    return out


def client_state(rank: int, seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (i, o) in LAYERS.items():
        out[a_key(prefix)] = torch.randn(rank, i, generator=g)
        out[b_key(prefix)] = torch.randn(o, rank, generator=g)
    return out


def reply(node: int, state: AdapterState, examples: float) -> Message:
    return train_reply(
        node, RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})})
    )


def configure(strategy: LoraStrategy, state: AdapterState, nodes: list[int] | None = None) -> dict[int, Message]:
    nodes = nodes or list(RANKS)
    strategy.assign_ranks({n: RANKS[n] for n in nodes})
    messages = strategy.configure_train(1, ArrayRecord(state), ConfigRecord({"lr": 0.1}), NodesOnly(nodes))  # type: ignore[arg-type]
    return {m.metadata.dst_node_id: m for m in messages}


def aggregate(strategy: LoraStrategy, clients: dict[int, AdapterState]) -> AdapterState:
    arrays, metrics = strategy.aggregate_train(1, [reply(n, s, EXAMPLES[n]) for n, s in clients.items()])
    assert arrays is not None and metrics is not None
    return from_record(arrays)


def scale(rank: int) -> float:
    return ALPHA / rank


def product(state: AdapterState, prefix: str, rank: int) -> torch.Tensor:
    return scale(rank) * state[b_key(prefix)].double() @ state[a_key(prefix)].double()


def ideal(clients: dict[int, AdapterState], prefix: str, weights: dict[int, float]) -> torch.Tensor:
    """Σ_k p_k s_k B_k A_k in float64, straight from the formula."""
    total = sum(weights[n] for n in clients)
    return sum(weights[n] / total * product(s, prefix, RANKS[n]) for n, s in clients.items())  # type: ignore[return-value]


# --- downlink ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_each_node_gets_its_rank_and_starts_from_the_truncated_global_update(cls: type[LoraStrategy]) -> None:
    state = global_state()
    messages = configure(cls(R_MAX, ALPHA), state)
    for node, msg in messages.items():
        r = RANKS[node]
        sent, config = from_record(msg.content["arrays"]), msg.content["config"]
        assert config["lora-rank"] == r and config["lr"] == 0.1 and config["server-round"] == 1
        for prefix in LAYERS:
            assert sent[a_key(prefix)].shape[0] == r
            if cls is FedSALoRA:  # B stays on the client
                assert b_key(prefix) not in sent and config["lora-personal-b"]
                continue
            truncated = scale(R_MAX) * state[b_key(prefix)][:, :r].double() @ state[a_key(prefix)][:r].double()
            torch.testing.assert_close(product(sent, prefix, r), truncated, rtol=1e-5, atol=1e-5)


def test_instructions_tell_clients_what_to_train_and_send() -> None:
    ffa = configure(FFALoRA(R_MAX, ALPHA), global_state())[101].content["config"]
    assert (ffa["lora-freeze"], ffa["lora-uploads"]) == ("A", "B")
    het = configure(HetLoRA(R_MAX, ALPHA, gamma=0.5, lam=0.2), global_state())[101].content["config"]
    assert (het["rank-penalty-gamma"], het["rank-penalty-lambda"]) == (0.5, 0.2)
    prox = configure(FedIT(R_MAX, ALPHA, optimizer=fedprox(0.3)), global_state())[102].content["config"]
    assert prox["proximal-mu"] == 0.3 and prox["lora-rank"] == 4


def test_a_rank_the_global_adapter_cannot_serve_is_refused() -> None:
    with pytest.raises(ValueError, match=r"outside \[1, 8\]: the global adapter \(rank 8\) cannot serve them"):
        FedIT(R_MAX, ALPHA).assign_ranks({5: 16})


# --- identical clients --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_identical_full_rank_clients_give_back_their_update(cls: type[LoraStrategy]) -> None:
    strategy = cls(R_MAX, ALPHA)
    start, trained = global_state(0), global_state(1)
    nodes = [103, 104]
    RANKS[104], EXAMPLES[104] = R_MAX, 5.0
    try:
        sent = configure(strategy, start, nodes)
        clients = {n: {**from_record(sent[n].content["arrays"]), **trained} for n in nodes}
        if cls is FFALoRA:  # A is frozen: the clients' A is what they were sent
            clients = {n: {**trained, **{a_key(p): start[a_key(p)] for p in LAYERS}} for n in nodes}
        new = aggregate(strategy, clients)
    finally:
        del RANKS[104], EXAMPLES[104]
    adapter, deltas = split_state(new)
    for prefix in LAYERS:
        expected = product(clients[103], prefix, R_MAX)
        if cls is FLoRA:  # merged into the base, adapter restarted with B = 0
            torch.testing.assert_close(deltas[prefix].double(), expected, rtol=1e-5, atol=1e-4)
            assert not adapter[b_key(prefix)].any()
        elif cls is FedSALoRA:
            torch.testing.assert_close(adapter[a_key(prefix)], trained[a_key(prefix)])
        else:
            torch.testing.assert_close(product(adapter, prefix, R_MAX), expected, rtol=1e-5, atol=1e-4)
            if cls is FedExLoRA:
                assert deltas[prefix].abs().max() < 1e-4


# --- each paper's property, mixed ranks -------------------------------------------------------


def mixed_clients() -> dict[int, AdapterState]:
    return {n: client_state(r, seed=n) for n, r in RANKS.items()}


def test_fedit_is_the_weighted_mean_of_zero_padded_scale_folded_factors() -> None:
    strategy, clients = FedIT(R_MAX, ALPHA, padding="zeros"), mixed_clients()
    configure(strategy, global_state())
    new = aggregate(strategy, clients)
    total = sum(EXAMPLES[n] for n in clients)
    for prefix, (i, o) in LAYERS.items():
        A = sum(
            EXAMPLES[n] / total * torch.cat([s[a_key(prefix)], torch.zeros(R_MAX - RANKS[n], i)])
            for n, s in clients.items()
        )
        B = sum(
            EXAMPLES[n]
            / total
            * RANKS[n] ** -1
            * R_MAX
            * torch.cat([s[b_key(prefix)], torch.zeros(o, R_MAX - RANKS[n])], 1)
            for n, s in clients.items()
        )
        torch.testing.assert_close(new[a_key(prefix)], A)
        torch.testing.assert_close(new[b_key(prefix)], B)


def test_fedit_composes_with_flower_fedadam_on_mixed_ranks() -> None:
    start = global_state()
    adam = FedIT(R_MAX, ALPHA, optimizer=FedAdam(eta=0.1, beta_1=0.0, beta_2=0.0, tau=1e-9, **SAMPLING))
    configure(adam, start)
    new = aggregate(adam, mixed_clients())
    plain = FedIT(R_MAX, ALPHA)
    configure(plain, start)
    mean = aggregate(plain, mixed_clients())
    # β₁ = β₂ = 0, τ → 0: each coordinate moves by η·sign(mean − start)
    for key in start:
        torch.testing.assert_close(
            new[key] - start[key], 0.1 * torch.sign(mean[key] - start[key]), rtol=1e-4, atol=1e-4
        )


def test_hetlora_zero_pads_with_sparsity_weights_and_truncates_consistently() -> None:
    strategy, clients = HetLoRA(R_MAX, ALPHA), mixed_clients()
    configure(strategy, global_state())
    new = aggregate(strategy, clients)
    for prefix, (i, _) in LAYERS.items():
        norms = {n: torch.linalg.matrix_norm(product(s, prefix, RANKS[n])).item() for n, s in clients.items()}
        p = {n: v / sum(norms.values()) for n, v in norms.items()}
        A = sum(p[n] * torch.cat([s[a_key(prefix)], torch.zeros(R_MAX - RANKS[n], i)]) for n, s in clients.items())
        torch.testing.assert_close(new[a_key(prefix)], A)
    # what a rank-r client is sent next is exactly the first r ranks of the new global adapter
    for node, msg in configure(strategy, new).items():
        r, sent = RANKS[node], from_record(msg.content["arrays"])
        for prefix in LAYERS:
            torch.testing.assert_close(sent[a_key(prefix)], new[a_key(prefix)][:r])
            torch.testing.assert_close(
                sent[b_key(prefix)], new[b_key(prefix)][:, :r] * r / R_MAX
            )  # B_k = (s_g / s_k) B[:, :r]


def test_flora_merges_exactly_the_weighted_mean_of_products_with_mixed_ranks() -> None:
    strategy, clients = FLoRA(R_MAX, ALPHA), mixed_clients()
    configure(strategy, global_state())
    first = aggregate(strategy, clients)
    configure(strategy, first)
    second = aggregate(strategy, clients)  # merges accumulate
    for prefix in LAYERS:
        target = ideal(clients, prefix, EXAMPLES)
        torch.testing.assert_close(split_state(first)[1][prefix].double(), target, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split_state(second)[1][prefix].double(), 2 * target, rtol=1e-5, atol=1e-5)
        assert not first[b_key(prefix)].any() and first[a_key(prefix)].shape == (R_MAX, LAYERS[prefix][0])
    assert all(
        configure(strategy, first)[n].content["arrays"][f"{p}.base_delta"] is not None for n in RANKS for p in LAYERS
    )


def test_flexlora_sends_each_client_the_best_rank_r_approximation() -> None:
    strategy, clients = FlexLoRA(R_MAX, ALPHA), mixed_clients()
    configure(strategy, global_state())
    new = aggregate(strategy, clients)
    for node, msg in configure(strategy, new).items():
        r, sent = RANKS[node], from_record(msg.content["arrays"])
        for prefix in LAYERS:
            target = ideal(clients, prefix, EXAMPLES)
            U, S, Vh = torch.linalg.svd(target)
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            torch.testing.assert_close(product(sent, prefix, r), best, rtol=1e-4, atol=1e-4)
            # Eckart–Young: the error is the norm of the dropped singular values
            assert math.isclose(
                torch.linalg.matrix_norm(product(sent, prefix, r) - target).item(),
                S[r:].norm().item(),
                rel_tol=1e-3,
                abs_tol=1e-4,
            )


def test_ffa_lora_never_changes_a_and_averages_b_exactly() -> None:
    strategy, start = FFALoRA(R_MAX, ALPHA, padding="zeros"), global_state()
    clients = {n: {**s, **{a_key(p): start[a_key(p)][: RANKS[n]] for p in LAYERS}} for n, s in mixed_clients().items()}
    configure(strategy, start)
    new = aggregate(strategy, clients)
    for prefix in LAYERS:
        assert torch.equal(new[a_key(prefix)], start[a_key(prefix)])
        torch.testing.assert_close(product(new, prefix, R_MAX), ideal(clients, prefix, EXAMPLES), rtol=1e-5, atol=1e-5)


def test_fedsa_lora_averages_a_and_never_touches_b() -> None:
    strategy, start = FedSALoRA(R_MAX, ALPHA, padding="zeros"), global_state()
    clients = {n: {a_key(p): s[a_key(p)] for p in LAYERS} for n, s in mixed_clients().items()}  # only A comes back
    configure(strategy, start)
    new = aggregate(strategy, clients)
    total = sum(EXAMPLES.values())
    for prefix, (i, _) in LAYERS.items():
        A = sum(
            EXAMPLES[n] / total * torch.cat([s[a_key(prefix)], torch.zeros(R_MAX - RANKS[n], i)])
            for n, s in clients.items()
        )
        torch.testing.assert_close(new[a_key(prefix)], A)
        assert torch.equal(new[b_key(prefix)], start[b_key(prefix)])


def test_fedex_lora_merged_base_plus_adapter_moves_by_the_weighted_mean_of_products() -> None:
    strategy, clients = FedExLoRA(R_MAX, ALPHA, padding="zeros"), mixed_clients()
    configure(strategy, global_state())
    new = aggregate(strategy, clients)
    for prefix in LAYERS:
        total = split_state(new)[1][prefix].double() + product(new, prefix, R_MAX)
        torch.testing.assert_close(total, ideal(clients, prefix, EXAMPLES), rtol=1e-5, atol=1e-5)


def test_lora_fair_moves_the_product_toward_the_ideal_update() -> None:
    fair, fedit, clients = (
        LoRAFAIR(R_MAX, ALPHA, padding="zeros"),
        FedIT(R_MAX, ALPHA, padding="zeros"),
        mixed_clients(),
    )
    for s in (fair, fedit):
        configure(s, global_state())
    refined, averaged = aggregate(fair, clients), aggregate(fedit, clients)
    cos = torch.nn.functional.cosine_similarity
    for prefix in LAYERS:
        target = ideal(clients, prefix, EXAMPLES).flatten()
        assert torch.equal(refined[a_key(prefix)], averaged[a_key(prefix)])  # A is FedIT's
        assert cos(product(refined, prefix, R_MAX).flatten(), target, dim=0) > cos(
            product(averaged, prefix, R_MAX).flatten(), target, dim=0
        )


def test_registry_builds_every_strategy_from_a_scenario() -> None:
    from fedsim.config.scenario import validate_scenario

    for name in STRATEGIES:
        mode = "async" if name in ASYNC_STRATEGIES else "sync"
        s = validate_scenario(
            {
                "model": {"name": "tiny-llama"}, "strategy": {"name": name}, "lora": {"rank": 4, "alpha": 8},
                "participation": {"mode": mode},
            }
        )  # fmt: skip
        strategy = STRATEGIES[name](s)
        assert isinstance(strategy, LoraStrategy) and (strategy.r_max, strategy.alpha) == (4, 8.0)


# --- mixed ranks: "holders" and "zeros" ---------------------------------------------------------


def effective(state: AdapterState, prefix: str) -> torch.Tensor:
    """What the global state adds to a layer's weight: base_delta + s_g B A (float64)."""
    adapter, deltas = split_state(state)
    delta = deltas[prefix].double() if prefix in deltas else 0.0
    return delta + product(adapter, prefix, R_MAX)


def with_base_delta(state: AdapterState, seed: int = 7) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return {**state, **{f"{p}.base_delta": torch.randn(o, i, generator=g) for p, (i, o) in LAYERS.items()}}


UNCHANGED = {  # strategy as its paper reads mixed ranks, or with "holders" where the paper pads with zeros
    "fedit": lambda: FedIT(R_MAX, ALPHA),
    "fedprox": lambda: FedIT(R_MAX, ALPHA, optimizer=fedprox(0.1)),
    "fedadam": lambda: FedIT(R_MAX, ALPHA, optimizer=FedAdam(eta=0.1, **SAMPLING)),
    "hetlora holders": lambda: HetLoRA(R_MAX, ALPHA, padding="holders"),
    "flexlora holders": lambda: FlexLoRA(R_MAX, ALPHA, padding="holders"),
    "flora": lambda: FLoRA(R_MAX, ALPHA),
    "ffa_lora": lambda: FFALoRA(R_MAX, ALPHA),
    "fedsa_lora": lambda: FedSALoRA(R_MAX, ALPHA),
    "fedex_lora": lambda: FedExLoRA(R_MAX, ALPHA),
    "lora_fair": lambda: LoRAFAIR(R_MAX, ALPHA),
}


@pytest.mark.parametrize("name", list(UNCHANGED))
def test_a_round_in_which_every_client_returns_what_it_was_sent_changes_nothing(name: str) -> None:
    strategy = UNCHANGED[name]()
    start = with_base_delta(global_state()) if isinstance(strategy, (FLoRA, FedExLoRA)) else global_state()
    if isinstance(strategy, FLoRA):  # FLoRA's adapter restarts every round with B = 0
        start = {**start, **{b_key(p): torch.zeros_like(start[b_key(p)]) for p in LAYERS}}
    sent = {n: from_record(m.content["arrays"]) for n, m in configure(strategy, start).items()}
    returned = {n: {k: v for k, v in state.items() if not k.endswith(".base_delta")} for n, state in sent.items()}
    new = aggregate(strategy, returned)
    for prefix in LAYERS:
        if isinstance(strategy, FedSALoRA):  # the server holds the shared A alone
            torch.testing.assert_close(new[a_key(prefix)], start[a_key(prefix)], rtol=1e-6, atol=1e-6)
            continue
        torch.testing.assert_close(effective(new, prefix), effective(start, prefix), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [FedIT, HetLoRA, FlexLoRA], ids=lambda c: c.__name__)
def test_with_zeros_padding_unchanged_clients_shrink_the_ranks_they_do_not_hold(cls: type[LoraStrategy]) -> None:
    strategy, start = cls(R_MAX, ALPHA, padding="zeros"), global_state()
    sent = {n: from_record(m.content["arrays"]) for n, m in configure(strategy, start).items()}
    new = aggregate(strategy, sent)
    for prefix in LAYERS:
        change = torch.linalg.matrix_norm(effective(new, prefix) - effective(start, prefix)).item()
        assert change > 0.1 * torch.linalg.matrix_norm(effective(start, prefix)).item()
    if cls is FedIT:  # rank j scaled by the example share of the clients that hold it, every factor
        total = sum(EXAMPLES.values())
        share = torch.tensor([sum(EXAMPLES[n] for n, r in RANKS.items() if r > j) / total for j in range(R_MAX)])
        for prefix in LAYERS:
            torch.testing.assert_close(new[a_key(prefix)], start[a_key(prefix)] * share[:, None])
            torch.testing.assert_close(new[b_key(prefix)], start[b_key(prefix)] * share[None, :])


def test_fedit_holders_averages_each_rank_over_the_clients_that_hold_it() -> None:
    strategy, clients, start = FedIT(R_MAX, ALPHA), mixed_clients(), global_state()
    configure(strategy, start, [101, 102])  # ranks 2 and 4: nobody holds ranks 4..7
    clients = {n: clients[n] for n in (101, 102)}
    new = aggregate(strategy, clients)
    for prefix in LAYERS:
        for j in range(R_MAX):
            holders = [n for n in clients if RANKS[n] > j]
            if not holders:  # a rank nobody held this round stays as it was
                assert torch.equal(new[a_key(prefix)][j], start[a_key(prefix)][j])
                assert torch.equal(new[b_key(prefix)][:, j], start[b_key(prefix)][:, j])
                continue
            total = sum(EXAMPLES[n] for n in holders)
            A = sum(EXAMPLES[n] / total * clients[n][a_key(prefix)][j] for n in holders)
            B = sum(
                EXAMPLES[n] / total * R_MAX / RANKS[n] * clients[n][b_key(prefix)][:, j] for n in holders
            )  # fold s_k / s_g
            torch.testing.assert_close(new[a_key(prefix)][j], A)
            torch.testing.assert_close(new[b_key(prefix)][:, j], B)


def holders_target(start: AdapterState, clients: dict[int, AdapterState], prefix: str) -> torch.Tensor:
    """s_g B_g A_g + Σ_k p_k (s_k B_k A_k − s_g B_g[:, :r_k] A_g[:r_k]) in float64, from the formula."""
    total = sum(EXAMPLES[n] for n in clients)
    out = product(start, prefix, R_MAX)
    for n, state in clients.items():
        r = RANKS[n]
        sent = scale(R_MAX) * start[b_key(prefix)][:, :r].double() @ start[a_key(prefix)][:r].double()
        out = out + EXAMPLES[n] / total * (product(state, prefix, r) - sent)
    return out


def test_fedex_lora_holders_moves_the_model_by_the_clients_mean_change() -> None:
    strategy, clients, start = FedExLoRA(R_MAX, ALPHA), mixed_clients(), with_base_delta(global_state())
    configure(strategy, start)
    new = aggregate(strategy, clients)
    for prefix in LAYERS:
        moved = effective(new, prefix) - split_state(start)[1][prefix].double()
        torch.testing.assert_close(moved, holders_target(start, clients, prefix), rtol=1e-5, atol=1e-4)


def test_flexlora_holders_sends_the_best_rank_r_approximation_of_the_moved_product() -> None:
    strategy, clients, start = FlexLoRA(R_MAX, ALPHA, padding="holders"), mixed_clients(), global_state()
    configure(strategy, start)
    new = aggregate(strategy, clients)
    for node, msg in configure(strategy, new).items():
        r, sent = RANKS[node], from_record(msg.content["arrays"])
        for prefix in LAYERS:
            U, S, Vh = torch.linalg.svd(holders_target(start, clients, prefix))
            torch.testing.assert_close(
                product(sent, prefix, r), U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=1e-4, atol=1e-4
            )


def test_flexlora_keeps_a_orthonormal_so_every_rank_trains() -> None:
    # two clients of rank 2: ΔW* has rank <= 4 < r_max, so ranks 4..7 carry no singular value
    strategy = FlexLoRA(R_MAX, ALPHA)
    RANKS[104], EXAMPLES[104] = 2, 5.0
    try:
        configure(strategy, global_state(), [101, 104])
        new = aggregate(strategy, {101: client_state(2, seed=1), 104: client_state(2, seed=2)})
    finally:
        del RANKS[104], EXAMPLES[104]
    for prefix in LAYERS:
        A, B = new[a_key(prefix)].double(), new[b_key(prefix)]
        torch.testing.assert_close(
            A @ A.T, torch.eye(R_MAX, dtype=torch.float64), rtol=0, atol=1e-5
        )  # each rank's A row: unit norm
        assert B[:, 4:].abs().max() < 1e-5 and B[:, :4].abs().max() > 1e-2  # Σ in B: the empty ranks' B is zero
        # a loss gradient G reaches those ranks' B through A: ∂L/∂B = s_g G Aᵀ is not small there
        G = torch.randn(B.shape[0], A.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert (G @ A.T)[:, 4:].norm() > 0.1 * G.norm()


def test_the_scenario_picks_the_padding_and_the_papers_by_default() -> None:
    from fedsim.config.scenario import validate_scenario

    def build(name: str, padding: str) -> LoraStrategy:
        s = validate_scenario({"model": {"name": "tiny-llama"}, "strategy": {"name": name, "rank_padding": padding}})
        return STRATEGIES[name](s)

    assert [build(n, "paper").padding for n in ("fedit", "hetlora", "flexlora", "fedex_lora", "fedadam")] == [
        "holders",
        "zeros",
        "zeros",
        "holders",
        "holders",
    ]
    assert build("hetlora", "holders").padding == "holders" and build("fedprox", "zeros").padding == "zeros"


def test_flora_refuses_a_rank_padding_and_a_bad_padding_is_named() -> None:
    from fedsim.config.scenario import ScenarioError, validate_scenario

    with pytest.raises(ScenarioError, match=r"`strategy.rank_padding` = 'zeros' does not apply to 'flora'"):
        validate_scenario({"model": {"name": "tiny-llama"}, "strategy": {"name": "flora", "rank_padding": "zeros"}})
    with pytest.raises(ValueError, match=r"FedIT: `padding` must be one of \('holders', 'zeros'\)"):
        FedIT(R_MAX, ALPHA, padding="ones")
    with pytest.raises(ValueError, match=r"FLoRA: `padding` must be None"):
        FLoRA(R_MAX, ALPHA, padding="zeros")
