"""`fedsim compare`: a run per strategy and seed, a table and plots, resumable between runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedsim.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "scenarios" / "tiny.toml")
SETS = ["--set", "rounds=2", "--set", "clients.eval_per_round=0"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_unknown_strategy_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", TINY, "--strategies", "fedit,fedmagic", "--out", str(tmp_path)])
    assert code == EXIT_BAD_INPUT
    assert "unknown strategy 'fedmagic'; known: fedadagrad, fedadam" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_compare_writes_table_and_plots_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", TINY, "--strategies", "fedit,fedadam", "--out", str(tmp_path), "--target", "0.0", *SETS]
    assert main(args) == 0
    root = tmp_path / "tiny-compare"
    table = pd.read_csv(root / "comparison.csv", index_col="strategy")
    assert list(table.index) == ["fedit", "fedadam"]
    assert (table["seeds"] == 1).all() and (table["runs_reaching_target"] == 1).all()
    assert (table["bytes_up"] > 0).all()
    assert table.loc["fedit", "final_accuracy_mean"] >= 0.0
    assert "| fedit |" in (root / "comparison.md").read_text()
    for plot in ("accuracy_vs_round.png", "accuracy_vs_sim_time.png"):
        assert (root / plot).read_bytes().startswith(PNG)
    capsys.readouterr()

    # interrupted: fedadam's run lost its end; only it runs again
    events = root / "fedadam-seed0" / "events.jsonl"
    events.write_text("\n".join(events.read_text().splitlines()[:-1]) + "\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fedit-seed0: done already, kept" in out
    assert "fedadam-seed0: interrupted earlier, running it again" in out
    again = pd.read_csv(root / "comparison.csv", index_col="strategy")
    pd.testing.assert_series_equal(again["final_accuracy_mean"], table["final_accuracy_mean"])  # same seed, same result
