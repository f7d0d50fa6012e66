"""The client's DP step: its update clipped in the global scaling (so a low-rank client's fold cannot
carry it past the clip), local noise of the stated std from its own seed, the indicator bit only
when asked; and in local mode error feedback keeps a residual of noised values only."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from clients.app import EF_KEY, encode_update, privatise
from fedsim.compression import codec_config, compress, decode, layout_of, residual
from fedsim.config.scenario import CompressionConfig, Scenario
from fedsim.privacy import add_noise, folded, l2_norm, noise_generator
from fedsim.protocol import DP_CLIP, DP_LOCAL_NOISE, DP_REPORT, DP_SCALE

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
SCENARIO = Scenario.model_validate({"seed": 5, "lora": {"rank": 8, "alpha": 16}})  # s_g = 2


def update(rank: int, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, 64, generator=g) * scale, B: torch.randn(64, rank, generator=g) * scale}


def config(clip: float = 0.5, noise: float = 0.0, report: bool = False) -> ConfigRecord:
    return ConfigRecord({DP_CLIP: clip, DP_SCALE: 2.0, DP_LOCAL_NOISE: noise, DP_REPORT: report})


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_the_update_is_clipped_in_the_global_scaling(rank):
    s_k = 16 / rank

    sent, bit = privatise(update(rank, 1.0), config(), SCENARIO, cid=3, server_round=1, rank=rank)

    assert l2_norm(folded(sent, s_k, 2.0)) <= 0.5 * (1 + 1e-6)  # as the server sums it
    assert l2_norm(folded(sent, s_k, 2.0)) == pytest.approx(0.5, rel=1e-5)  # it was far outside: on the bound
    assert bit is None  # not asked


def test_an_update_inside_the_bound_is_sent_as_it_is_and_reports_its_bit():
    small = update(8, 1e-4)

    sent, bit = privatise(small, config(report=True), SCENARIO, cid=0, server_round=1, rank=8)

    assert all(torch.equal(sent[k], small[k]) for k in small) and bit == 1
    assert privatise(update(8, 1.0), config(report=True), SCENARIO, cid=0, server_round=1, rank=8)[1] == 0


def test_local_noise_has_the_stated_std_on_a_zero_update_and_its_own_seed():
    zero = {k: torch.zeros_like(v) for k, v in update(8, 1.0).items()}

    sent, _ = privatise(zero, config(noise=0.3), SCENARIO, cid=3, server_round=2, rank=8)

    values = torch.cat([v.flatten() for v in sent.values()])
    assert values.std().item() == pytest.approx(0.3, rel=0.05)
    expected = add_noise(zero, 0.3, noise_generator(5, 2, 3, "dp-local-noise"))  # seed, round, client
    assert all(torch.equal(sent[k], expected[k]) for k in zero)
    other, _ = privatise(zero, config(noise=0.3), SCENARIO, cid=4, server_round=2, rank=8)
    assert not torch.equal(other[A], sent[A])


def test_in_local_mode_error_feedback_keeps_a_residual_of_noised_values_only():
    cfg = CompressionConfig(method="compeft", density=0.1, error_feedback=True)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    noised = [privatise(update(8, 1.0, seed), config(noise=0.3), SCENARIO, 0, t, 8)[0] for seed, t in ((1, 1), (2, 2))]

    first = decode(encode_update(noised[0], cfg, ctx), layout_of(noised[0]))
    carried = ctx.state.array_records[EF_KEY].to_torch_state_dict()
    second = decode(encode_update(noised[1], cfg, ctx), layout_of(noised[1]))

    for k in noised[0]:  # e_1 = noised_1 − sent_1: nothing but noised values
        torch.testing.assert_close(carried[k], (noised[0][k] - first[k]).double(), rtol=0, atol=1e-6)
    with_feedback = {k: (noised[1][k].double() + carried[k]).float() for k in noised[1]}
    expected = compress(with_feedback, codec_config(cfg))
    assert all(torch.equal(second[k], expected[k]) for k in second)
    assert set(residual(with_feedback, expected)) == set(noised[1])
