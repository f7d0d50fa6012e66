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
seed = {seed}
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


DEVICES = ("jetson-tx2", "jetson-xavier-nx", "jetson-agx-orin")  # client c is DEVICES[c % 3]
END = {"finished": [{"event": "run_end"}], "failed": [{"event": "run_failed", "error": "RuntimeError('boom')"}]}


def fleet_metrics(accuracies: Sequence[float], clients: int = 6, dp: bool = False) -> pd.DataFrame:
    """`metrics(accuracies, sim_time=True)` plus a fleet: in round k ≥ 1, clients (k + j) % clients
    for j < 4 train, the last of them a straggler in even rounds; client c is a DEVICES[c % 3] with
    LoRA rank (4, 8, 16)[c % 3], pruning ratio (0.2, 0, 0)[c % 3] (its arm), reward 0.1·(c + 1),
    16 KiB up and 32 KiB down per unit of rank/4, 2 GFLOP, compute (4, 2, 1)[c % 3] ms and 6 ms
    of communication; a round lasts its slowest kept client. Deployed accuracy is the central one
    minus 0.125; the last round adds eval_export rows for ratios 0 and 0.2. With `dp`, the server
    rows carry `dp_epsilon` = 0.5·k."""
    rows: list[dict[str, Any]] = []
    sim = 0.0
    for k, accuracy in enumerate(accuracies):
        kept = []
        for j in range(4 if k else 0):
            c = (k + j) % clients
            straggler = j == 3 and k % 2 == 0
            rank, ratio, compute = (4, 8, 16)[c % 3], (0.2, 0.0, 0.0)[c % 3], (0.004, 0.002, 0.001)[c % 3]
            kept += [] if straggler else [compute + 0.006]
            rows.append({
                "round": k, "client_id": c, "kind": "train", "status": "straggler" if straggler else "ok",
                "num_examples": 16, "loss": 3.0 - 0.25 * k, "tokens": 100, "device": DEVICES[c % 3],
                "lora_rank": rank, "rank_kept": rank, "flops": 2e9, "sim_compute_s": compute, "sim_comm_s": 0.006,
                "bytes_up": 16384 * rank // 4, "bytes_down": 32768 * rank // 4, "prune_target": ratio,
                "prune_ratio": ratio, "arm_rank": rank, "arm_ratio": ratio, "reward": 0.1 * (c + 1),
                "reason": "not among the first 3 to finish (over-commitment)" if straggler else "",
            })  # fmt: skip
        sim += max(kept, default=0.0)
        if k:
            rows.append({"round": k, "client_id": 0, "kind": "eval_client", "num_examples": 8, "loss": 1.0,
                         "accuracy": 0.5, "device": DEVICES[0], "lora_rank": 4})  # fmt: skip
        rows.append({
            "round": k, "client_id": -1, "kind": "eval_central", "num_examples": 32, "loss": max(2.5 - 0.5 * k, 1.25),
            "accuracy": accuracy, "wall_time_s": 10.0 * k + 1.5, "sim_time_s": sim,
            "deployed_accuracy": accuracy - 0.125, "deployed_loss": max(2.5 - 0.5 * k, 1.25) + 0.25,
            "aggregation_bias": 0.01 * k,
        })  # fmt: skip
    last = len(accuracies) - 1
    for ratio in (0.0, 0.2):
        rows.append({"round": last, "client_id": -1, "kind": "eval_export", "num_examples": 32, "loss": 1.5 + ratio,
                     "accuracy": accuracies[-1] - ratio, "prune_target": ratio, "prune_ratio": ratio})  # fmt: skip
    frame = metrics_frame(rows)
    if dp:  # a column fedsim may add later: the dashboard shows any numeric server column
        frame["dp_epsilon"] = (0.5 * frame["round"]).where(frame["kind"] == "eval_central")
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
    seed: int = 0,
    fleet: bool = False,
    dp: bool = False,
    status: str = "finished",
) -> Path:
    """A run directory `root/name` (`name` may hold "/": a run in a subfolder) as `fedsim run` leaves
    it, without checkpoints: metrics from `metrics` (or `fleet_metrics` with `fleet`), `events`
    then, unless `status` is "running", a `run_end` ("finished") or `run_failed` ("failed") event."""
    path = root / name
    (path / "checkpoints").mkdir(parents=True)
    rounds = len(accuracies) - 1
    text = (
        scenario
        if scenario is not None
        else SCENARIO.format(name=path.name, rounds=rounds, strategy=strategy, seed=seed)
    )
    (path / "scenario.toml").write_text(text)
    frame = fleet_metrics(accuracies, dp=dp) if fleet else metrics(accuracies, sim_time)
    frame.to_parquet(path / "metrics.parquet", index=False)
    lines = [{"time": 1_700_000_000.0 + i, **event} for i, event in enumerate([*events, *END.get(status, [])])]
    (path / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def append_round(path: Path, accuracy: float) -> None:
    """One more round of a `fleet_metrics` run in progress: its rows and its round_end event."""
    old = pd.read_parquet(path / "metrics.parquet")
    central = old[old["kind"] == "eval_central"].sort_values("round")["accuracy"].tolist()
    frame = fleet_metrics([*central, accuracy])
    frame.to_parquet(path / "metrics.parquet.tmp", index=False)
    (path / "metrics.parquet.tmp").replace(path / "metrics.parquet")
    with open(path / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"time": 1_700_000_100.0, "event": "round_end", "round": len(central)}) + "\n")
