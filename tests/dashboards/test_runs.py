"""Run directories under a root: strict name resolution at any depth, per-round tables, status,
damaged runs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from tests_support.fake_runs import fleet_metrics, metrics, write_run

from dashboards.runs import (
    STALE_S,
    RunNotFoundError,
    comparisons,
    is_comparison,
    list_runs,
    load_run,
    per_round,
    read_events,
    resolve_run,
    run_names,
    run_status,
    runs_in,
    summary,
)
from fedsim.results.report import round_table

REAL = Path(__file__).with_name("data") / "fedspine-tiny"


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/../b", "a//b", "/etc", "a\\b", "a\0b", "x" * 300, "missing", "a/b/c/d/e"]
)
def test_resolve_run_rejects_names_that_are_not_a_run_under_the_root(tmp_path: Path, name: str) -> None:
    write_run(tmp_path, "a/b", [0.5])

    with pytest.raises(RunNotFoundError):
        resolve_run(tmp_path, name)


def test_runs_are_found_at_any_depth_but_not_through_symlinks_or_inside_runs(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_run(root, "plain", [0.5])
    write_run(root, "tiny-compare/fedit-seed0", [0.5])
    write_run(root, "tiny-compare/fedit-seed1", [0.5])
    write_run(root, "plain/export/inner", [0.5])  # inside a run: not a run of its own
    write_run(outside, "elsewhere", [0.5])
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "tiny-compare" / "linked").symlink_to(outside / "elsewhere", target_is_directory=True)

    assert run_names(root) == ["plain", "tiny-compare/fedit-seed0", "tiny-compare/fedit-seed1"]
    assert resolve_run(root, "tiny-compare/fedit-seed1") == root / "tiny-compare" / "fedit-seed1"
    for name in ("escape/elsewhere", "tiny-compare/linked"):
        with pytest.raises(RunNotFoundError):
            resolve_run(root, name)


def test_the_root_itself_can_be_a_run(tmp_path: Path) -> None:
    path = write_run(tmp_path, "only", [0.5, 0.75])

    assert run_names(path) == ["."] and summary(load_run(path, "."))["final_accuracy"] == 0.75


def test_compare_folders_are_comparisons(tmp_path: Path) -> None:
    write_run(tmp_path, "tiny-compare/fedit-seed0", [0.5])
    write_run(tmp_path, "tiny-compare/flexlora-seed0", [0.5])
    write_run(tmp_path, "sweep/a", [0.5])
    (tmp_path / "sweep" / "comparison.csv").write_text("strategy,metric\n")
    write_run(tmp_path, "folder/b", [0.5])

    assert comparisons(tmp_path) == ["sweep", "tiny-compare"]
    assert runs_in(tmp_path, "tiny-compare") == ["tiny-compare/fedit-seed0", "tiny-compare/flexlora-seed0"]
    assert is_comparison(tmp_path / "sweep") and not is_comparison(tmp_path / "folder")


def test_per_round_is_round_table_with_the_sim_time_at_the_rounds_end() -> None:
    frame = metrics([0.1, 0.2, 0.3], sim_time=True)
    frame.loc[frame["kind"] == "eval_central", "sim_time_s"] += 5.0  # the round ends after its clients

    table = per_round(frame)

    assert table.equals(round_table(frame))
    assert table["sim_time_s"].tolist() == [5.0, 65.0, 125.0]


def test_per_round_carries_other_server_columns_such_as_a_privacy_budget() -> None:
    table = per_round(fleet_metrics([0.1, 0.2, 0.3], dp=True))

    assert table["dp_epsilon"].tolist() == [0.0, 0.5, 1.0]
    assert table.drop(columns="dp_epsilon").equals(round_table(fleet_metrics([0.1, 0.2, 0.3])))


def test_a_real_run_is_summarised(tmp_path: Path) -> None:
    shutil.copytree(REAL, tmp_path / "fedspine-tiny")

    s = summary(load_run(tmp_path, "fedspine-tiny"))

    assert s["status"] == "finished" and (s["rounds_done"], s["rounds_planned"]) == (4, 4)
    assert s["strategy"] == "fedit" and s["model"] == "tiny-llama" and s["seed"] == 0
    table = round_table(load_run(tmp_path, "fedspine-tiny").metrics)  # type: ignore[arg-type]
    assert s["bytes_up"] == table["bytes_up"].sum() and s["sim_time_s"] == table["sim_time_s"].iloc[-1]


@pytest.mark.parametrize(
    ("events", "age_s", "status"),
    [
        ([{"event": "run_start"}, {"event": "run_end"}], 0, "finished"),
        ([{"event": "run_start"}, {"event": "run_failed"}], 0, "failed"),
        ([{"event": "run_start"}, {"event": "round_end"}], 0, "running"),
        ([{"event": "run_start"}, {"event": "round_end"}], STALE_S + 1, "stopped"),
        ([{"event": "run_end"}, {"event": "run_resumed"}], 0, "running"),  # `fedsim resume` went on
        ([], 0, "running"),
    ],
)
def test_status_is_read_from_the_events(
    tmp_path: Path, events: list[dict[str, str]], age_s: float, status: str
) -> None:
    path = write_run(tmp_path, "r", [0.5], events=events, status="running")
    then = time.time() - age_s
    for p in [path, *path.iterdir()]:
        os.utime(p, (then, then))

    assert run_status(path, then) == status and load_run(tmp_path, "r").status == status


def test_a_run_without_metrics_yet_is_listed_with_the_reason(tmp_path: Path) -> None:
    write_run(tmp_path, "starting", [0.5]).joinpath("metrics.parquet").unlink()

    (run,) = list_runs(tmp_path)

    assert run.table is None and run.errors == ("no metrics.parquet yet",)
    assert summary(run)["final_accuracy"] is None and summary(run)["model"] == "tiny-llama"


def test_a_changed_run_is_read_again(tmp_path: Path) -> None:
    path = write_run(tmp_path, "r", [0.5, 0.625], status="running")
    before = load_run(tmp_path, "r")

    metrics([0.5, 0.625, 0.75]).to_parquet(path / "metrics.parquet", index=False)

    assert load_run(tmp_path, "r") is not before and summary(load_run(tmp_path, "r"))["final_accuracy"] == 0.75


def test_read_events_keeps_the_last_ones_and_survives_bad_lines(tmp_path: Path) -> None:
    path = write_run(tmp_path, "r", [0.5], events=[{"event": f"e{i}"} for i in range(30)], status="running")
    with open(path / "events.jsonl", "a") as fh:
        fh.write("{not json\n")

    events = read_events(load_run(tmp_path, "r"), last=3)

    assert [e["event"] for e in events] == ["e28", "e29", "unparseable"]
    assert events[-1]["line"] == "{not json"
