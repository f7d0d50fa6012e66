"""Run directories under a root: strict name resolution, per-round tables, damaged runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests_support.fake_runs import metrics, write_run

from dashboards.runs import RunNotFoundError, list_runs, load_run, per_round, read_events, resolve_run, summary
from fedsim.results.report import round_table


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc", "a\\b", "a\0b", "x" * 300, "missing"])
def test_resolve_run_rejects_names_that_are_not_a_run_under_the_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(RunNotFoundError):
        resolve_run(tmp_path, name)


def test_per_round_is_round_table_with_the_sim_time_at_the_rounds_end() -> None:
    frame = metrics([0.1, 0.2, 0.3], sim_time=True)
    frame.loc[frame["kind"] == "eval_central", "sim_time_s"] += 5.0  # the round ends after its clients

    table = per_round(frame)

    assert table.equals(round_table(frame))
    assert table["sim_time_s"].tolist() == [5.0, 65.0, 125.0]


def test_a_run_without_metrics_yet_is_listed_with_the_reason(tmp_path: Path) -> None:
    write_run(tmp_path, "starting", [0.5]).joinpath("metrics.parquet").unlink()

    (run,) = list_runs(tmp_path)

    assert run.table is None and run.errors == ("no metrics.parquet yet",)
    assert summary(run)["final_accuracy"] is None and summary(run)["model"] == "tiny-llama"


def test_read_events_keeps_the_last_ones_and_survives_bad_lines(tmp_path: Path) -> None:
    path = write_run(tmp_path, "r", [0.5], events=[{"event": f"e{i}"} for i in range(30)])
    with open(path / "events.jsonl", "a") as fh:
        fh.write("{not json\n")

    events = read_events(load_run(tmp_path, "r"), last=3)

    assert [e["event"] for e in events] == ["e28", "e29", "unparseable"]
    assert events[-1]["line"] == "{not json"
