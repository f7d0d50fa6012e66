"""ComPEFT on the wire in a real federation: the bytes shrink, the model still learns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedsim.config.scenario import Scenario, load_scenario
from fedsim.model.adapter import attach_lora
from fedsim.model.loader import load_model
from fedsim.results.rundir import RunDir, read_metrics
from fedsim.runtime.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[3]


def run_tiny(tmp_path: Path, overrides: list[str]) -> tuple[pd.DataFrame, Scenario]:
    scenario = load_scenario(ROOT / "scenarios" / "tiny.toml", overrides)
    run_dir = RunDir.create(tmp_path, scenario)
    run_simulation(scenario, run_dir)
    return read_metrics(run_dir.path), scenario


def test_compeft_uplink_is_small_and_training_still_works(tmp_path: Path) -> None:
    overrides = [
        "rounds=3",
        "compression.method='compeft'",
        "compression.density=0.1",
        "compression.error_feedback=true",
        "compression.alpha=1.0",
    ]
    metrics, scenario = run_tiny(tmp_path, overrides)
    train = metrics[metrics["kind"] == "train"]
    assert (train["status"] == "ok").all()
    base, _ = load_model(scenario.model.name)
    lora = attach_lora(base, scenario.lora, 0)
    float32_bytes = 4 * sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert (train["bytes_up"] < float32_bytes / 8).all()  # ComPEFT d=0.1: ≥ 8× smaller than float32
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["loss"]
    assert central[3] < central[0] - 0.05


def test_server_picks_alpha_from_the_grid(tmp_path: Path) -> None:
    overrides = ["rounds=2", "clients.eval_per_round=0", "compression.method='compeft'", "compression.density=0.2",
                 "compression.alpha='auto'", "compression.alpha_grid=[0.25, 1.0, 4.0, 16.0]"]  # fmt: skip
    train = run_tiny(tmp_path, overrides)[0].query("kind == 'train' and status == 'ok'")
    assert set(train["alpha"]) <= {0.25, 1.0, 4.0, 16.0}
    assert train.groupby("round")["alpha"].nunique().eq(1).all()  # one α per round, for every update
    assert set(train["alpha"]) != {1.0}  # not simply the clients' α = 1: the grid was searched


def test_compressed_downlink_sends_deltas_after_the_first_round(tmp_path: Path) -> None:
    overrides = ["rounds=3", "clients.per_round=4", "clients.eval_per_round=0", "compression.method='compeft'",
                 "compression.density=0.1", "compression.downlink=true"]  # fmt: skip
    metrics, _ = run_tiny(tmp_path, overrides)
    train = metrics[metrics["kind"] == "train"]
    assert (train["status"] == "ok").all()
    down = train.groupby("round")["bytes_down"].max()
    assert down[2] * 4 < down[1] and down[3] * 4 < down[1]  # everyone in sync: compressed deltas
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["loss"]
    assert central[3] < central[0] - 0.05
