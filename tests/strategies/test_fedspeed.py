"""FedSpeed's server rule on small tensors: the example-weighted mean of the clients' x̂ factors, against
a direct computation; the ρ, α, λ each client is told; what it refuses."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from tests_support.grids import NodesOnly
from tests_support.messages import train_reply

from fedsim.model.adapter import AdapterState, from_record
from fedsim.model.fedspeed import corrected, sent
from strategies.fedspeed import PRUNING_REFUSED, FedSpeed

R_MAX, ALPHA = 4, 8.0
PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"
A_KEY, B_KEY = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight"
IN, OUT = 6, 5


def state(rank: int, seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return {A_KEY: torch.randn(rank, IN, generator=g), B_KEY: torch.randn(OUT, rank, generator=g)}


def configure(strategy: FedSpeed, current: AdapterState, ranks: dict[int, int]) -> dict[int, Message]:
    strategy.assign_ranks(ranks)
    messages = strategy.configure_train(1, ArrayRecord(current), ConfigRecord({}), NodesOnly(list(ranks)))  # type: ignore[arg-type]
    return {m.metadata.dst_node_id: m for m in messages}


def aggregate(strategy: FedSpeed, clients: dict[int, tuple[AdapterState, float]]) -> AdapterState:
    replies = [
        train_reply(n, RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": w})}))
        for n, (s, w) in clients.items()
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return from_record(arrays)


def test_clients_are_told_rho_alpha_lambda_and_receive_both_factors() -> None:
    strategy = FedSpeed(R_MAX, ALPHA, rho=0.05, merge=0.7, lam=3.0)
    config = configure(strategy, state(R_MAX, 0), {7: 2})[7].content["config"]
    assert (config["fedspeed-rho"], config["fedspeed-alpha"], config["fedspeed-lambda"]) == (0.05, 0.7, 3.0)
    assert config["lora-rank"] == 2 and not config["lora-personal-b"]
    defaults = configure(FedSpeed(R_MAX, ALPHA), state(R_MAX, 0), {7: 4})[7].content["config"]
    assert (defaults["fedspeed-rho"], defaults["fedspeed-alpha"], defaults["fedspeed-lambda"]) == (0.1, 1.0, 10.0)


def test_server_averages_the_clients_x_hat_weighted_by_examples() -> None:
    start, lam = state(R_MAX, 0), 2.0
    strategy = FedSpeed(R_MAX, ALPHA, lam=lam)
    configure(strategy, start, {1: R_MAX, 2: R_MAX})
    x_hats, weights = {}, {1: 10.0, 2: 30.0}
    for n in weights:  # each client: x_K, its corrected ĝ and x̂ = x_K − λĝ, as fedsim.model.fedspeed sends it
        x_k, held = state(R_MAX, 10 + n), state(R_MAX, 20 + n)
        keys = [A_KEY, B_KEY]
        g_new = corrected([held[k] for k in keys], [x_k[k] for k in keys], [start[k] for k in keys], lam)
        x_hats[n] = dict(zip(keys, sent([x_k[k] for k in keys], g_new, lam)))
    new = aggregate(strategy, {n: (x_hats[n], w) for n, w in weights.items()})
    for key in (A_KEY, B_KEY):  # 1/4 and 3/4; x̂ = x_K + (x_K − x^t) − λĝ by hand
        by_hand = {n: 2 * state(R_MAX, 10 + n)[key] - start[key] - lam * state(R_MAX, 20 + n)[key] for n in weights}
        torch.testing.assert_close(new[key], 0.25 * by_hand[1] + 0.75 * by_hand[2])


def test_mixed_ranks_fold_scales_and_pad_with_zeros_or_average_over_holders() -> None:
    start, ranks, weights = state(R_MAX, 0), {1: 2, 2: R_MAX}, {1: 1.0, 2: 3.0}
    clients = {n: (state(r, 30 + n), weights[n]) for n, r in ranks.items()}
    fold = {n: (ALPHA / r) / (ALPHA / R_MAX) for n, r in ranks.items()}  # s_k / s_g
    for padding in ("zeros", "holders"):
        strategy = FedSpeed(R_MAX, ALPHA, padding=padding)
        configure(strategy, start, ranks)
        new = aggregate(strategy, clients)
        A1, B1 = clients[1][0][A_KEY], clients[1][0][B_KEY] * fold[1]
        A2, B2 = clients[2][0][A_KEY], clients[2][0][B_KEY] * fold[2]
        top_A, top_B = 0.25 * A1 + 0.75 * A2[:2], 0.25 * B1 + 0.75 * B2[:, :2]  # ranks both hold
        tail_A, tail_B = (0.75 * A2[2:], 0.75 * B2[:, 2:]) if padding == "zeros" else (A2[2:], B2[:, 2:])
        torch.testing.assert_close(new[A_KEY], torch.cat([top_A, tail_A]))
        torch.testing.assert_close(new[B_KEY], torch.cat([top_B, tail_B], 1))


def test_clients_that_send_back_what_they_received_change_nothing() -> None:
    start = state(R_MAX, 0)
    strategy = FedSpeed(R_MAX, ALPHA)
    sent_to = configure(strategy, start, {1: 2, 2: R_MAX})
    echoed = {n: (from_record(m.content.array_records["arrays"]), 1.0 + n) for n, m in sent_to.items()}
    new = aggregate(strategy, echoed)
    for key in (A_KEY, B_KEY):
        torch.testing.assert_close(new[key], start[key])


def test_pruned_clients_and_bad_hyperparameters_are_refused() -> None:
    strategy = FedSpeed(R_MAX, ALPHA)
    with pytest.raises(ValueError, match="FedSpeed cannot aggregate pruned clients: each client keeps its"):
        strategy.assign_pruning({1: (None, {})})
    assert strategy.pruning_refused == PRUNING_REFUSED and strategy.state_dict() == {}
    with pytest.raises(ValueError, match="`alpha` must be in"):
        FedSpeed(R_MAX, ALPHA, merge=2.0)
