"""The run summary names the clock the run used."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.results.report import _clock


def test_the_summary_says_measured_time_for_a_deployment(tmp_path: Path) -> None:
    assert _clock(tmp_path) == "simulated"  # no resolved scenario: the default
    (tmp_path / "scenario.toml").write_text('[fleet]\nclock = "measured"\n')
    assert _clock(tmp_path) == "measured"
    (tmp_path / "scenario.toml").write_text('[fleet]\nclock = "simulated"\n')
    assert _clock(tmp_path) == "simulated"


def test_deployed_columns_appear_only_for_runs_that_deploy_cut_models(tmp_path: Path) -> None:
    from fedsim.config.scenario import validate_scenario
    from fedsim.results.report import round_table, summary_text
    from fedsim.results.rundir import RunDir, read_metrics

    rows = [
        {
            "round": r,
            "client_id": -1,
            "kind": "eval_central",
            "loss": 2.0 - r,
            "accuracy": 0.1 * r,
            "wall_time_s": 1.0,
            "sim_time_s": float(r),
        }
        for r in (0, 1)
    ]
    plain, deploying = (RunDir.create(tmp_path, validate_scenario({"name": name})) for name in ("plain", "deploying"))
    plain.add_rows(rows)
    deploying.add_rows(
        [{**row, "deployed_loss": 3.0 - row["round"], "deployed_accuracy": 0.05 * row["round"]} for row in rows]
    )
    assert "deployed_loss" not in round_table(read_metrics(plain.path))
    assert "deployed models" not in summary_text(read_metrics(plain.path), plain.path)
    assert round_table(read_metrics(deploying.path))["deployed_loss"].tolist() == [3.0, 2.0]
    assert "deployed models   loss 3.0000 -> 2.0000, accuracy 0.050" in summary_text(
        read_metrics(deploying.path), deploying.path
    )


def test_the_summary_says_how_many_held_out_examples_each_round_scored(tmp_path: Path) -> None:
    from fedsim.config.scenario import validate_scenario
    from fedsim.results.report import summary_text
    from fedsim.results.rundir import RunDir, read_metrics

    def rows(counts: list[int]) -> list[dict]:
        return [
            {
                "round": r,
                "client_id": -1,
                "kind": "eval_central",
                "num_examples": n,
                "loss": 1.0,
                "accuracy": 0.1,
                "wall_time_s": 1.0,
                "sim_time_s": 1.0,
            }
            for r, n in enumerate(counts)
        ]

    same, more = (RunDir.create(tmp_path, validate_scenario({"name": name})) for name in ("same", "more"))
    same.add_rows(rows([32, 32, 32]))
    more.add_rows(rows([48, 48, 256]))
    assert "held-out examples 32 each round" in summary_text(read_metrics(same.path), same.path)
    assert "held-out examples 48 in rounds 0-1, 256 in round 2" in summary_text(read_metrics(more.path), more.path)


def test_a_private_run_shows_the_epsilon_it_spent_and_an_adaptive_one_its_clip(tmp_path: Path) -> None:
    from fedsim.config.scenario import validate_scenario
    from fedsim.results.report import round_table, summary_text
    from fedsim.results.rundir import RunDir, read_metrics

    rows = [
        {"round": r, "client_id": -1, "kind": "eval_central", "loss": 1.0, "accuracy": 0.5, "wall_time_s": 1.0,
         "sim_time_s": float(r), "dp_epsilon": 0.5 * r, **({"dp_clip": 1.0} if r else {})}
        for r in (0, 1, 2)
    ]  # fmt: skip
    fixed, adaptive = (RunDir.create(tmp_path, validate_scenario({"name": n})) for n in ("fixed", "adaptive"))
    fixed.add_rows(rows)
    fixed.event("privacy", mode="central", delta=0.001)
    adaptive.add_rows([{**r, "dp_unclipped": 0.4} if r["round"] else r for r in rows])

    table = round_table(read_metrics(fixed.path))
    assert table["dp_epsilon"].tolist() == [0.0, 0.5, 1.0] and "dp_clip" not in table
    assert "privacy           central DP, ε = 1 at δ = 0.001 after round 2" in summary_text(
        read_metrics(fixed.path), fixed.path
    )
    assert {"dp_clip", "dp_unclipped"} <= set(round_table(read_metrics(adaptive.path)))
    plain = RunDir.create(tmp_path, validate_scenario({"name": "plain"}))
    plain.add_rows([{k: v for k, v in r.items() if not k.startswith("dp_")} for r in rows])
    assert "dp_epsilon" not in round_table(read_metrics(plain.path))
    assert "privacy" not in summary_text(read_metrics(plain.path), plain.path)


def test_energy_to_a_target_is_shown_beside_simulated_time_and_unknown_energy_as_n_a(tmp_path: Path) -> None:
    import math

    from fedsim.config.scenario import validate_scenario
    from fedsim.results.report import Reached, round_table, summary_text, target_line, time_to_accuracy
    from fedsim.results.rundir import RunDir, read_metrics

    rows = [
        {"round": r, "client_id": -1, "kind": "eval_central", "loss": 1.0, "accuracy": 0.2 * r, "wall_time_s": 1.0,
         "sim_time_s": 60.0 * r, "energy_j": 1500.0 if r else 0.0, "sim_energy_j": 1500.0 * r}
        for r in (0, 1, 2)
    ]  # fmt: skip
    known, unknown = (RunDir.create(tmp_path, validate_scenario({"name": n})) for n in ("known", "unknown"))
    known.add_rows(rows)
    unknown.add_rows([{**r, "energy_j": math.nan, "sim_energy_j": math.nan} if r["round"] else r for r in rows])

    metrics = read_metrics(known.path)
    assert round_table(metrics)[["energy_j", "sim_energy_j"]].values.tolist() == [[0, 0], [1500, 1500], [1500, 3000]]
    assert time_to_accuracy(metrics, 0.4) == Reached(2, 120.0, 3000.0)
    assert target_line(metrics, 0.4) == "time to accuracy 0.4: round 2, 120.0s simulated, 3 kJ spent"
    assert target_line(metrics, 0.9) == "time to accuracy 0.9: not reached"
    assert "energy            3 kJ on the fleet" in summary_text(metrics, known.path)
    lost = read_metrics(unknown.path)
    assert target_line(lost, 0.4) == "time to accuracy 0.4: round 2, 120.0s simulated, n/a spent"
    assert "energy            n/a on the fleet" in summary_text(lost, unknown.path)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0, "0 J"), (12.345, "12.3 J"), (1500.0, "1.5 kJ"), (2.5e6, "2.5 MJ"), (7e9, "7 GJ"), (float("nan"), "n/a")],
)
def test_joules_read_in_si_units_and_unknown_is_n_a(value: float, text: str) -> None:
    from fedsim.results.report import joules

    assert joules(value) == text
