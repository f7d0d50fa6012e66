"""The bandit controller in the round loop (`fedsim/server/control.py`), and `fedsim report --arms`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.config.scenario import Scenario, validate_scenario
from fedsim.fleet.fleet import build_fleet
from fedsim.fleet.keeps import PruneBook
from fedsim.pruning.structure import Keep, LayerGeometry
from fedsim.results.report import arms_table
from fedsim.server.control import STATE_FILE, ArmControl, PriceFn

ROOT = Path(__file__).resolve().parents[3]
LAYERS = [LayerGeometry(hidden=64, head_dim=16, group_size=2, groups=2, channels=8)] * 2


def _scenario(**controller: object) -> Scenario:
    return validate_scenario(
        {
            "model": {"name": "tiny-llama"},
            "rounds": 100,  # the tests drive fewer: no round is committed
            "clients": {"num_clients": 4, "per_round": 2},
            "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
            "fleet": {"groups": [{"profile": "laptop-cpu", "count": 2}, {"profile": "phone-highend", "count": 2}]},
            "controller": {"name": "ucb1", "ranks": [2, 8], "ratios": [0.0, 0.5], **controller},
        }
    )


def _control(scenario: Scenario, price: PriceFn | None = None) -> tuple[ArmControl, PruneBook]:
    control = ArmControl.build(scenario, build_fleet(scenario), price)
    assert control is not None
    return control, PruneBook(scenario, LAYERS, np.zeros(4))


def _row(
    cid: int, status: str = "ok", before: float = 2.0, after: float = 1.0, seconds: float = 10.0
) -> dict[str, object]:
    return {
        "kind": "train", "client_id": cid, "status": status, "loss_before": before, "loss_after": after,
        "sim_compute_s": seconds, "sim_comm_s": 0.0, "prune_ratio": 0.0, "update_norm": 1.0, "reason": "",
    }  # fmt: skip


def test_no_controller_section_means_no_controller() -> None:
    scenario = validate_scenario({"model": {"name": "tiny-llama"}})
    assert ArmControl.build(scenario, build_fleet(scenario)) is None


def test_assign_sets_each_clients_rank_and_target_ratio() -> None:
    control, book = _control(_scenario())
    ranks = np.full(4, 8)
    control.assign(np.array([1, 3]), 1, ranks, book)
    for c in (1, 3):
        rank, ratio = control.arms[c]
        assert ranks[c] == rank and book.targets[c] == ratio
        assert (rank, ratio) in {(2, 0.0), (2, 0.5), (8, 0.0), (8, 0.5)}
    assert ranks[0] == 8 and ranks[2] == 8  # clients not sampled keep what they had


def test_a_lower_ratio_restarts_from_the_unpruned_model_and_a_new_one_restarts_the_schedule() -> None:
    _, book = _control(_scenario())
    keep = Keep(((0, 1), (0, 1)), ((0, 1, 2, 3), (0, 1, 2, 3)), (2, 2), (8, 8), 2, 16)  # half the channels
    book.targets[0], book.keeps[0], book.steps[0] = 0.5, keep, 40
    book.retarget(0, 0.5)
    assert book.steps[0] == 40 and book.held(0) == keep  # same arm: nothing changes
    book.retarget(0, 0.6)
    assert book.steps[0] == 0 and book.held(0) == keep  # grows from what it holds
    book.retarget(0, 0.0)
    assert book.held(0) is None and book.steps[0] == 0 and book.targets[0] == 0.0


def test_the_same_arm_again_keeps_a_model_cut_slightly_past_its_target() -> None:
    # Selection removes whole structures, so a model cut for ratio p holds a little more than p.
    # Asking for p again must not send the client back to the unpruned model every round.
    _, book = _control(_scenario())
    keep = Keep(((0, 1), (0, 1)), ((0, 1, 2, 3), (0, 1, 2, 3)), (2, 2), (8, 8), 2, 16)
    held = book.ratio(keep)
    target = held - 0.01  # the arm it was cut for
    book.targets[0], book.keeps[0], book.steps[0] = target, keep, 12
    for _ in range(3):
        book.retarget(0, target)
        assert book.held(0) == keep and book.steps[0] == 12
    book.retarget(0, target - 0.1)  # a lower arm, below what it holds: start over
    assert book.held(0) is None


def test_observe_rewards_contribution_penalises_holding_the_round_up_and_fills_the_rows() -> None:
    control, book = _control(_scenario())
    control.assign(np.array([0, 1]), 1, np.full(4, 8), book)
    control.observe([_row(0), _row(1)])  # a 10 s round: the fastest so far
    control.assign(np.array([0, 1]), 2, np.full(4, 8), book)
    rows = [_row(0, seconds=10.0), _row(1, seconds=40.0), {"kind": "eval_client", "client_id": 0, "status": "ok"}]
    control.observe(rows)
    assert rows[0]["reward"] == pytest.approx(1.0) and rows[1]["reward"] == pytest.approx(
        (10 / 40) ** 2
    )  # same progress, 4x the round
    assert (rows[0]["arm_rank"], rows[0]["arm_ratio"]) == control.arms[0]
    assert "reward" not in rows[2]
    control.assign(np.array([0, 1]), 3, np.full(4, 8), book)
    rows = [{**_row(0), "contribution": 0.05}, {**_row(1), "contribution": -0.02}]  # 1's adapter harms the global model
    control.observe(rows)
    assert rows[0]["reward"] == pytest.approx(1.0) and rows[1]["reward"] == pytest.approx(
        0.5 / 2.5
    )  # contribution 0.05/0.025 = 2, loss 0.5 each
    assert control.controller.counts[[0, 1]].sum() == 6


def test_an_infeasible_arm_is_not_chosen_again_for_that_device() -> None:
    control, book = _control(_scenario(infer_infeasible=False))
    ranks = np.full(4, 8)
    control.assign(np.array([2]), 1, ranks, book)
    bad = control.arms[2]
    control.observe([{**_row(2, status="infeasible"), "sim_compute_s": math.nan}])
    for server_round in range(2, 12):
        control.assign(np.array([2]), server_round, ranks, book)
        assert control.arms[2] != bad
        control.observe([_row(2)])


def test_dropped_and_failed_clients_teach_nothing() -> None:
    control, book = _control(_scenario())
    control.assign(np.array([0, 1]), 1, np.full(4, 8), book)
    control.observe([_row(0, status="dropped"), {**_row(1, status="failed"), "reason": "ValueError: boom"}])
    assert control.controller.counts.sum() == 0


def test_saved_state_continues_identically(tmp_path: Path) -> None:
    scenario = _scenario(name="thompson")
    control, book = _control(scenario)
    for server_round in (1, 2, 3):
        control.assign(np.array([0, 1, 2]), server_round, np.full(4, 8), book)
        control.observe([_row(c, seconds=5.0 + 3 * c) for c in (0, 1, 2)])
    control.save(tmp_path)
    assert (tmp_path / STATE_FILE).is_file()
    fresh, _ = _control(scenario)
    fresh.load(tmp_path)
    assert (
        fresh.reward_state == control.reward_state and control.reward_state.fastest_s == 11.0
    )  # round 1's slowest, 5 + 3·2
    for server_round in (4, 5, 6):
        control.assign(np.array([0, 1, 3]), server_round, np.full(4, 8), book)
        fresh.assign(np.array([0, 1, 3]), server_round, np.full(4, 8), book)
        assert control.arms == fresh.arms
        rows = [_row(c, seconds=5.0 + c) for c in (0, 1, 3)]
        control.observe(rows)
        fresh.observe([dict(r) for r in rows])


def test_state_saved_before_the_fastest_round_was_kept_still_loads(tmp_path: Path) -> None:
    control, _ = _control(_scenario())
    np.savez(
        tmp_path / STATE_FILE, **control.controller.state_dict(), baseline=np.array([0.5, 0.2])
    )  # the earlier format
    control.load(tmp_path)
    assert (control.reward_state.mean, control.reward_state.weight, control.reward_state.fastest_s) == (
        0.5,
        0.2,
        math.inf,
    )


def test_arms_table_reports_the_arm_each_profile_settled_on() -> None:
    rows = []
    for r in range(1, 7):
        for device in ("phone", "laptop"):
            arm = (2, 0.5) if device == "phone" and r > 2 else (8, 0.0) if device == "laptop" else (4, 0.0)
            predicted = float("nan") if r == 1 else 2.0 * r if device == "phone" else 0.9
            rows.append({
                "round": r, "kind": "train", "device": device, "arm_rank": arm[0], "arm_ratio": arm[1],
                "reward": 0.5 + 0.1 * (arm == (2, 0.5)), "arm_predicted_s": predicted,
                "sim_compute_s": 0.5 * r if device == "phone" else 0.5,
                "sim_comm_s": 0.5 * r if device == "phone" else 0.5,
            })  # fmt: skip
    table = arms_table(pd.DataFrame(rows))
    assert table.loc["phone", "predicted_share"] == pytest.approx(2.0) and table.loc[
        "laptop", "predicted_share"
    ] == pytest.approx(0.9)
    assert table.loc["phone", ["settled_rank", "settled_ratio", "settled_share"]].tolist() == [2, 0.5, 1.0]
    assert table.loc["phone", "arms_tried"] == 2 and table.loc["laptop", "arms_tried"] == 1
    assert table.loc["phone", "settled_reward"] == pytest.approx(0.6)
    assert arms_table(pd.DataFrame({"kind": ["train"], "arm_rank": [0]})).empty


def test_only_a_controller_that_learns_from_rewards_has_clients_scored() -> None:
    assert _control(_scenario())[0].scores_contributions  # ucb1
    assert not _control(_scenario(name="fixed"))[0].scores_contributions
    assert not _control(_scenario(reward={"contribution_weight": 0.0}))[0].scores_contributions


def _price(rank: int, ratio: float) -> tuple[float, float]:
    """A round's FLOPs fall with the pruning ratio, the LoRA parameters sent grow with the rank."""
    return 1e12 * (1.0 - ratio), 1e5 * rank


def _paced_run(
    screen: bool, rounds: int = 12, first: tuple[int, float] | None = None
) -> tuple[ArmControl, list[dict[str, object]]]:
    """Clients 0 (1 s of compute, a slow link: rank 8 sends for 8 s) and 1 (fast link), every
    round, their times following `_price` exactly; `first`: both play this arm in round 1."""
    control, book = _control(_scenario(screen=screen, ucb_c=0.3), _price)
    seconds_per = {0: (1e-12, 1e-5), 1: (1e-12, 1e-6)}  # (per FLOP, per parameter)
    played = []
    for server_round in range(1, rounds + 1):
        control.assign(np.array([0, 1]), server_round, np.full(4, 8), book)
        if first is not None and server_round == 1:
            control.arms = {0: first, 1: first}
        rows = []
        for c in (0, 1):
            flops, params = _price(*control.arms[c])
            rows.append(
                {**_row(c), "sim_compute_s": flops * seconds_per[c][0], "sim_comm_s": params * seconds_per[c][1]}
            )
        control.observe(rows)
        played += rows
    return control, played


def test_the_pace_predicts_each_arms_round_time_after_one_round() -> None:
    control, rows = _paced_run(screen=False)
    first, later = rows[:2], rows[2:]
    assert all(math.isnan(r["arm_predicted_s"]) for r in first)  # nothing seen yet
    for r in later:
        assert r["arm_predicted_s"] == pytest.approx(r["sim_compute_s"] + r["sim_comm_s"]), r


def test_the_screen_keeps_a_slow_link_from_trying_the_large_rank() -> None:
    slow_large = lambda rows: sum(1 for r in rows if r["client_id"] == 0 and r["arm_rank"] == 8)
    _, free = _paced_run(screen=False)
    control, screened = _paced_run(screen=True)
    assert slow_large(free) >= 2  # UCB1 tries every arm: both rank-8 arms cost the round 8+ s
    assert slow_large(screened) == 0  # not even before its pace was known (round 1: `worst_ratio`)
    assert control.reward_state.fastest_s <= 3.0  # the fastest round: client 0 at rank 2
    assert (
        sum(1 for r in screened if r["client_id"] == 1 and r["arm_rank"] == 8) >= 2
    )  # the fast link still explores it


def test_before_a_device_reports_it_plays_only_arms_that_cannot_take_much_over_its_cheapest() -> None:
    # _price: rank 8 sends 4x rank 2's parameters, ratio 0 costs 2x ratio 0.5's FLOPs; over 1.25x
    # the cheapest arm (2/0.5) either could be, whatever the device's pace, so round 1 plays 2/0.5.
    _, rows = _paced_run(screen=True, rounds=1)
    assert [(r["arm_rank"], r["arm_ratio"]) for r in rows] == [(2, 0.5), (2, 0.5)]
    _, free = _paced_run(screen=False, rounds=1)
    assert {(r["arm_rank"], r["arm_ratio"]) for r in free} != {(2, 0.5)}  # unscreened UCB1 starts elsewhere


def test_a_costly_first_round_does_not_set_the_bar_for_the_screen() -> None:
    # Round 1 at rank 8 for everybody: the fastest round seen is client 0's 9 s, and no round is
    # faster while it keeps exploring. The pace predicts 3 s for client 0 at rank 2 (its fastest
    # arm), which is the round the fleet can keep, and screens rank 8 (9 s) against it.
    control, rows = _paced_run(screen=True, rounds=1, first=(8, 0.0))
    assert rows[0]["arm_rank"] == 8 and control.reward_state.fastest_s == pytest.approx(9.0)
    asked = []
    choose = control.controller.choose
    control.controller.choose = lambda devices, server_round, avoid=None, exploit=False: (
        asked.append(avoid) or choose(devices, server_round, avoid, exploit)
    )  # type: ignore[method-assign]
    control.assign(np.array([0, 1]), 2, np.full(4, 8), _control(_scenario())[1])
    large = control.controller.point_ranks == 8
    assert asked[0][0, large].all() and not asked[0][0, ~large].any()  # client 0: rank 8 screened, rank 2 not
    assert not asked[0][1].any()  # client 1's fast link affords every arm


def test_fixed_is_never_screened_and_a_run_without_a_price_has_no_pace() -> None:
    assert not _control(_scenario(name="fixed"), _price)[0].screens
    assert not _control(_scenario())[0].screens
    assert _control(_scenario(), _price)[0].screens
    assert not _control(_scenario(screen=False), _price)[0].screens


def test_the_pace_is_saved_and_restored_with_the_controller(tmp_path: Path) -> None:
    control, _ = _paced_run(screen=True, rounds=2)
    control.save(tmp_path)
    fresh, _ = _control(_scenario(screen=True, ucb_c=0.3), _price)
    fresh.load(tmp_path)
    np.testing.assert_array_equal(fresh.pace.state(), control.pace.state())
    assert np.isfinite(fresh.pace.state()[:, :2]).all()


def test_the_servers_price_of_an_arm_falls_with_pruning_and_its_payload_grows_with_the_rank() -> None:
    from fedsim.fleet.costs import ModelShape, lora_params
    from fedsim.model.loader import load_model
    from fedsim.pruning.structure import geometry
    from fedsim.server.estimates import arm_price, cost_model

    base = load_model("tiny-llama")[0]
    scenario = _scenario()
    shape = ModelShape.from_model(base)
    price = arm_price(cost_model(shape, scenario), shape, geometry(base), scenario)
    (f_small, p_small), (f_big, p_big), (f_cut, p_cut) = price(2, 0.0), price(8, 0.0), price(2, 0.5)
    assert p_small == lora_params(shape, 2, scenario.lora.target_modules) and p_big == 4 * p_small
    assert f_big > f_small  # a larger adapter costs a little more compute
    assert (
        0.4 * f_small < f_cut < 0.8 * f_small and p_cut < p_small
    )  # half the structures gone: about half the work, a smaller up_proj adapter
    assert price(2, 0.5) is price(2, 0.5)  # priced once


def test_with_deploy_ratios_the_reward_credits_training_at_the_ratio_the_profile_deploys() -> None:
    scenario = _scenario(
        reward={
            "contribution_weight": 0.0,
            "loss_weight": 0.0,
            "prune_weight": 1.0,
            "deploy_weight": 1.0,
            "straggler": "none",
            "normalise": "none",
            "floor": 0.0,
        }
    )
    deploying = scenario.model_copy(
        update={"pruning": scenario.pruning.model_copy(update={"deploy_ratios": {"phone-highend": 0.5}})}
    )
    for s, expected in ((scenario, [0.5, 0.5]), (deploying, [0.0, 1.0])):
        control, book = _control(s)
        control.assign(np.array([0, 2]), 1, np.full(4, 8), book)
        control.arms = {
            0: (8, 0.5),
            2: (8, 0.5),
        }  # both pruned to 0.5: a laptop (deploys whole) and a phone (deploys at 0.5)
        rows = [{**_row(c), "device": str(build_fleet(s).device[c]), "prune_ratio": 0.5} for c in (0, 2)]
        control.observe(rows)
        assert [r["reward"] for r in rows] == pytest.approx(expected)


@pytest.mark.parametrize("commit", [1, 2, 0])
def test_the_runs_last_rounds_exploit_and_the_others_explore(commit: int) -> None:
    scenario = _scenario(commit_rounds=commit).model_copy(update={"rounds": 5})
    control, book = _control(scenario)
    asked = []
    choose = control.controller.choose
    control.controller.choose = lambda devices, server_round, avoid=None, exploit=False: (
        asked.append(exploit) or choose(devices, server_round, avoid, exploit)
    )  # type: ignore[method-assign]
    for server_round in range(1, 6):
        control.assign(np.array([0, 1]), server_round, np.full(4, 8), book)
        control.observe([_row(0), _row(1, after=1.5)])
    assert asked == [False] * (5 - commit) + [True] * commit


def test_with_an_energy_weight_the_client_that_spent_more_earns_less_and_without_it_the_same() -> None:
    rewards = {}
    for weight in (0.0, 0.5):
        control, book = _control(_scenario(reward={"energy_weight": weight}))
        control.assign(np.array([0, 1]), 1, np.full(4, 8), book)
        rows = [{**_row(0), "energy_j": 10.0}, {**_row(1), "energy_j": 30.0}]  # same progress and round time
        control.observe(rows)
        rewards[weight] = (rows[0]["reward"], rows[1]["reward"])
    assert rewards[0.0][0] == pytest.approx(rewards[0.0][1])
    assert rewards[0.5][0] > rewards[0.5][1]
