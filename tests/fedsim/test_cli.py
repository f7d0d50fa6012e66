"""The command line without running a federation: listings, help, and refusing bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "scenarios" / "tiny.toml"


def test_help_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("run", "report", "dashboard", "models", "tasks"):
        assert command in out
    assert "fedsim run scenarios/quickstart.toml" in out


def test_models_and_tasks_listings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-llama" in out
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for task in ("arithmetic", "strings", "units", "sentiment", "mixed"):
        assert task in out


BAD = [
    ("unknown key", "[train]\nlearnin_rate = 1\n", "`train.learnin_rate` is not a known key"),
    ("wrong type", "rounds = 'three'\n", "`rounds` must be a valid integer"),
    ("out of range", "[lora]\nrank = 0\n", "`lora.rank` must be greater than or equal to 1"),
    ("missing file", "[data]\ntask = 'absent.jsonl'\n", "file not found"),
    ("unknown model", "[model]\nname = 'nope'\n", "unknown model 'nope'"),
    ("unknown task", "[data]\ntask = 'nope'\n", "unknown task 'nope'"),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_scenario_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str, message: str
) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text(text)
    out = tmp_path / "runs"
    assert main(["run", str(scenario), "--out", str(out)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_override_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert (
        main(["run", str(TINY), "--out", str(out), "--set", "train.lr=-1", "--set", "clients.per_round=9"])
        == EXIT_BAD_INPUT
    )
    err = capsys.readouterr().err
    assert "`train.lr` must be greater than 0, got -1" in err
    assert "`clients.per_round` must be <= clients.num_clients (4), got 9" in err
    assert not out.exists()


def test_existing_run_directory_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "runs" / "tiny"
    existing.mkdir(parents=True)
    (existing / "metrics.parquet").write_bytes(b"precious")
    assert main(["run", str(TINY), "--out", str(tmp_path / "runs")]) == EXIT_BAD_INPUT
    assert "already exists" in capsys.readouterr().err
    assert (existing / "metrics.parquet").read_bytes() == b"precious"


def test_report_on_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "not a fedsim run directory" in capsys.readouterr().err
