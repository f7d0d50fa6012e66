"""A strategy's state across rounds (`LoraStrategy.state_dict`): Flower's server optimisers give
theirs as named arrays, saved as a deterministic .npz (`fedsim.results.rundir.save_arrays`), and a
strategy that takes it up aggregates the next rounds exactly as the one that never stopped, even
when the global state comes back in another key order (a checkpoint loads sorted); the strategies
without such state give {} and refuse any."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from tests_support.grids import NodesOnly
from tests_support.messages import train_reply

from fedsim.config.names import SERVER_OPTIMIZERS
from fedsim.model.adapter import AdapterState, from_record
from fedsim.results.rundir import STRATEGY_FILE, load_arrays, save_arrays
from strategies import FedExLoRA, FedIT, FedSALoRA, FFALoRA, FlexLoRA, FLoRA, HetLoRA, LoRAFAIR, LoraStrategy
from strategies.flower_optimizers import fedprox, server_optimizer

R_MAX, ALPHA = 8, 16.0
LAYERS = {  # (in, out), in PEFT's order, which is not the sorted one
    "base_model.model.model.layers.1.self_attn.q_proj": (12, 10),
    "base_model.model.model.layers.0.mlp.down_proj": (9, 12),
}
RANKS = {101: 2, 102: 8}  # node id → rank
PARTS = {"fedadam": {"m_t", "v_t"}, "fedyogi": {"m_t", "v_t"}, "fedadagrad": {"m_t", "v_t"}}
STATELESS = {
    "fedit": lambda: FedIT(R_MAX, ALPHA),
    "fedprox": lambda: FedIT(R_MAX, ALPHA, optimizer=fedprox(0.1)),
    **{cls.__name__: lambda cls=cls: cls(R_MAX, ALPHA) for cls in (HetLoRA, FlexLoRA, FLoRA, FFALoRA, FedSALoRA)},
    **{cls.__name__: lambda cls=cls: cls(R_MAX, ALPHA) for cls in (FedExLoRA, LoRAFAIR)},
}


def optimized(name: str) -> FedIT:
    return FedIT(R_MAX, ALPHA, optimizer=server_optimizer(name, 0.1, 0.9, 0.9, 0.99, 1e-3))


def adapter(rank: int, seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (i, o) in LAYERS.items():
        out[f"{prefix}.lora_A.weight"] = torch.randn(rank, i, generator=g)
        out[f"{prefix}.lora_B.weight"] = torch.randn(o, rank, generator=g)
    return out


def train_round(strategy: LoraStrategy, state: AdapterState, server_round: int) -> AdapterState:
    """One round through the Flower hooks, the clients replying with seeded random adapters."""
    strategy.assign_ranks(RANKS)
    grid = NodesOnly(list(RANKS))
    list(strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord({}), grid))  # type: ignore[arg-type]
    replies = [
        train_reply(
            n,
            RecordDict(
                {
                    "arrays": ArrayRecord(adapter(r, 100 * server_round + n)),
                    "metrics": MetricRecord({"num-examples": float(n)}),
                }
            ),
        )  # fmt: skip
        for n, r in RANKS.items()
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return from_record(arrays)


def assert_same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    """The same names in the same order, each array bit for bit and of the same dtype."""
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def equal_states(a: AdapterState, b: AdapterState) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_a_strategy_taken_up_from_its_saved_state_goes_on_as_if_it_never_stopped(name: str, tmp_path: Path) -> None:
    straight, stopped = optimized(name), optimized(name)
    state = start = adapter(R_MAX, 0)
    for k in (1, 2, 3):
        state = train_round(straight, state, k)
    after_1 = train_round(stopped, start, 1)
    save_arrays(tmp_path / STRATEGY_FILE, stopped.state_dict())
    resumed, fresh = optimized(name), optimized(name)
    resumed.load_state_dict(load_arrays(tmp_path / STRATEGY_FILE))
    again = afresh = {k: after_1[k] for k in sorted(after_1, reverse=True)}  # a checkpoint loads in another order
    for k in (2, 3):
        again, afresh = train_round(resumed, again, k), train_round(fresh, afresh, k)
    assert equal_states(again, state)
    assert_same(resumed.state_dict(), straight.state_dict())
    assert not equal_states(afresh, state)  # the state is what made it exact


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_dict_round_trips_through_load_state_dict(name: str) -> None:
    strategy, state = optimized(name), adapter(R_MAX, 0)
    assert strategy.state_dict() == {}  # nothing before the first aggregation
    for k in (1, 2):
        state = train_round(strategy, state, k)
    saved = strategy.state_dict()
    assert {n.partition("/")[0] for n in saved} == PARTS.get(name, {"current", "momentum"})
    assert len(saved) == 2 * 2 * len(LAYERS)  # two parts, A and B of each layer
    other = optimized(name)
    other.load_state_dict(saved)
    assert_same(other.state_dict(), saved)


@pytest.mark.parametrize("name", STATELESS)
def test_a_strategy_without_cross_round_state_gives_none_and_refuses_any(name: str) -> None:
    strategy = STATELESS[name]()
    train_round(strategy, adapter(R_MAX, 0), 1)
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no"):
        strategy.load_state_dict({"m_t/x": np.zeros(2)})


def test_an_optimizer_refuses_a_state_it_does_not_keep() -> None:
    with pytest.raises(ValueError, match=r"FedAdam keeps no \['momentum'\]"):
        optimized("fedadam").load_state_dict({"momentum/x": np.zeros(2)})
    with pytest.raises(ValueError, match="`momentum` must name the arrays of `current`"):
        optimized("fedavgm").load_state_dict({"current/x": np.zeros(2), "momentum/y": np.zeros(2)})


def test_saved_arrays_are_the_same_bytes_for_the_same_arrays_and_load_in_order(tmp_path: Path) -> None:
    arrays = {"v_t/b": np.arange(6, dtype=np.float32).reshape(2, 3), "m_t/a": np.ones(3, dtype=np.float64)}
    save_arrays(tmp_path / "one.npz", arrays)
    save_arrays(tmp_path / "two.npz", dict(arrays))
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    assert_same(load_arrays(tmp_path / "one.npz"), arrays)
    save_arrays(tmp_path / "empty.npz", {})
    assert load_arrays(tmp_path / "empty.npz") == {}
