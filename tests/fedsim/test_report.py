"""The run summary names the clock the run used."""

from __future__ import annotations

from pathlib import Path

from fedsim.report import _clock


def test_the_summary_says_measured_time_for_a_deployment(tmp_path: Path) -> None:
    assert _clock(tmp_path) == "simulated"  # no resolved scenario: the default
    (tmp_path / "scenario.toml").write_text('[fleet]\nclock = "measured"\n')
    assert _clock(tmp_path) == "measured"
    (tmp_path / "scenario.toml").write_text('[fleet]\nclock = "simulated"\n')
    assert _clock(tmp_path) == "simulated"
