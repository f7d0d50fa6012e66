"""AFA-CD and AFA-CS (`strategies.afa`) against a direct computation of their rule on small tensors:
stale updates of different step counts, mixed ranks, and AFA-CS's re-use of each device's last update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.afa import AFA, AFACS, StaleUpdate

A, B = "m.lora_A.weight", "m.lora_B.weight"
ALPHA, R_MAX = 8.0, 4


def _state(seed: int, rank: int = R_MAX) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, 5, generator=g), B: torch.randn(6, rank, generator=g)}


def _update(client: int, steps: int, staleness: int, rank: int = R_MAX, seed: int | None = None) -> StaleUpdate:
    return StaleUpdate(client, _state(100 + client if seed is None else seed, rank), rank, steps, staleness)


def test_afa_cd_steps_on_the_mean_step_normalised_update_whatever_the_staleness() -> None:
    current = _state(0)
    updates = [_update(1, steps=2, staleness=0), _update(2, steps=8, staleness=3), _update(3, steps=5, staleness=1)]
    lr = 3.0
    new = AFA(R_MAX, ALPHA, server_lr=lr).apply(current, updates)
    for key in (A, B):  # x + η · (1/m) Σ Δ_i / K_i, every update weighing the same, stale or not
        expected = current[key] + lr * sum(u.delta[key] / u.steps for u in updates) / len(updates)
        torch.testing.assert_close(new[key], expected)


def test_equal_steps_no_staleness_and_server_lr_k_is_fedavg_of_the_updates() -> None:
    current, k = _state(0), 6
    updates = [_update(c, steps=k, staleness=0) for c in range(4)]
    new = AFA(R_MAX, ALPHA, server_lr=float(k)).apply(current, updates)
    for key in (A, B):
        torch.testing.assert_close(new[key], current[key] + torch.stack([u.delta[key] for u in updates]).mean(0))


def test_a_lower_rank_update_is_zero_padded_and_its_b_folded_to_the_global_scaling() -> None:
    current = _state(0)
    low = _update(1, steps=2, staleness=0, rank=2)
    new = AFA(R_MAX, ALPHA, server_lr=1.0).apply(current, [low])
    s_k, s_g = ALPHA / 2, ALPHA / R_MAX
    dA = torch.zeros(R_MAX, 5)
    dA[:2] = low.delta[A] / 2
    dB = torch.zeros(6, R_MAX)
    dB[:, :2] = low.delta[B] * (s_k / s_g) / 2
    torch.testing.assert_close(new[A], current[A] + dA)
    torch.testing.assert_close(new[B], current[B] + dB)
    assert torch.equal(new[A][2:], current[A][2:])  # a rank nobody held does not move


def test_afa_cs_reuses_each_devices_last_update_until_it_sends_a_new_one() -> None:
    strategy, lr = AFACS(R_MAX, ALPHA, server_lr=2.0), 2.0
    x0 = _state(0)
    first = [_update(1, steps=2, staleness=0), _update(2, steps=4, staleness=0)]
    x1 = strategy.apply(x0, first)
    second = [_update(3, steps=1, staleness=1), _update(1, steps=3, staleness=2, seed=7)]
    x2 = strategy.apply(x1, second)
    g = {u.client: {k: v / u.steps for k, v in u.delta.items()} for u in first}
    g.update({u.client: {k: v / u.steps for k, v in u.delta.items()} for u in second})  # device 1's newer one
    for key in (A, B):  # devices 1 (its second update), 2 (re-used) and 3
        torch.testing.assert_close(x2[key], x1[key] + lr * (g[1][key] + g[2][key] + g[3][key]) / 3)
    cd = AFA(R_MAX, ALPHA, server_lr=2.0).apply(x1, second)  # AFA-CD forgets device 2
    assert not torch.allclose(cd[A], x2[A])


def test_afa_cs_state_round_trips_and_afa_cd_keeps_none() -> None:
    strategy = AFACS(R_MAX, ALPHA, server_lr=1.0)
    strategy.apply(_state(0), [_update(1, steps=2, staleness=0), _update(5, steps=3, staleness=1, rank=2)])
    saved = strategy.state_dict()
    assert sorted({name.split("/")[1] for name in saved}) == ["1", "5"]
    again = AFACS(R_MAX, ALPHA, server_lr=1.0)
    again.load_state_dict(saved)
    nxt = [_update(2, steps=1, staleness=0)]
    for key, value in strategy.apply(_state(9), nxt).items():
        torch.testing.assert_close(again.apply(_state(9), nxt)[key], value)
    assert AFA(R_MAX, ALPHA, server_lr=1.0).state_dict() == {}
    with pytest.raises(ValueError, match="not a state this strategy keeps"):
        AFA(R_MAX, ALPHA, server_lr=1.0).load_state_dict({"latest/1/" + A: np.zeros((4, 5))})


def test_bad_settings_and_the_synchronous_hook_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="padding 'zeros' only"):
        AFA(R_MAX, ALPHA, padding="holders", server_lr=1.0)
    with pytest.raises(ValueError, match="server_lr"):
        AFA(R_MAX, ALPHA, server_lr=0.0)
    with pytest.raises(ValueError, match="local steps must be >= 1"):
        AFA(R_MAX, ALPHA, server_lr=1.0).apply(_state(0), [_update(1, steps=0, staleness=0)])
    with pytest.raises(TypeError, match="asynchronous clock"):
        AFA(R_MAX, ALPHA, server_lr=1.0).aggregate(1, [])
