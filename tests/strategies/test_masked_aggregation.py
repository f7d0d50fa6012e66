"""Mask-aware aggregation of pruned clients (FedIT, HetLoRA, FFA-LoRA, FedSA-LoRA): each coordinate
of the global adapter is averaged over the clients that kept it, checked against a direct torch
computation of Σ_k w_k m_k x_k / Σ_k w_k m_k; the strategies that cannot do it refuse pruning."""

from __future__ import annotations

import re

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from tests_support.messages import train_reply

from fedsim.config.names import ASYNC_STRATEGIES, PRUNING_REFUSED
from fedsim.config.scenario import LoraConfig, ScenarioError, validate_scenario
from fedsim.model.adapter import AdapterState, attach_lora, from_record, get_state
from fedsim.model.loader import load_model
from fedsim.protocol import PRUNE_RECORD
from fedsim.pruning import Keep, slice_adapter
from fedsim.pruning.structure import AXIS
from strategies import FedIT, LoraStrategy
from strategies.afa import AFA, AFACS
from strategies.fedex_lora import FedExLoRA
from strategies.fedsa_lora import FedSALoRA
from strategies.fedspeed import FedSpeed
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.lora_fair import LoRAFAIR
from strategies.lora_math import fedit, fedsa_lora, ffa_lora, hetlora, layer_pairs, zero_pad
from strategies.lora_strategy import ClientAdapter

R_MAX, ALPHA = 4, 8.0
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALLOWED = [FedIT, HetLoRA, FFALoRA, FedSALoRA]
REFUSED = {
    "flexlora": FlexLoRA, "flora": FLoRA, "fedex_lora": FedExLoRA, "lora_fair": LoRAFAIR, "fedspeed": FedSpeed,
    "afa_cd": AFA, "afa_cs": AFACS,
}  # fmt: skip
# tiny-llama: 2 layers, 2 KV groups of 2 heads, head_dim 16, 176 channels
KEEPS = {
    1: Keep(((1,), (0, 1)), ((3, 50, 175), tuple(range(0, 176, 2))), (2, 2), (176, 176), 2, 16),
    2: Keep(((1,), (0,)), (tuple(range(100)), tuple(range(1, 176, 2))), (2, 2), (176, 176), 2, 16),
    3: None,  # unpruned
}
EXAMPLES = {1: 10.0, 2: 30.0, 3: 20.0}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.([a-z]+_proj)\.lora_([AB])\.weight$")


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, ...]]:
    """The global adapter's tensor shapes: tiny-llama, LoRA rank R_MAX on every projection."""
    model = attach_lora(load_model("tiny-llama")[0], LoraConfig(rank=R_MAX, alpha=ALPHA, target_modules=ALL), seed=0)
    return {k: tuple(v.shape) for k, v in get_state(model).items()}


def _random(shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> AdapterState:
    """A random adapter at `rank` (A (rank, in), B (out, rank)), unpruned shape."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        shape = (rank, shape[1]) if ".lora_A." in key else (shape[0], rank)
        out[key] = torch.randn(shape, generator=g)
    return out


def _global(shapes: dict[str, tuple[int, ...]]) -> AdapterState:
    return _random(shapes, R_MAX, seed=1000)


def _reply(node: int, state: AdapterState, examples: float, keep: Keep | None) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})})
    if keep is not None:
        content[PRUNE_RECORD] = ConfigRecord({"keep": keep.to_json()})
    return train_reply(node, content)


def _coverage(key: str, shape: tuple[int, ...], keep: Keep | None) -> torch.Tensor:
    """Direct: True where a client pruned with `keep` holds entry `key` (rows of B for q, k, v, gate,
    up; columns of A for o, down), whatever the rank dimension."""
    mask = torch.ones(shape, dtype=torch.bool)
    m = _KEY.search(key)
    assert m is not None, key
    layer, proj, factor = int(m[1]), m[2], m[3]
    if keep is None or (AXIS[proj], factor) not in ((0, "B"), (1, "A")):
        return mask
    kept = torch.zeros(shape[AXIS[proj]], dtype=torch.bool)
    kept[keep.indices(layer, proj)] = True
    return mask & (kept[:, None] if AXIS[proj] == 0 else kept[None, :])


def _clients(
    shapes: dict[str, tuple[int, ...]], ranks: dict[int, int], keeps: dict[int, Keep | None]
) -> dict[int, AdapterState]:
    """What each client trained: a random adapter at its rank, cut to its keep (as it replies)."""
    out = {}
    for node, rank in ranks.items():
        full = _random(shapes, rank, seed=node)
        out[node] = slice_adapter(full, keeps[node]) if keeps[node] is not None else full
    return out


def _scattered(state: AdapterState, keep: Keep | None, rank: int, shapes: dict[str, tuple[int, ...]]) -> AdapterState:
    """Direct: a pruned reply put back at its unpruned coordinates (0 where it held nothing)."""
    out = {}
    for key, tensor in state.items():
        shape = (rank, shapes[key][1]) if ".lora_A." in key else (shapes[key][0], rank)
        full = torch.zeros(shape)
        full[_coverage(key, shape, keep)] = tensor.flatten()
        out[key] = full
    return out


def _reference(
    fulls: list[AdapterState],
    keeps: list[Keep | None],
    ranks: list[int],
    weights: list[float],
    previous: AdapterState,
    padding: str = "zeros",
) -> AdapterState:
    """Per coordinate of the padded, scale-folded factors: Σ w m x / Σ w m over the clients that
    hold it (under "zeros" a rank-r_k client holds zeros beyond r_k, in the rows and columns it
    kept; under "holders" nothing), the previous global value where nobody does. Float64, one
    coordinate block at a time."""
    out = {}
    for key, prev in previous.items():
        num, den = torch.zeros(prev.shape, dtype=torch.float64), torch.zeros(prev.shape, dtype=torch.float64)
        for full, keep, rank, w in zip(fulls, keeps, ranks, weights):
            x = torch.zeros(prev.shape, dtype=torch.float64)
            if ".lora_A." in key:
                x[:rank] = full[key].double()
            else:
                x[:, :rank] = full[key].double() * (R_MAX / rank)  # fold s_k / s_g
            m = _coverage(key, tuple(prev.shape), keep).double()
            if padding == "holders":
                m[(slice(rank, None),) if ".lora_A." in key else (slice(None), slice(rank, None))] = 0
            num += w * m * x
            den += w * m
        out[key] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), prev.double()).float()
    return out


def _aggregate(
    cls: type[LoraStrategy],
    start: AdapterState,
    replies: dict[int, AdapterState],
    keeps: dict[int, Keep | None],
    padding: str | None = None,
) -> AdapterState:
    strategy = cls(R_MAX, ALPHA, padding=padding)
    strategy.current = dict(start)
    messages = [_reply(n, s, EXAMPLES[n], keeps[n]) for n, s in replies.items()]
    if cls is FedIT:
        arrays, metrics = strategy.aggregate_train(1, messages)
        assert arrays is not None and metrics is not None
        return from_record(arrays)
    return strategy.aggregate(1, [strategy.client_adapter(m) for m in messages])


def _hetlora_weights(fulls: list[AdapterState], ranks: list[int], prefix_keys: tuple[str, str]) -> list[float]:
    a_key, b_key = prefix_keys
    norms = [
        ALPHA / r * torch.linalg.matrix_norm(f[b_key].double() @ f[a_key].double()).item() for f, r in zip(fulls, ranks)
    ]
    return [n / sum(norms) for n in norms]


def _expected(
    cls: type[LoraStrategy],
    start: AdapterState,
    replies: dict[int, AdapterState],
    keeps: dict[int, Keep | None],
    ranks: dict[int, int],
    shapes: dict[str, tuple[int, ...]],
    padding: str = "zeros",
) -> AdapterState:
    nodes = list(replies)
    fulls = [_scattered(replies[n], keeps[n], ranks[n], shapes) for n in nodes]
    ks, rs, ns = [keeps[n] for n in nodes], [ranks[n] for n in nodes], [EXAMPLES[n] for n in nodes]
    if cls is FedIT:
        return _reference(fulls, ks, rs, ns, start, padding)
    out = {}
    for a_key, b_key in layer_pairs(start).values():
        if cls is HetLoRA:  # p_k ∝ ‖s_k B_k A_k‖_F of what each trained (zeros where it pruned)
            p = _hetlora_weights(fulls, rs, (a_key, b_key))
            out |= _reference(
                [{k: f[k] for k in (a_key, b_key)} for f in fulls],
                ks,
                rs,
                p,
                {k: start[k] for k in (a_key, b_key)},
                padding,
            )
        elif cls is FFALoRA:  # A frozen, B averaged
            out[a_key] = start[a_key]
            out[b_key] = _reference([{b_key: f[b_key]} for f in fulls], ks, rs, ns, {b_key: start[b_key]}, padding)[
                b_key
            ]
        else:  # FedSA-LoRA: A averaged, B stays on the clients
            out[a_key] = _reference([{a_key: f[a_key]} for f in fulls], ks, rs, ns, {a_key: start[a_key]}, padding)[
                a_key
            ]
            out[b_key] = start[b_key]
    return out


def _assert_states_close(got: AdapterState, expected: AdapterState) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


# --- pruned clients: each coordinate over the clients that kept it -------------------------


@pytest.mark.parametrize("cls", ALLOWED, ids=lambda c: c.__name__)
def test_each_coordinate_is_averaged_over_the_clients_that_kept_it(cls: type[LoraStrategy], shapes: dict) -> None:
    ranks = {1: R_MAX, 2: R_MAX, 3: R_MAX}
    start, replies = _global(shapes), _clients(shapes, ranks, KEEPS)
    got = _aggregate(cls, start, replies, KEEPS)
    _assert_states_close(got, _expected(cls, start, replies, KEEPS, ranks, shapes))


@pytest.mark.parametrize("cls", ALLOWED, ids=lambda c: c.__name__)
def test_a_coordinate_nobody_kept_keeps_its_previous_value(cls: type[LoraStrategy], shapes: dict) -> None:
    ranks, keeps = {1: R_MAX, 2: R_MAX}, {1: KEEPS[1], 2: KEEPS[2]}  # both removed layer 0's KV group 0
    start, replies = _global(shapes), _clients(shapes, ranks, keeps)
    got = _aggregate(cls, start, replies, keeps)
    _assert_states_close(got, _expected(cls, start, replies, keeps, ranks, shapes))
    q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"  # group 0: query rows 0..31
    o_a = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    # Σ_k p_k·x_prev = x_prev up to rounding: HetLoRA's weights do not sum to exactly 1 in float32
    if cls is not FedSALoRA:
        torch.testing.assert_close(got[q_b][:32], start[q_b][:32], rtol=1e-6, atol=0)
    if cls is not FFALoRA:
        torch.testing.assert_close(got[o_a][:, :32], start[o_a][:, :32], rtol=1e-6, atol=0)
        assert not torch.allclose(got[o_a][:, 32:], start[o_a][:, 32:])


@pytest.mark.parametrize("padding", ["zeros", "holders"])
@pytest.mark.parametrize("cls", ALLOWED, ids=lambda c: c.__name__)
def test_mixed_ranks_a_client_holds_no_padding_where_it_pruned(
    cls: type[LoraStrategy], padding: str, shapes: dict
) -> None:
    # client 1 (rank 2) removed layer 0's KV group 0 and most channels: beyond rank 2 it holds zeros
    # ("zeros") only in the rows (B) and columns (A) it kept, or nothing ("holders"); where it
    # pruned it holds nothing at any rank
    ranks = {1: 2, 2: R_MAX, 3: 1}
    start, replies = _global(shapes), _clients(shapes, ranks, KEEPS)
    got = _aggregate(cls, start, replies, KEEPS, padding)
    _assert_states_close(got, _expected(cls, start, replies, KEEPS, ranks, shapes, padding))


@pytest.mark.parametrize("padding", ["zeros", "holders"])
@pytest.mark.parametrize("cls", ALLOWED, ids=lambda c: c.__name__)
def test_mixed_ranks_a_structure_all_clients_pruned_stays_as_it_was(
    cls: type[LoraStrategy], padding: str, shapes: dict
) -> None:
    ranks, keeps = {1: 2, 2: R_MAX}, {1: KEEPS[1], 2: KEEPS[2]}  # both removed layer 0's KV group 0
    start, replies = _global(shapes), _clients(shapes, ranks, keeps)
    got = _aggregate(cls, start, replies, keeps, padding)
    q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"  # group 0: query rows 0..31
    o_a = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"  # group 0: input columns 0..31
    if cls is not FedSALoRA:  # B of rows nobody kept, every rank
        torch.testing.assert_close(
            got[q_b][:32], start[q_b][:32], rtol=1e-6, atol=0, msg="q_proj B rows of a KV group nobody kept changed"
        )
    if cls is not FFALoRA:  # A of columns nobody kept, every rank
        torch.testing.assert_close(
            got[o_a][:, :32],
            start[o_a][:, :32],
            rtol=1e-6,
            atol=0,
            msg="o_proj A columns of a KV group nobody kept changed",
        )


@pytest.mark.parametrize("padding", ["zeros", "holders"])
@pytest.mark.parametrize("cls", ALLOWED, ids=lambda c: c.__name__)
def test_keeps_that_remove_nothing_aggregate_as_unpruned_clients(
    cls: type[LoraStrategy], padding: str, shapes: dict
) -> None:
    ranks = {1: 2, 2: R_MAX, 3: 1}
    everything = Keep(((0, 1),) * 2, (tuple(range(176)),) * 2, (2, 2), (176, 176), 2, 16)
    start, replies = _global(shapes), _clients(shapes, ranks, {n: None for n in ranks})
    plain = _aggregate(cls, start, replies, {n: None for n in ranks}, padding)
    masked = _aggregate(cls, start, replies, {n: everything for n in ranks}, padding)
    _assert_states_close(masked, plain)


# --- no masks: as before pruning ------------------------------------------------------------


def _padded_b(state: AdapterState, a_key: str, b_key: str) -> torch.Tensor:
    return zero_pad(state[a_key], state[b_key], R_MAX)[1]


@pytest.mark.parametrize("cls", ALLOWED, ids=lambda c: c.__name__)
def test_without_masks_each_rule_is_its_lora_math_function(cls: type[LoraStrategy], shapes: dict) -> None:
    # the lora_math functions zero-pad: the strategies' "zeros" padding
    ranks = {1: 2, 2: R_MAX, 3: 1}
    start, replies = _global(shapes), _clients(shapes, ranks, {n: None for n in ranks})
    got = _aggregate(cls, start, replies, {n: None for n in ranks}, "zeros")
    states, weights = list(replies.values()), [EXAMPLES[n] for n in replies]
    scales, s_g = [ALPHA / ranks[n] for n in replies], ALPHA / R_MAX
    expected: AdapterState = {}
    for a_key, b_key in layer_pairs(start).values():
        As, Bs = [s[a_key] for s in states], [s[b_key] for s in states]
        if cls is FedIT:
            expected[a_key], expected[b_key] = fedit(As, Bs, scales, weights, R_MAX, s_g=s_g)
        elif cls is HetLoRA:
            expected[a_key], expected[b_key] = hetlora(As, Bs, scales, [1.0] * len(states), R_MAX, s_g=s_g)
        elif cls is FFALoRA:
            expected[a_key] = start[a_key]
            expected[b_key] = ffa_lora(
                [_padded_b(s, a_key, b_key) for s in states], scales, weights, start[a_key], s_g=s_g
            )
        else:
            expected[a_key] = fedsa_lora([zero_pad(A, B, R_MAX)[0] for A, B in zip(As, Bs)], weights)
            expected[b_key] = start[b_key]
    _assert_states_close(got, expected)


def test_a_mask_free_client_adapter_has_no_mask(shapes: dict) -> None:
    strategy = FedIT(R_MAX, ALPHA)
    strategy.current = _global(shapes)
    state = _random(shapes, 2, seed=1)
    client = strategy.client_adapter(_reply(1, state, 5.0, None))
    assert client.mask is None and client.rank == 2 and client.weight == 5.0 and client.scale == ALPHA / 2
    assert all(torch.equal(client.state[k], v) for k, v in state.items())


def test_a_pruned_reply_is_scattered_with_its_coverage(shapes: dict) -> None:
    strategy = HetLoRA(R_MAX, ALPHA)
    strategy.current = _global(shapes)
    sliced = _clients(shapes, {1: 2}, KEEPS)[1]
    client: ClientAdapter = strategy.client_adapter(_reply(1, sliced, 5.0, KEEPS[1]))
    assert client.mask is not None and client.rank == 2
    for key, shape in shapes.items():
        full_shape = (2, shape[1]) if ".lora_A." in key else (shape[0], 2)
        assert torch.equal(client.mask[key], _coverage(key, full_shape, KEEPS[1])), key
        assert torch.equal(client.state[key], _scattered(sliced, KEEPS[1], 2, shapes)[key]), key


# --- downlink -------------------------------------------------------------------------------


def test_a_pruned_node_is_sent_the_slice_of_its_rank_and_its_order(shapes: dict) -> None:
    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 3]

    strategy, start = FedIT(R_MAX, ALPHA), _global(shapes)
    strategy.assign_ranks({1: 2, 3: R_MAX})
    order = {"prune-keep": KEEPS[1].to_json(), "prune-target": 0.5, "prune-steps": 8}
    strategy.assign_pruning({1: (KEEPS[1], order)})
    grid = Grid()
    sent_messages = strategy.configure_train(1, ArrayRecord(start), ConfigRecord({}), grid)  # type: ignore[arg-type]
    messages = {m.metadata.dst_node_id: m for m in sent_messages}
    sent = from_record(messages[1].content["arrays"])
    expected = slice_adapter(strategy.client_state(start, 2), KEEPS[1])
    assert sent.keys() == expected.keys() and all(torch.equal(sent[k], v) for k, v in expected.items())
    config = messages[1].content["config"]
    assert (config["prune-keep"], config["prune-target"], config["prune-steps"]) == (order["prune-keep"], 0.5, 8)
    assert "prune-keep" not in messages[3].content["config"]
    assert all(torch.equal(from_record(messages[3].content["arrays"])[k], v) for k, v in start.items())


# --- strategies that cannot aggregate pruned clients ---------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_strategies_raise_in_assign_pruning_with_the_reason(name: str) -> None:
    cls = REFUSED[name]
    strategy = cls(R_MAX, ALPHA, server_lr=1.0) if name in ASYNC_STRATEGIES else cls(R_MAX, ALPHA)
    assert cls.pruning_refused and PRUNING_REFUSED[name] == cls.pruning_refused
    strategy.assign_pruning({})  # nobody pruned: fine
    with pytest.raises(
        ValueError, match=f"{cls.__name__} cannot aggregate pruned clients: {re.escape(cls.pruning_refused)}"
    ):
        strategy.assign_pruning({7: (KEEPS[1], {"prune-target": 0.5})})
    assert set(PRUNING_REFUSED) == set(REFUSED)


@pytest.mark.parametrize("cls", ALLOWED, ids=lambda c: c.__name__)
def test_allowed_strategies_accept_pruned_nodes(cls: type[LoraStrategy]) -> None:
    strategy = cls(R_MAX, ALPHA)
    strategy.assign_pruning({7: (KEEPS[1], {"prune-target": 0.5})})
    assert strategy.pruning[7][0] == KEEPS[1]


def _scenario(strategy: str, ratio: float) -> dict:
    return {
        "model": {"name": "tiny-llama"},
        "strategy": {"name": strategy},
        "lora": {"target_modules": ["q_proj", "v_proj", "up_proj"]},
        "pruning": {"ratio": ratio},
        "participation": {"mode": "async" if strategy in ASYNC_STRATEGIES else "sync"},
    }


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_the_scenario_refuses_pruning_with_a_refused_strategy_naming_it(name: str) -> None:
    validate_scenario(_scenario(name, 0.0))  # no pruning: fine
    with pytest.raises(ScenarioError) as err:
        validate_scenario(_scenario(name, 0.3))
    (problem,) = err.value.problems
    assert f"`strategy.name` = '{name}' cannot aggregate pruned clients" in problem
    assert PRUNING_REFUSED[name] in problem and "use fedit, hetlora, ffa_lora or fedsa_lora" in problem


@pytest.mark.parametrize("name", ["fedit", "hetlora", "ffa_lora", "fedsa_lora", "fedadam", "fedprox"])
def test_the_scenario_accepts_pruning_with_a_mask_aware_strategy(name: str) -> None:
    assert validate_scenario(_scenario(name, 0.3)).pruning.enabled
