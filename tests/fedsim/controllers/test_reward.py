"""The reward: against a per-client reference of the module's formula, and each term on its own
(contribution, improvement per second, straggler factor, normalisation, floor, infeasible penalty)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.controllers import Observations, RewardConfig, RewardState, rewards

ONLY_LOSS = {
    "contribution_weight": 0.0,
    "loss_weight": 1.0,
    "time": "per_second",
    "prune_weight": 0.0,
    "norm_weight": 0.0,
    "straggler": "none",
    "normalise": "none",
    "floor": 0.0,
}


def obs(n: int = 2, **arrays) -> Observations:
    base = {
        "loss_before": np.full(n, 2.0),
        "loss_after": np.full(n, 1.0),
        "time_s": np.full(n, 10.0),
        "feasible": np.ones(n, dtype=bool),
        "ratio_reached": np.zeros(n),
        "ratio_target": np.zeros(n),
        "update_norm": np.ones(n),
    }
    return Observations(**{**base, **arrays})


def reference(
    o: Observations, c: RewardConfig, baseline: tuple[float, float, float]
) -> tuple[list[float], tuple[float, float, float]]:
    """The module docstring's formula, client by client in plain Python."""
    ok = [bool(f) for f in o.feasible]
    idx = [i for i in range(len(ok)) if ok[i]]
    loss = [
        max(0.0, (b - a) / b) if b > 0 and math.isfinite(a) and math.isfinite(b) else 0.0
        for b, a in zip(o.loss_before, o.loss_after)
    ]
    prune = [max(0.0, min(r, t)) for r, t in zip(o.ratio_reached, o.ratio_target)]
    norm = [max(0.0, v) if math.isfinite(v) else 0.0 for v in o.update_norm]
    gain = [max(0.0, v) if math.isfinite(v) else 0.0 for v in o.contribution]
    g = [0.0] * len(ok)
    for w, term in (
        (c.contribution_weight, gain),
        (c.loss_weight, loss),
        (c.prune_weight, prune),
        (c.norm_weight, norm),
    ):
        mean = sum(term[i] for i in idx) / len(idx) if term is not prune else 0.0  # a share of the model: not scaled
        for i in idx:
            g[i] += w * (term[i] / mean if mean > 0 else term[i])
    if o.energy_j is not None:  # a cost, over the mean of the feasible clients whose energy is known
        known = [i for i in idx if math.isfinite(o.energy_j[i])]
        energy = [max(0.0, v) if math.isfinite(v) else 0.0 for v in o.energy_j]
        mean = sum(energy[i] for i in known) / len(known) if known else 0.0
        for i in idx:
            g[i] -= c.energy_weight * (energy[i] / mean if mean > 0 else energy[i])
    m, w, fastest = baseline
    fastest = min(fastest, max(o.time_s[i] for i in idx))  # the fastest round so far: its slowest client
    threshold = o.deadline_s if o.deadline_s > 0 else fastest
    x = [0.0] * len(ok)
    for i in idx:
        t = o.time_s[i]
        x[i] = (
            g[i]
            / (t if c.time == "per_second" else 1.0)
            * ((threshold / t) ** c.straggler_alpha if t > threshold else 1.0)
        )
    if c.normalise == "round_max":
        scale = max(x[i] for i in idx)
    elif c.normalise == "round_mean":
        scale = sum(x[i] for i in idx) / len(idx)
    else:  # baseline
        m = c.baseline_discount * m + (1 - c.baseline_discount) * sum(x[i] for i in idx) / len(idx)
        w = c.baseline_discount * w + (1 - c.baseline_discount)
        scale = m / w
    return [max(x[i] / scale, c.floor) if ok[i] else c.infeasible_penalty for i in range(len(ok))], (m, w, fastest)


@pytest.mark.parametrize("time", ["round", "per_second"])
@pytest.mark.parametrize("normalise", ["round_max", "round_mean", "baseline"])
@pytest.mark.parametrize("deadline", [0.0, 12.0])
@pytest.mark.parametrize("energy_weight", [0.0, 0.4])
def test_matches_the_reference_over_rounds(normalise, deadline, time, energy_weight):
    rng = np.random.default_rng(0)
    cfg = RewardConfig(
        normalise=normalise, floor=0.05, infeasible_penalty=-0.5, time=time, norm_weight=0.25,
        energy_weight=energy_weight,
    )  # fmt: skip
    ours, theirs = RewardState(), (0.0, 0.0, math.inf)
    for _ in range(4):
        n = 9
        before = rng.uniform(1.0, 3.0, n)
        o = obs(
            n,
            loss_before=before,
            loss_after=before * rng.uniform(0.7, 1.1, n),
            time_s=np.where(np.arange(n) == 8, np.nan, rng.uniform(5.0, 20.0, n)),
            feasible=np.arange(n) != 8,
            ratio_reached=rng.uniform(0.0, 0.6, n),
            ratio_target=rng.choice([0.0, 0.2, 0.4], n),
            update_norm=rng.uniform(0.1, 2.0, n),
            deadline_s=deadline,
            contribution=np.where(np.arange(n) == 3, np.nan, rng.uniform(-0.05, 0.1, n)),
            energy_j=np.where(np.arange(n) == 5, np.nan, rng.uniform(50.0, 500.0, n)),
        )
        got, ours = rewards(o, cfg, ours)
        want, theirs = reference(o, cfg, theirs)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert (ours.mean, ours.weight, ours.fastest_s) == pytest.approx(theirs)


def test_reward_is_relative_improvement_per_second():
    o = obs(
        3,
        loss_before=np.array([2.0, 2.0, 1.0]),
        loss_after=np.array([1.5, 1.5, 0.9]),
        time_s=np.array([10.0, 20.0, 10.0]),
    )
    r, _ = rewards(o, RewardConfig(**ONLY_LOSS))
    scale = np.mean([0.25, 0.25, 0.1])  # the loss term is divided by its round mean
    np.testing.assert_allclose(r, np.array([0.25 / 10, 0.25 / 20, 0.1 / 10]) / scale)


def test_contribution_ranks_clients_by_what_their_update_does_to_the_global_model():
    # Same local progress, same time: the client whose adapter lowers the held-out loss most
    # wins; one that raises it gets nothing from the term; unmeasured (NaN) counts as nothing.
    o = obs(4, contribution=np.array([0.02, 0.01, -0.03, np.nan]), time_s=np.ones(4))
    r, _ = rewards(o, RewardConfig(**{**ONLY_LOSS, "loss_weight": 0.0, "contribution_weight": 1.0}))
    np.testing.assert_allclose(r, np.array([0.02, 0.01, 0.0, 0.0]) / np.mean([0.02, 0.01, 0.0, 0.0]))


def test_default_reward_prefers_a_harmless_update_over_a_harmful_one_with_more_local_progress():
    # The pruned client's local loss falls further (it recovers from its own cut), but its adapter
    # harms the global model: the default weights put it below the unpruned one.
    o = obs(
        2,
        loss_after=np.array([1.5, 1.0]),
        contribution=np.array([0.02, -0.05]),
        ratio_reached=np.array([0.0, 0.2]),
        ratio_target=np.array([0.0, 0.2]),
        time_s=np.array([10.0, 9.0]),
    )
    r, _ = rewards(o, RewardConfig())
    assert r[0] == 1.0 and r[1] < 0.6


def test_round_time_does_not_push_a_client_below_the_threshold_but_per_second_does():
    # Three clients, same progress; times 5 s, 10 s (the median) and 20 s.
    o = obs(3, time_s=np.array([5.0, 10.0, 20.0]))
    by_round, _ = rewards(o, RewardConfig(**{**ONLY_LOSS, "time": "round", "straggler": "median"}))
    np.testing.assert_allclose(by_round, [1.0, 1.0, 0.25])  # only the straggler pays, (10/20)^2
    per_second, _ = rewards(o, RewardConfig(**{**ONLY_LOSS, "straggler": "median"}))
    np.testing.assert_allclose(per_second, [1 / 5, 1 / 10, 0.25 / 20])


def test_pruning_progress_is_credited_up_to_the_target():
    o = obs(3, ratio_reached=np.array([0.3, 0.5, 0.2]), ratio_target=np.array([0.4, 0.4, 0.0]), time_s=np.ones(3))
    r, _ = rewards(
        o,
        RewardConfig(
            contribution_weight=0.0,
            loss_weight=0.0,
            norm_weight=0.0,
            prune_weight=1.0,
            straggler="none",
            normalise="none",
            floor=0.0,
        ),
    )
    np.testing.assert_allclose(r, [0.3, 0.4, 0.0])


def test_a_lone_pruner_gets_the_same_pruning_credit_as_one_of_many():
    # Scaled by its round mean, the one pruned client of 8 scored π/π̄ = 8: a bonus for being rare.
    alone = obs(8, ratio_reached=np.r_[0.2, np.zeros(7)], ratio_target=np.r_[0.2, np.zeros(7)], time_s=np.ones(8))
    many = obs(8, ratio_reached=np.full(8, 0.2), ratio_target=np.full(8, 0.2), time_s=np.ones(8))
    config = RewardConfig(
        contribution_weight=0.0, loss_weight=1.0, prune_weight=0.5, straggler="none", normalise="none"
    )
    r_alone, r_many = rewards(alone, config)[0], rewards(many, config)[0]
    assert r_alone[0] == pytest.approx(1.0 + 0.1) and r_alone[1] == pytest.approx(1.0)
    assert r_many[0] == pytest.approx(r_alone[0])


@pytest.mark.parametrize(
    ("straggler", "deadline", "factors"),
    [
        ("deadline", 10.0, [1.0, 1.0, 0.25]),  # (10/20)^2
        ("deadline", 0.0, [1.0, 1.0, 1.0]),  # no deadline: no penalty
        ("median", 0.0, [1.0, 1.0, 0.25]),  # median of 5, 10, 20 is 10
        ("auto", 8.0, [1.0, (8 / 10) ** 2, (8 / 20) ** 2]),
        ("auto", 0.0, [1.0, 1.0, 1.0]),  # the fastest round is this one: its slowest client, 20
        ("fastest", 0.0, [1.0, 1.0, 1.0]),
        ("none", 8.0, [1.0, 1.0, 1.0]),
    ],
)
def test_straggler_factor(straggler, deadline, factors):
    times = np.array([5.0, 10.0, 20.0])
    o = obs(3, time_s=times, deadline_s=deadline)
    r, _ = rewards(o, RewardConfig(**{**ONLY_LOSS, "straggler": straggler}))
    np.testing.assert_allclose(r, 1.0 / times * np.array(factors))


def test_the_fastest_round_so_far_is_the_threshold_and_a_round_of_costly_arms_does_not_raise_it():
    cfg = RewardConfig(**{**ONLY_LOSS, "time": "round", "straggler": "auto"})
    _, state = rewards(obs(2, time_s=np.array([5.0, 10.0])), cfg)  # a cheap round: T = 10
    assert state.fastest_s == 10.0
    r, state = rewards(obs(3, time_s=np.array([5.0, 20.0, 40.0])), cfg, state)  # half the round explores costly arms
    np.testing.assert_allclose(r, [1.0, 0.25, 0.0625])  # (10/20)^2, (10/40)^2: the median (20) would have let 20 off
    assert state.fastest_s == 10.0
    r, state = rewards(obs(2, time_s=np.array([4.0, 6.0])), cfg, state)
    assert state.fastest_s == 6.0 and (r == 1.0).all()


def test_round_max_puts_the_best_feasible_client_at_1_and_ignores_infeasible_ones():
    o = obs(
        3,
        time_s=np.array([10.0, 5.0, np.nan]),
        loss_after=np.array([1.0, 1.0, np.nan]),
        feasible=np.array([True, True, False]),
    )
    r, _ = rewards(o, RewardConfig(**{**ONLY_LOSS, "normalise": "round_max"}))
    np.testing.assert_allclose(r, [0.5, 1.0, 0.0])


def test_round_mean_averages_1_over_feasible_clients():
    o = obs(4, time_s=np.array([1.0, 2.0, 4.0, 8.0]))
    r, _ = rewards(o, RewardConfig(**{**ONLY_LOSS, "normalise": "round_mean"}))
    assert r.mean() == pytest.approx(1.0)


def test_baseline_is_the_bias_corrected_discounted_mean_of_rounds():
    cfg = RewardConfig(**{**ONLY_LOSS, "normalise": "baseline", "baseline_discount": 0.5})
    baseline = None
    for t, time_s in enumerate([1.0, 2.0, 4.0]):
        r, baseline = rewards(obs(2, time_s=np.full(2, time_s)), cfg, baseline)
        means = [1.0, 0.5, 0.25][: t + 1]  # each round's mean raw reward
        weights = [0.5 ** (t - s) * 0.5 for s in range(t + 1)]
        lam = sum(w * m for w, m in zip(weights, means)) / sum(weights)
        np.testing.assert_allclose(r, means[-1] / lam)
    unchanged = rewards(obs(1, feasible=np.array([False]), time_s=np.array([np.nan])), cfg, baseline)[1]
    assert unchanged == baseline


def test_floor_for_no_progress_and_penalty_for_infeasible():
    o = obs(
        3,
        loss_after=np.array([1.0, 2.5, np.nan]),
        time_s=np.array([10.0, 10.0, np.nan]),
        feasible=np.array([True, True, False]),
    )
    r, _ = rewards(
        o, RewardConfig(**{**ONLY_LOSS, "normalise": "round_max", "floor": 0.02, "infeasible_penalty": -1.0})
    )
    np.testing.assert_allclose(r, [1.0, 0.02, -1.0])


def test_a_round_where_nobody_ran_is_all_penalty():
    o = obs(2, time_s=np.full(2, np.nan), feasible=np.zeros(2, dtype=bool))
    r, baseline = rewards(o, RewardConfig(normalise="baseline"))
    np.testing.assert_array_equal(r, [0.0, 0.0])
    assert baseline == RewardState()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"loss_after": np.ones(3)}, r"`loss_after` must be 1-D and aligned with loss_before \(2,\), got \(3,\)"),
        ({"time_s": np.array([10.0, 0.0])}, r"`time_s\[1\]` must be > 0 for a feasible client, got 0.0"),
        ({"deadline_s": -1.0}, r"`deadline_s` must be >= 0, got -1.0"),
        ({"contribution": np.zeros(3)}, r"`contribution` must be 1-D and aligned with loss_before \(2,\), got \(3,\)"),
    ],
)
def test_bad_observations_are_refused_with_the_field_named(arrays, message):
    with pytest.raises(ValueError, match=message):
        obs(2, **arrays)


def test_with_deploy_ratios_pruning_progress_is_the_share_of_the_ratio_the_device_deploys():
    # Clients: trained at its deploy ratio 0.2; half way to it; past it (0.3, then 0.4, for a
    # 0.2 device); pruned on a device that deploys whole.
    o = obs(
        5, ratio_reached=np.array([0.2, 0.1, 0.3, 0.4, 0.2]), ratio_target=np.array([0.2, 0.2, 0.3, 0.4, 0.2]),
        ratio_deployed=np.array([0.2, 0.2, 0.2, 0.2, 0.0]), time_s=np.ones(5),
    )  # fmt: skip
    config = RewardConfig(
        contribution_weight=0.0,
        loss_weight=0.0,
        norm_weight=0.0,
        prune_weight=0.5,
        deploy_weight=2.0,
        straggler="none",
        normalise="none",
        floor=0.0,
    )
    r, _ = rewards(o, config)
    np.testing.assert_allclose(r, [2.0, 1.0, 1.0, 0.0, 0.0])  # weighed by deploy_weight
    without, _ = rewards(obs(5, ratio_reached=o.ratio_reached, ratio_target=o.ratio_target, time_s=np.ones(5)), config)
    np.testing.assert_allclose(
        without, [0.1, 0.05, 0.15, 0.2, 0.1]
    )  # no deploy ratios: the sparsity itself, by prune_weight


def test_by_default_training_at_the_deploy_ratio_earns_nothing_by_itself():
    """The contributions are scored on the deployed models: a device's sparsity adds no bonus of its own."""
    o = obs(
        3, ratio_reached=np.array([0.2, 0.0, 0.1]), ratio_target=np.array([0.2, 0.0, 0.1]),
        ratio_deployed=np.array([0.2, 0.2, 0.2]), contribution=np.array([0.01, 0.03, 0.02]), time_s=np.ones(3),
    )  # fmt: skip
    r, _ = rewards(o, RewardConfig(loss_weight=0.0, straggler="none", normalise="none", floor=0.0))
    np.testing.assert_allclose(r, [0.5, 1.5, 1.0])  # c / c̄ only: the unpruned update, 3x the pruned one's, scores 3x


def test_deploy_ratios_must_align_with_the_other_arrays():
    with pytest.raises(
        ValueError, match=r"`ratio_deployed` must be 1-D and aligned with loss_before \(2,\), got \(3,\)"
    ):
        obs(2, ratio_deployed=np.zeros(3))


def test_with_energy_weight_0_the_rewards_are_those_without_energy():
    o = obs(3, loss_after=np.array([1.5, 1.0, 0.5]), time_s=np.array([10.0, 20.0, 15.0]))
    spent = obs(3, loss_after=np.array([1.5, 1.0, 0.5]), time_s=np.array([10.0, 20.0, 15.0]), energy_j=[1, 50, 9])
    for config in (RewardConfig(), RewardConfig(**ONLY_LOSS), RewardConfig(normalise="baseline")):
        np.testing.assert_array_equal(rewards(spent, config)[0], rewards(o, config)[0])


def test_with_energy_weight_a_client_that_spent_more_gets_less_all_else_equal():
    o = obs(3, energy_j=np.array([100.0, 300.0, np.nan]))
    r, _ = rewards(o, RewardConfig(**ONLY_LOSS, energy_weight=0.5))
    # g = 1 − 0.5·E/Ē with Ē = 200 J over the clients whose energy is known (unknown: no cost), per 10 s
    np.testing.assert_allclose(r, np.array([0.75, 0.25, 1.0]) / 10)
    assert r[0] > r[1]


def test_a_client_whose_energy_outweighs_its_progress_gets_the_floor():
    o = obs(2, energy_j=np.array([10.0, 90.0]))
    r, _ = rewards(o, RewardConfig(energy_weight=1.0, floor=0.01))
    assert r[1] == 0.01 and r[0] == 1.0  # g = [progress − 0.2, progress − 1.8]: only the first is positive


def test_a_negative_energy_weight_is_refused():
    with pytest.raises(ValueError, match="energy_weight"):
        RewardConfig(energy_weight=-1.0)
