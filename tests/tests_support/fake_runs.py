"""Fake run directories for the dashboard tests, written with fedsim's own metrics schema.

Imported by the tests as `fake_runs` (a name no other test folder uses)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.results.rundir import metrics_frame

SCENARIO = """\
name = "{name}"
seed = 0
rounds = {rounds}

[model]
name = "tiny-llama"

[data]
task = "sentiment"

[strategy]
name = "{strategy}"
"""


def metrics(accuracies: Sequence[float], sim_time: bool = False) -> pd.DataFrame:
    """Rounds 0..len(accuracies)-1: central eval with `accuracies[k]` and loss 2.5 - 0.5k (floored
    at 1.25); from round 1, clients 0 and 1 train (mean loss 3.25 - 0.5k) and client 2 evaluates."""
    rows: list[dict[str, Any]] = []
    for k, accuracy in enumerate(accuracies):
        if k > 0:
            mean = 3.25 - 0.5 * k
            for client, loss in ((0, mean - 0.125), (1, mean + 0.125)):
                rows.append(
                    {"round": k, "client_id": client, "kind": "train", "num_examples": 16, "loss": loss, "tokens": 100}
                )
            rows.append(
                {"round": k, "client_id": 2, "kind": "eval_client", "num_examples": 8, "loss": 1.0, "accuracy": 0.5}
            )
        loss = max(2.5 - 0.5 * k, 1.25)
        rows.append(
            {
                "round": k,
                "client_id": -1,
                "kind": "eval_central",
                "num_examples": 32,
                "loss": loss,
                "accuracy": accuracy,
                "wall_time_s": 10.0 * k + 1.5,
            }
        )
    frame = metrics_frame(rows)
    if sim_time:  # runs without a fleet clock (older runs) have the column all-NaN
        frame["sim_time_s"] = frame["round"] * 60.0
    return frame


def write_run(
    root: Path,
    name: str,
    accuracies: Sequence[float],
    *,
    strategy: str = "fedit",
    sim_time: bool = False,
    scenario: str | None = None,
    events: Sequence[dict[str, Any]] = (),
) -> Path:
    """A run directory `root/name` as `fedsim run` leaves it (without checkpoints)."""
    path = root / name
    (path / "checkpoints").mkdir(parents=True)
    text = (
        scenario if scenario is not None else SCENARIO.format(name=name, rounds=len(accuracies) - 1, strategy=strategy)
    )
    (path / "scenario.toml").write_text(text)
    metrics(accuracies, sim_time).to_parquet(path / "metrics.parquet", index=False)
    lines = [{"time": 1_700_000_000.0 + i, **event} for i, event in enumerate(events)]
    (path / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
