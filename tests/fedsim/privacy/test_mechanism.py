"""The Gaussian mechanism: noise of the stated std on every coordinate, drawn once per round from a
seed derived by `fedsim.seeding`, and the fixed-denominator mean of DP-FedAvg."""

from __future__ import annotations

import pytest
import torch

from fedsim.privacy import add_noise, noise_generator, noised_mean
from fedsim.seeding import derive_seed

LIKE = {"layer.lora_A.weight": torch.zeros(8, 300), "layer.lora_B.weight": torch.zeros(400, 8), "bias": torch.zeros(5)}
N_COORDS = sum(t.numel() for t in LIKE.values())


def coords(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([update[k].flatten().double() for k in sorted(update)])


def updates(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) for k, v in LIKE.items()} for _ in range(n)]


@pytest.mark.parametrize("std", [0.05, 1.0, 7.5])
def test_noise_on_a_zero_update_has_the_stated_std_and_mean_zero(std):
    noise = coords(add_noise(LIKE, std, noise_generator(0, 1, "dp-noise")))

    # N = 5605 draws: the sample std's relative standard error is 1/sqrt(2N) ≈ 0.9 %
    assert noise.std().item() == pytest.approx(std, rel=0.04)
    assert abs(noise.mean().item()) < 4 * std / N_COORDS**0.5
    assert (noise != 0).all()  # every coordinate is noised


def test_the_noised_mean_of_no_update_is_noise_over_the_expected_count():
    std, m = 2.0, 4.0

    out = coords(noised_mean([], LIKE, m, std, noise_generator(3, 7, "dp-noise")))

    assert out.std().item() == pytest.approx(std / m, rel=0.04)


def test_the_same_seed_and_round_give_the_same_noise_and_another_round_other_noise():
    a = add_noise(LIKE, 1.0, noise_generator(5, 2, "dp-noise"))
    b = add_noise(LIKE, 1.0, noise_generator(5, 2, "dp-noise"))
    c = add_noise(LIKE, 1.0, noise_generator(5, 3, "dp-noise"))

    assert all(torch.equal(a[k], b[k]) for k in LIKE)
    assert not torch.equal(a["bias"], c["bias"])


def test_the_generator_is_seeded_through_fedsim_seeding():
    expected = torch.randn(10, generator=torch.Generator().manual_seed(derive_seed(9, 4, "dp-noise")))

    assert torch.equal(torch.randn(10, generator=noise_generator(9, 4, "dp-noise")), expected)


def test_secure_noise_is_not_reproducible():
    assert not torch.equal(
        torch.randn(10, generator=noise_generator(None)), torch.randn(10, generator=noise_generator(None))
    )


def test_noise_does_not_depend_on_the_order_the_tensors_come_in():
    reordered = dict(reversed(list(LIKE.items())))

    a, b = add_noise(LIKE, 1.0, noise_generator(0, 1)), add_noise(reordered, 1.0, noise_generator(0, 1))

    assert all(torch.equal(a[k], b[k]) for k in LIKE)


def test_the_noised_mean_is_the_sum_plus_one_draw_of_noise_over_the_expected_count():
    std, m = 0.3, 10.0
    noise = add_noise(LIKE, std, noise_generator(1, 1, "dp-noise"))  # the draw on a zero sum

    for n in (1, 3, 12):  # fewer, or more, clients than expected: the denominator stays m
        ups = updates(n, seed=n)

        out = noised_mean(ups, LIKE, m, std, noise_generator(1, 1, "dp-noise"))

        for k in LIKE:
            expected = (torch.stack([u[k] for u in ups]).sum(0) + noise[k]) / m
            torch.testing.assert_close(out[k], expected)


def test_inputs_are_not_modified():
    ups = updates(2)
    before = [{k: v.clone() for k, v in u.items()} for u in ups]

    noised_mean(ups, LIKE, 2.0, 1.0, noise_generator(0, 0))

    assert all(torch.equal(u[k], b[k]) for u, b in zip(ups, before) for k in LIKE)


@pytest.mark.parametrize(
    ("ups", "expected", "std", "message"),
    [
        ([{"bias": torch.zeros(5)}], 1.0, 1.0, "names other tensors"),
        ([{**LIKE, "bias": torch.zeros(6)}], 1.0, 1.0, r"`bias` has shape \(6,\), expected \(5,\)"),
        ([], 0.0, 1.0, "expected number of clients"),
        ([], 1.0, -1.0, "`std` must be >= 0"),
    ],
)
def test_bad_inputs_are_refused(ups, expected, std, message):
    with pytest.raises(ValueError, match=message):
        noised_mean(ups, LIKE, expected, std, noise_generator(0, 0))
