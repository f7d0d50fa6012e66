"""Runs grouped over seeds: curves with t bands, final tables, time to target, scenario differences,
each against a direct computation or fedsim's own comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from tests_support.fake_runs import write_run

from dashboards.groups import final_table, group_curve, group_runs, scenario_differences, time_to_target
from dashboards.runs import list_runs, load_run
from fedsim.config.scenario import Scenario, StrategyConfig
from fedsim.results.comparison import comparison, read_results

ACCURACIES = {  # (strategy, seed) → central accuracy per round
    ("fedit", 0): [0.25, 0.5, 0.625],
    ("fedit", 1): [0.25, 0.375, 0.75],
    ("flexlora", 0): [0.25, 0.5, 0.75],
    ("flexlora", 1): [0.25, 0.625, 0.875],
}


@pytest.fixture
def compare_folder(tmp_path: Path) -> Path:
    for (strategy, seed), accuracies in ACCURACIES.items():
        write_run(tmp_path, f"tiny-compare/{strategy}-seed{seed}", accuracies, strategy=strategy, seed=seed, fleet=True)
    return tmp_path


def test_runs_differing_only_by_seed_are_one_group_named_by_what_differs(compare_folder: Path) -> None:
    groups = group_runs(sorted(list_runs(compare_folder), key=lambda r: r.name))

    assert {k: [r.name for r in v] for k, v in groups.items()} == {
        "fedit": ["tiny-compare/fedit-seed0", "tiny-compare/fedit-seed1"],
        "flexlora": ["tiny-compare/flexlora-seed0", "tiny-compare/flexlora-seed1"],
    }


def test_group_curve_is_the_mean_and_t_interval_over_seeds(compare_folder: Path) -> None:
    runs = [load_run(compare_folder, f"tiny-compare/flexlora-seed{s}") for s in (0, 1)]

    curve = group_curve(runs, "central_accuracy", "sim_time_s")

    values = np.array([ACCURACIES["flexlora", 0], ACCURACIES["flexlora", 1]])
    mean, sem = values.mean(axis=0), values.std(axis=0, ddof=1) / np.sqrt(2)
    half = stats.t.ppf(0.975, 1) * sem
    np.testing.assert_allclose(curve["mean"], mean)
    np.testing.assert_allclose(curve["hi"].to_numpy()[1:], (mean + half)[1:])
    assert curve["n"].tolist() == [2, 2, 2]
    sim = np.mean([r.table["sim_time_s"].to_numpy() for r in runs], axis=0)  # type: ignore[union-attr]
    np.testing.assert_allclose(curve["x"], sim)


def test_final_table_is_fedsims_comparison_of_the_same_runs(compare_folder: Path) -> None:
    groups = group_runs(list_runs(compare_folder))

    table, notes = final_table(groups, target=0.6, baseline="fedit")

    scenarios = [
        Scenario.model_construct(name=f"{s}-seed{seed}", seed=seed, strategy=StrategyConfig.model_construct(name=s))
        for s, seed in ACCURACIES
    ]
    expected = comparison(read_results(scenarios, compare_folder / "tiny-compare", 0.6), "fedit")
    key = ["strategy", "metric"]
    assert notes == []
    assert table.sort_values(key).reset_index(drop=True).equals(expected.sort_values(key).reset_index(drop=True))


def test_a_run_without_rounds_is_left_out_of_the_final_table_with_a_note(compare_folder: Path) -> None:
    (compare_folder / "tiny-compare" / "fedit-seed1" / "metrics.parquet").write_bytes(b"not parquet")
    groups = group_runs(list_runs(compare_folder))

    table, notes = final_table(groups, target=0.6, baseline="fedit")

    assert len(notes) == 1 and notes[0].startswith("tiny-compare/fedit-seed1: left out")
    assert table.set_index(["strategy", "metric"]).loc[("fedit", "central_accuracy"), "n"] == 1


def test_time_to_target_counts_the_runs_that_reached_it(compare_folder: Path) -> None:
    groups = group_runs(sorted(list_runs(compare_folder), key=lambda r: r.name))

    frame = time_to_target(groups, 0.7).set_index("group")

    assert frame.loc["fedit", ["reached", "runs"]].tolist() == [1, 2] and frame.loc["fedit", "round"] == 2
    assert frame.loc["flexlora", "reached"] == 2 and frame.loc["flexlora", "round"] == 2


def test_scenario_differences_list_only_the_settings_that_differ(compare_folder: Path) -> None:
    runs = [load_run(compare_folder, f"tiny-compare/{name}") for name in ("fedit-seed0", "flexlora-seed1")]

    diff = scenario_differences(runs)

    assert diff.to_dict("index") == {
        "seed": {"tiny-compare/fedit-seed0": "0", "tiny-compare/flexlora-seed1": "1"},
        "strategy.name": {"tiny-compare/fedit-seed0": "fedit", "tiny-compare/flexlora-seed1": "flexlora"},
    }
