"""The server's DP book: what clients are told, the re-clip and the noise of the round's mean, the
figures of the central row, and a checkpointed state that goes on as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from fedsim.config.privacy import PrivacyConfig
from fedsim.privacy import PrivacyBook, add_noise, epsilon, l2_norm, noise_generator
from fedsim.protocol import DP_CLIP, DP_LOCAL_NOISE, DP_REPORT, DP_SCALE

LIKE = {"m.lora_A.weight": torch.zeros(4, 50), "m.lora_B.weight": torch.zeros(60, 4)}
CENTRAL = PrivacyConfig(mode="central", clip=0.5, noise_multiplier=1.2)


def book(privacy: PrivacyConfig = CENTRAL, seed: int = 3) -> PrivacyBook:
    return PrivacyBook.build(privacy, num_clients=100, per_round=10, rounds=20, seed=seed)


def big(scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in LIKE.items()}


def test_clients_are_told_the_clip_the_scaling_and_in_local_mode_their_noise():
    local = book(PrivacyConfig(mode="local", clip=0.5, noise_multiplier=2.0))
    adaptive = book(PrivacyConfig(mode="central", clip=0.5, noise_multiplier=0.8, adaptive=True))

    assert book().client_config(2.0) == {DP_CLIP: 0.5, DP_SCALE: 2.0, DP_LOCAL_NOISE: 0.0, DP_REPORT: False}
    assert local.client_config(2.0)[DP_LOCAL_NOISE] == pytest.approx(2.0 * 0.5)
    assert adaptive.client_config(2.0)[DP_REPORT] is True


def test_central_mode_re_clips_each_update_and_adds_one_draw_of_noise_over_m():
    b = book()
    updates = [big(1.0, 1), big(1e-4, 2)]  # the first far outside the clip, the second inside

    out = b.noised_mean(updates, LIKE, t=7)

    noise = add_noise(LIKE, 1.2 * 0.5, noise_generator(3, 7, "dp-noise"))
    clipped = {k: v * 0.5 / l2_norm(updates[0]) for k, v in updates[0].items()}
    for k in LIKE:
        torch.testing.assert_close(out[k], (clipped[k] + updates[1][k] + noise[k]) / 10, rtol=1e-5, atol=1e-7)


def test_local_mode_only_sums_what_the_clients_noised():
    b = book(PrivacyConfig(mode="local", clip=0.5, noise_multiplier=2.0))
    updates = [big(1.0, 1)]

    out = b.noised_mean(updates, LIKE, t=1)

    for k in LIKE:
        torch.testing.assert_close(out[k], updates[0][k] / 10)


def test_a_step_counts_the_round_and_says_its_public_figures():
    b = book()

    rows = [b.step([], t) for t in (1, 2)]

    assert rows[1]["dp_epsilon"] == epsilon("central", 1.2, 0.1, 2, 100**-1.1)
    assert rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] and rows[0]["dp_clip"] == 0.5
    assert "dp_unclipped" not in rows[0]


def test_adaptive_clipping_moves_the_clip_the_next_round_uses():
    b = book(PrivacyConfig(mode="central", clip=0.5, noise_multiplier=0.8, adaptive=True))

    row = b.step([1.0] * 10, 1)  # every update unclipped: the clip shrinks

    assert row["dp_clip"] == 0.5 and row["dp_unclipped"] > 0.5
    assert b.clip < 0.5 and b.client_config(1.0)[DP_CLIP] == b.clip


def test_a_state_round_trip_goes_on_as_an_uninterrupted_run():
    cfg = PrivacyConfig(mode="central", clip=0.5, noise_multiplier=0.8, adaptive=True)
    whole, first = book(cfg), book(cfg)
    for t in (1, 2, 3):
        whole.step([1.0, 0.0, 1.0], t)
    first.step([1.0, 0.0, 1.0], 1)

    resumed = book(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    last = [resumed.step([1.0, 0.0, 1.0], t) for t in (2, 3)][-1]

    assert resumed.clip == whole.clip and last["dp_epsilon"] == whole.accountant.epsilon(whole.plan.delta)


@pytest.mark.parametrize(
    ("saved", "now", "message"),
    [
        (CENTRAL, PrivacyConfig(mode="central", clip=0.5, noise_multiplier=2.0), "noise_multiplier 1.2"),
        (
            PrivacyConfig(mode="central", clip=0.5, noise_multiplier=0.8),
            PrivacyConfig(mode="central", clip=0.5, noise_multiplier=0.8, adaptive=True),
            "without adaptive",
        ),
    ],
)
def test_a_state_kept_under_another_mechanism_is_refused(saved, now, message):
    with pytest.raises(ValueError, match=message):
        book(now).load_state_dict(book(saved).state_dict())


def test_secure_noise_is_not_the_seeds():
    b = book(PrivacyConfig(mode="central", clip=0.5, noise_multiplier=1.0, secure_noise=True))

    a, c = b.noised_mean([], LIKE, t=1), b.noised_mean([], LIKE, t=1)

    assert b.seed is None and not torch.equal(a["m.lora_A.weight"], c["m.lora_A.weight"])
