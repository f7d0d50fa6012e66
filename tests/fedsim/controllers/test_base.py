"""What every controller promises (`fedsim.controllers.base`): infeasible arms never chosen
again, the cheapest point when nothing fits, identical choices after a state_dict round trip,
determinism, input checks, and choose/update vectorised over 10,000 devices."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fedsim.controllers as controllers
from fedsim.controllers import CONTROLLERS, ControllerConfig, build_controller

ALL = sorted(CONTROLLERS)


def build(name: str, n: int, seed: int = 0, groups: int = 1, **overrides):
    rng = np.random.default_rng(seed)
    features = np.stack([np.ones(n), rng.normal(size=n)], axis=1)
    return build_controller(ControllerConfig(name=name, **overrides), n, np.arange(n) % groups, features, seed)


def test_registry_names_match_and_exports_are_sorted():
    assert all(cls.name == name for name, cls in CONTROLLERS.items())
    assert set(CONTROLLERS) == {
        "discounted_ucb",
        "exp3",
        "fixed",
        "linucb",
        "sliding_window_ucb",
        "sucb",
        "thompson",
        "ucb1",
    }
    kind = lambda name: (0 if name.isupper() else 1 if name[0].isupper() else 2, name)  # constants, classes, functions
    assert controllers.__all__ == sorted(controllers.__all__, key=kind)


@pytest.mark.parametrize("infer", [True, False], ids=["infer", "exact"])
@pytest.mark.parametrize("name", ALL)
def test_infeasible_arms_are_never_chosen_again(name, infer):
    # Device d fits (r, p) iff r < r_lim[d] or p > p_lim[d] (memory grows with the rank and
    # shrinks with pruning); without inference it also misses random holes. (4, 0.6) always fits.
    n, rounds = 30, 60
    ctrl = build(name, n, infer_infeasible=infer)
    grid, rng, devices = ctrl.grid, np.random.default_rng(1), np.arange(n)
    ranks_k, ratios_k = grid.arm_ranks(), grid.arm_ratios()
    fits = (ranks_k[None, :] < rng.choice([8, 16, 32], n)[:, None]) | (
        ratios_k[None, :] > rng.choice([0.0, 0.2, 0.4], n)[:, None] + 1e-9
    )
    if not infer:
        fits &= rng.random(fits.shape) > 0.2
        fits[:, grid.arm_of([4], [0.6])[0]] = True
    known = np.zeros_like(fits)  # (device, arm) reported infeasible
    for t in range(rounds):
        ranks, ratios = ctrl.choose(devices, t)
        arms = grid.arm_of(ranks, ratios)
        assert not known[devices, arms].any(), f"round {t}: an arm reported infeasible was chosen again"
        if infer:
            dominated = known & (ranks[:, None] >= ranks_k[None, :]) & (ratios[:, None] <= ratios_k[None, :] + 1e-9)
            assert not dominated.any(), f"round {t}: an arm needing more memory than an infeasible one was chosen"
        feasible = fits[devices, arms]
        known[devices[~feasible], arms[~feasible]] = True
        rewards = np.where(feasible, 0.5 + 0.1 * rng.standard_normal(n), 0.0)
        ctrl.update(devices, ranks, ratios, rewards, feasible)
    assert known.any()


@pytest.mark.parametrize("name", ALL)
def test_a_device_nothing_fits_gets_the_cheapest_point_and_is_flagged(name):
    ctrl = build(name, 2, infer_infeasible=False)
    grid = ctrl.grid
    for arm in range(grid.num_arms):
        ctrl.update(np.array([0]), grid.rank_of([arm]), grid.ratio_of([arm]), np.array([0.0]), np.array([False]))
    assert ctrl.exhausted(np.array([0, 1])).tolist() == [True, False]
    ranks, ratios = ctrl.choose(np.array([0, 1]), 0)
    assert (ranks[0], ratios[0]) == (4, 0.6)


def drive(ctrl, rounds: int, rng: np.random.Generator, start: int = 0) -> list[tuple[list[int], list[float]]]:
    """Play `rounds` rounds on a random half of the fleet with random rewards, some infeasible;
    the inputs depend only on `rng`, the choices are returned."""
    seen = []
    for t in range(start, start + rounds):
        devices = np.sort(rng.choice(ctrl.num_devices, ctrl.num_devices // 2, replace=False))
        ranks, ratios = ctrl.choose(devices, t)
        rewards, feasible = rng.random(len(devices)), rng.random(len(devices)) > 0.1
        ctrl.update(devices, ranks, ratios, np.where(feasible, rewards, 0.0), feasible)
        seen.append((ranks.tolist(), ratios.tolist()))
    return seen


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_continues_identically(name):
    original = build(name, 12, seed=3, groups=3)
    drive(original, 15, np.random.default_rng(0))
    buffer = io.BytesIO()
    np.savez(buffer, **original.state_dict())
    buffer.seek(0)
    restored = build(name, 12, seed=3, groups=3)
    restored.rng = np.random.default_rng(12345)  # overwritten by the loaded state
    restored.load_state_dict(dict(np.load(buffer)))
    assert drive(restored, 15, np.random.default_rng(1), start=15) == drive(
        original, 15, np.random.default_rng(1), start=15
    )


POOLED = ["discounted_ucb", "sliding_window_ucb", "sucb", "thompson", "ucb1"]


@pytest.mark.parametrize("name", POOLED)
def test_pooled_state_dict_round_trip_continues_identically(name):
    # Pooling adds no state: it is derived from counts and sums at each choose.
    original = build(name, 12, seed=3, groups=3, pool="profile")
    assert set(original.state_dict()) == set(build(name, 12, seed=3, groups=3).state_dict())
    drive(original, 15, np.random.default_rng(0))
    restored = build(name, 12, seed=3, groups=3, pool="profile")
    restored.load_state_dict(original.state_dict())
    assert drive(restored, 15, np.random.default_rng(1), start=15) == drive(
        original, 15, np.random.default_rng(1), start=15
    )


@pytest.mark.parametrize("name", POOLED)
def test_pooling_changes_nothing_for_a_device_alone_in_its_profile(name):
    alone = build(name, 8, seed=2, groups=8, pool="profile")
    assert drive(alone, 20, np.random.default_rng(0)) == drive(
        build(name, 8, seed=2, groups=8), 20, np.random.default_rng(0)
    )


@pytest.mark.parametrize("name", POOLED)
def test_pooling_changes_the_choices_of_devices_that_have_peers(name):
    pooled = build(name, 8, seed=2, groups=2, pool="profile")
    assert drive(pooled, 20, np.random.default_rng(0)) != drive(
        build(name, 8, seed=2, groups=2), 20, np.random.default_rng(0)
    )


def test_peers_lend_their_mean_worth_at_most_pool_pulls():
    # n' = n + m, s' = s + m·S/N with m = N·C/(N + C): N, S the peers' pulls and sums of the point.
    ctrl = build("ucb1", 4, ranks=[4, 16], ratios=[0.0], pool="profile", pool_pulls=10.0)
    ctrl.counts[:] = [[2.0, 0.0], [3.0, 1.0], [5.0, 0.0], [0.0, 0.0]]
    ctrl.sums[:] = [[1.0, 0.0], [2.4, 0.9], [3.5, 0.0], [0.0, 0.0]]
    counts, sums = ctrl._statistics(np.array([0, 3]))
    n, s = np.array([8.0, 1.0]), np.array([5.9, 0.9])  # device 0's peers (1, 2)
    lent = n * 10 / (n + 10)
    assert np.allclose(counts[0], [2.0, 0.0] + lent) and np.allclose(sums[0], [1.0, 0.0] + lent * s / n)
    n = np.array([10.0, 1.0])  # device 3's peers (0, 1, 2), it has no pulls of its own
    assert np.allclose(counts[1], n * 10 / (n + 10)) and np.allclose(sums[1] / counts[1], [6.9 / 10, 0.9])


def test_what_peers_lend_depends_on_their_pulls_not_on_their_number():
    # The same 30 peer pulls lend a fresh device as much in a profile of 40 as in one of 4, and
    # 3000 lend no more than pool_pulls: a rarely sampled device of a big profile still starts
    # from what its peers learnt (the former per-device average lent it 30/39 of a pull per w).
    def fresh(size: int, pulls: float):
        ctrl = build("ucb1", size, ranks=[4, 16], ratios=[0.0], pool="profile", pool_pulls=10.0)
        ctrl.counts[1:, 0] = pulls / (size - 1)
        ctrl.sums[1:, 0] = 0.7 * pulls / (size - 1)
        return ctrl._statistics(np.array([0]))

    (small, small_sums), (big, big_sums) = fresh(4, 30.0), fresh(40, 30.0)
    assert np.allclose(small, big) and np.allclose(small_sums, big_sums) and np.isclose(small[0, 0], 7.5)
    capped, _ = fresh(40, 3000.0)
    assert 9.9 < capped[0, 0] < 10.0 and capped[0, 1] == 0.0


def test_pooled_devices_of_one_round_spread_over_close_points_and_nothing_is_stored():
    # Three devices of one profile, two arms at means 0.6 and 0.5 after two pulls each (8 pooled
    # pulls each): pooled, all three score the first higher; spread, each earlier pick of a peer
    # counts as 1.5 more pulls of it (w = 3 over 2 peers): the second device still takes it
    # (9.5 pulls, index 1.376 vs 1.346), the third, seeing 11, takes the other (1.332 vs 1.358).
    def ctrl(spread: bool):
        c = build("ucb1", 3, ranks=[4, 16], ratios=[0.0], pool="profile", pool_spread=spread, ucb_c=1.0)
        c.counts[:] = 2.0
        c.sums[:] = [1.2, 1.0]
        return c

    herd, spread = ctrl(False), ctrl(True)
    assert herd.choose(np.arange(3), 5)[0].tolist() == [4, 4, 4]
    assert spread.choose(np.arange(3), 5)[0].tolist() == [4, 4, 16]
    assert (spread.counts == 2.0).all() and (spread.sums == [1.2, 1.0]).all()  # only real pulls are kept


@pytest.mark.parametrize("name", ["ucb1", "sucb"])
def test_spreading_a_profiles_picks_cuts_regret_under_round_normalised_rewards(name, bandit):
    # Every device of one profile plays every round and rewards are divided by the round's max
    # (the reward module's default): when they all take the same point, the round cannot tell
    # the points apart. Measured, seeds 0–2, 60 rounds: ucb1 74 → 39, sucb 64 → 40.
    kw = dict(devices=8, profiles=1, sampled=8, rounds=60, round_max=True, ucb_c=bandit.UCB_C, pool="profile")
    herd, spread = bandit.sparse_regret(name, pool_spread=False, **kw), bandit.sparse_regret(name, **kw)
    assert spread < 0.75 * herd, (spread, herd)


@pytest.mark.parametrize("name", POOLED)
def test_a_peers_infeasible_arm_stays_open_to_a_device(name):
    # Device 0 runs out of memory at (32, 0.0); its peer, device 1, has more memory and earns
    # most there: pooled, it still tries that arm, and device 0 never does again.
    ctrl = build(name, 2, pool="profile", pool_pulls=1.0)
    big = ctrl.grid.arm_of([32], [0.0])[0]
    ctrl.update(np.array([0]), np.array([32]), np.array([0.0]), np.array([0.0]), np.array([False]))
    assert ctrl.infeasible[0].sum() == 1 and not ctrl.infeasible[1].any()
    ones, mine = np.ones(1, dtype=bool), []
    for t in range(60):
        for device in (0, 1):
            ranks, ratios = ctrl.choose(np.array([device]), t)
            arm = ctrl.grid.arm_of(ranks, ratios)[0]
            assert device == 1 or arm != big, f"round {t}: device 0 chose its infeasible arm"
            if device == 1:
                mine.append(arm)
            ctrl.update(np.array([device]), ranks, ratios, np.array([1.0 if arm == big else 0.3]), ones)
    assert big in mine


@pytest.mark.parametrize("name", ALL)
def test_state_dict_holds_copies(name):
    ctrl = build(name, 4)
    state = ctrl.state_dict()
    for value in state.values():
        if value.dtype.kind in "fiu" and value.size:
            value[...] = 7
    assert not (ctrl.counts == 7).any() and ctrl.state_dict()["rng"].tolist() != state["rng"].tolist()


def test_loading_a_mismatched_state_names_every_problem():
    ctrl = build("ucb1", 4)
    state = ctrl.state_dict()
    state["counts"] = np.zeros((3, 16))
    del state["sums"]
    state["controller"] = np.array("exp3")
    with pytest.raises(ValueError) as err:
        ctrl.load_state_dict(state)
    for fragment in (
        "missing key 'sums'",
        "'counts' must have shape (4, 16)",
        "controller 'exp3' cannot load into 'ucb1'",
    ):
        assert fragment in str(err.value)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_choices(name):
    assert drive(build(name, 10, seed=5), 10, np.random.default_rng(0)) == drive(
        build(name, 10, seed=5), 10, np.random.default_rng(0)
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.choose(np.array([0, 4]), 0), r"`devices` must be in \[0, 4\)"),
        (lambda c: c.choose(np.array([[0]]), 0), r"`devices` must be a 1-D array"),
        (
            lambda c: c.update(np.array([0, 0]), [4, 4], [0.0, 0.0], [1.0, 1.0], [True, True]),
            r"must not repeat a device",
        ),
        (
            lambda c: c.update(np.array([0, 1]), [4, 4], [0.0, 0.0], [1.0], [True, True]),
            r"`rewards` must be aligned with devices",
        ),
        (lambda c: c.update(np.array([0]), [4], [0.0], [np.nan], [True]), r"`rewards` must be finite"),
        (lambda c: c.update(np.array([0]), [5], [0.0], [1.0], [True]), r"\(5, 0.0\) is not on the arm grid"),
    ],
)
def test_bad_calls_are_refused_with_the_argument_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(build("ucb1", 4))


def test_bad_fleet_arrays_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match=r"`profiles` must be \(3,\)"):
        build_controller(ControllerConfig(), 3, np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"`features` must be a finite \(3, d\)"):
        build_controller(ControllerConfig(), 3, np.zeros(3, dtype=np.int64), np.ones((3, 0)))


def python_lines(fn) -> int:
    """Python lines executed inside fedsim/controllers while fn() runs."""
    root, count = str(Path(controllers.__file__).parent), 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename.startswith(root) else None)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(
    ("name", "pool"), [(name, "none") for name in ALL] + [("sucb", "profile"), ("ucb1", "profile")]
)
def test_10000_devices_run_vectorised(name, pool):
    # No Python loop over devices: the Python lines executed do not grow with the fleet
    # (a loop over 10,000 devices would multiply them by 100), and a round takes well under
    # a second (a generous bound for a shared machine).
    def rounds(n: int):
        ctrl, devices = build(name, n, groups=4, pool=pool), np.arange(n)
        rewards, feasible = (devices % 10) / 10, devices % 7 != 0

        def run():
            for t in range(2):
                ranks, ratios = ctrl.choose(devices, t)
                assert ranks.shape == ratios.shape == (n,)
                ctrl.update(devices, ranks, ratios, rewards, feasible)

        return run

    small, large = python_lines(rounds(100)), python_lines(rounds(10_000))
    assert large <= 1.05 * small + 20, (small, large)
    run = rounds(10_000)
    start = time.perf_counter()
    run()
    assert time.perf_counter() - start < 4.0


@pytest.mark.parametrize("name", ALL)
def test_avoided_points_are_not_chosen_that_round_and_nothing_is_learned_from_them(name):
    n = 12
    ctrl = build(name, n, ucb_c=0.3)
    devices = np.arange(n)
    avoid = np.repeat((ctrl.point_ranks == 32)[None], n, axis=0)  # every rank-32 point, every device
    rng = np.random.default_rng(0)
    for t in range(20):
        ranks, ratios = ctrl.choose(devices, t, avoid)
        assert (ranks != 32).all(), f"round {t}"
        ctrl.update(devices, ranks, ratios, rng.random(n), np.ones(n, dtype=bool))
    assert not ctrl.infeasible.any()
    assert 32 in ctrl.choose(devices, 20)[0]  # the next round without it may try rank 32 again


@pytest.mark.parametrize("name", ALL)
def test_avoiding_every_point_is_ignored_rather_than_leaving_a_device_nothing(name):
    ctrl = build(name, 3)
    k = len(ctrl.point_ranks)
    ranks, ratios = ctrl.choose(np.arange(3), 0, np.ones((3, k), dtype=bool))
    assert len(ranks) == 3 and set(ranks) <= set(ctrl.grid.ranks)


def test_avoid_of_the_wrong_shape_names_it():
    ctrl = build("ucb1", 3)
    with pytest.raises(ValueError, match=r"`avoid` must be a bool array of shape \(3, 16\)"):
        ctrl.choose(np.arange(3), 0, np.zeros((3, 4), dtype=bool))


LEARNING = [n for n in ALL if n != "fixed"]


@pytest.mark.parametrize("name", LEARNING)
def test_exploit_plays_each_devices_best_mean_point_and_learns_nothing(name, bandit):
    n = 40
    ctrl = build(name, n, seed=1, groups=n, ucb_c=bandit.UCB_C)  # a profile per device: linucb's model is the device's
    rng = np.random.default_rng(0)
    means = bandit.grid_means(n, ctrl.grid.num_arms, rng)
    bandit.play(ctrl, means, 80, rng)
    counts = ctrl.counts.copy()
    devices = np.arange(n)
    ranks, ratios = ctrl.choose(devices, 80, exploit=True)
    mean = np.where(ctrl.counts > 0, ctrl.means(devices), -np.inf)
    best = mean == mean.max(axis=1, keepdims=True)
    at = (ctrl.point_ranks == ranks[:, None]) & np.isclose(
        ctrl.point_ratios, ratios[:, None]
    )  # (n, K) the points played
    if name != "linucb":  # linucb: the best estimate of its shared model
        assert (best & at).any(axis=1).all()  # a point with the device's best mean
    truth = ctrl.grid.arm_of(ranks, ratios) == means.argmax(axis=1)
    assert truth.mean() >= 0.9, truth.mean()  # gaps of 0.2+: the best mean is the best arm
    np.testing.assert_array_equal(ctrl.counts, counts)  # choosing teaches nothing
    fresh, twin = build(name, n, seed=1, groups=n), build(name, n, seed=1, groups=n)
    np.testing.assert_array_equal(
        fresh.choose(devices, 0, exploit=True)[0], twin.choose(devices, 0)[0]
    )  # nothing played: it explores


def test_exploit_skips_infeasible_points_and_fixed_ignores_it():
    ctrl = build("ucb1", 1, ranks=[4, 16], ratios=[0.0])
    ctrl.update(np.array([0]), np.array([16]), np.array([0.0]), np.array([0.9]), np.array([False]))
    ctrl.update(np.array([0]), np.array([4]), np.array([0.0]), np.array([0.2]), np.array([True]))
    assert ctrl.choose(np.array([0]), 2, exploit=True)[0].tolist() == [4]  # rank 16 scored 0.9 but did not fit
    fixed = build("fixed", 2, ranks=[4, 16], ratios=[0.0, 0.2], fixed_arm=(4, 0.2))
    assert fixed.choose(np.arange(2), 9, exploit=True)[0].tolist() == [4, 4]
