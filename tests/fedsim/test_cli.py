"""The command line without running a federation: listings, help, and refusing bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub
import pandas as pd
import pytest

from fedsim.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from fedsim.config.scenario import load_scenario, scenario_toml
from fedsim.results.rundir import last_event

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


# --- user data and fleet files: read before the run directory is made -----------------------


def _rows(tmp: Path, name: str, rows: list[dict[str, object]]) -> Path:
    path = tmp / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def no_fields(tmp: Path) -> tuple[list[str], list[str]]:
    path = _rows(tmp, "foo.jsonl", [{"foo": i} for i in range(50)])
    return [f"data.task='{path}'"], [f"`data.task`: {path}: no prompt field", "no response field", "columns found: foo"]


def empty_file(tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "empty.jsonl"
    path.write_text("")
    return [f"data.task='{path}'"], [f"`data.task`: {path}: the file is empty"]


def garbled_csv(tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "garbled.csv"
    path.write_text('prompt,response\na,b\n"c,d\ne,f\n')  # a quote that never closes
    return [f"data.task='{path}'"], [f"could not read {path} as CSV: ParserError:", "EOF inside string"]


def garbled_parquet(tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "garbled.parquet"
    path.write_bytes(b"prompt,response\na,b\n")
    return [f"data.task='{path}'"], [f"`data.task`: {path}: not a Parquet file"]


def truncated_parquet(tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "truncated.parquet"
    pd.DataFrame({"prompt": ["p"] * 50, "response": ["r"] * 50}).to_parquet(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:4] + b"x" * 40 + whole[-8:])  # right magic bytes, a footer pointing nowhere
    return [f"data.task='{path}'"], [f"could not read {path} as Parquet: ArrowInvalid:"]


def too_few_rows(tmp: Path) -> tuple[list[str], list[str]]:
    path = _rows(tmp, "few.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(10)])
    return [f"data.task='{path}'"], [
        "only 0 examples are left for the clients, fewer than num_clients=4",
        f"{path} gave 10 usable examples",
        "at least 36 are needed (32 held out + one per client)",
    ]


def malformed_trace_row(tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "trace.csv"
    path.write_text(
        "client_id,profile,windows\n0,laptop-cpu,0-100\n1,laptop-cpu,0-100\n2,laptop-cpu,later\n3,laptop-cpu,\n"
    )
    return [f"fleet.trace='{path}'"], [f"`fleet.trace`: {path}: line 4: window 'later' must look like start-end"]


def malformed_profile(tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "profiles.toml"
    path.write_text("[board]\ntrain_tflops = 1.0\nmemory_gb = 4.0\nuplink_mbps = 'fast'\ndownlink_mbps = 10.0\n")
    return [f"fleet.profiles_file='{path}'"], [f"`fleet.profiles_file`: {path}: `board.uplink_mbps` must be"]


def hf_not_cached(tmp: Path) -> tuple[list[str], list[str]]:
    return ["data.task='hf:fedsim-test/absent'"], [
        "`data.task`: Hugging Face dataset 'fedsim-test/absent' is not in the local cache",
        "offline mode is on (HF_HUB_OFFLINE)",
    ]


MALFORMED = [no_fields, empty_file, garbled_csv, garbled_parquet, truncated_parquet, too_few_rows,
             malformed_trace_row, malformed_profile, hf_not_cached]  # fmt: skip


@pytest.mark.parametrize("make", MALFORMED, ids=[m.__name__ for m in MALFORMED])
def test_malformed_input_exits_2_names_the_file_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path], tuple[list[str], list[str]]],
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # not ~/.cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    overrides, messages = make(tmp_path)
    out = tmp_path / "runs"

    code = main(["run", str(TINY), "--out", str(out), *[arg for o in overrides for arg in ("--set", o)]])

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert f"fedsim: scenario {TINY} has " in err  # (after datasets' progress bar: imported before main here)
    for message in messages:
        assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_resume_of_a_run_whose_data_broke_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = _rows(tmp_path, "d.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(100)])
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "scenario.toml").write_text(scenario_toml(load_scenario(TINY, [f"data.task='{data}'"])))
    (run / "metrics.parquet").write_bytes(b"")
    data.write_text("")  # emptied since
    before = sorted(p.name for p in run.iterdir())

    assert main(["resume", str(run)]) == EXIT_BAD_INPUT

    assert f"`data.task`: {data}: the file is empty" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


# --- a run that fails while running: one line, the traceback in its log ---------------------


def _crash(scenario: object, run_dir: object, **kwargs: object) -> None:
    raise RuntimeError("the server fell over\nwhile starting")


def test_a_failing_run_prints_one_line_and_logs_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedsim.runtime.simulation

    monkeypatch.setattr(fedsim.runtime.simulation, "run_simulation", _crash)  # fails where the server would start
    out = tmp_path / "runs"

    assert main(["run", str(TINY), "--out", str(out)]) == EXIT_FAILED

    log = out / "tiny" / "error.log"
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"fedsim: run tiny failed: RuntimeError: the server fell over while starting (traceback in {log})"
    ]
    text = log.read_text()
    assert text.startswith("=== ") and "Traceback (most recent call last):" in text
    assert "in _crash" in text and text.rstrip().endswith("RuntimeError: the server fell over\nwhile starting")
    event = last_event(out / "tiny")
    assert event["event"] == "run_failed" and event["log"] == "error.log"
    assert "fell over" in event["error"]


def test_ctrl_c_is_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsim.runtime.simulation

    def interrupted(scenario: object, run_dir: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fedsim.runtime.simulation, "run_simulation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(TINY), "--out", str(tmp_path / "runs")])
