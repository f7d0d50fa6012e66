"""Going on with a run that stopped — killed, failed, or finished and asked for more rounds —
from its last complete round (`fedsim resume RUN_DIR [--rounds N]`).

A round k is complete when its metric rows are written and its checkpoint holds everything the
next round starts from: the global state (adapter and base deltas), and, when the run has them,
each client's pruning record (`keeps.json`) and the controller's state (`controller.npz`). The
strategy's state across rounds (`strategy.npz`, `LoraStrategy.state_dict`: a server optimiser's
moments, fedadam, fedyogi, fedadagrad, fedavgm) is in it too, and put back; a checkpoint from
before fedsim saved it has none, and such a run resumes with fresh moments. The ranks HetLoRA
clients kept when they self-pruned are rebuilt from the metric rows (`rank_kept`,
`fedsim.fleet.ranks.kept_ranks`). With privacy on, the accountant's rounds and the adaptive clip
(`privacy.json`, `fedsim.privacy.PrivacyBook`) are put back, so the run goes on spending the same
budget; a checkpoint kept under another mechanism (say a calibrated noise multiplier that more
rounds would change) is refused before anything runs. The run goes on from there with the same
seeds, so sampling, training batches, availability and the DP noise are those of an uninterrupted run.
The fleet's energy so far is taken up from the round's central row (`sim_energy_j`, as simulated time
from `sim_time_s`), and with `fleet.batteries` each device's charge from the checkpoint
(`batteries.npz`, `fedsim.fleet.energy.Batteries`), so a drained phone stays out as it would have.

What lived only in the clients' processes is not in a checkpoint and starts afresh: the clients'
error-feedback residuals and personal B factors (fedsa_lora), and the downlink's copies (every
client receives the whole adapter once). A resumed run with any of these, or with a server
optimiser and an old checkpoint, differs from an uninterrupted one; the `run_resumed` event lists
which.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.config.names import SERVER_OPTIMIZERS
from fedsim.config.scenario import Scenario
from fedsim.fleet.ranks import kept_ranks
from fedsim.model.adapter import AdapterState, load_adapter_state
from fedsim.privacy import PrivacyBook
from fedsim.results.rundir import (
    BATTERIES_FILE,
    KEEPS_FILE,
    PRIVACY_FILE,
    STRATEGY_FILE,
    RunDir,
    load_arrays,
    read_metrics,
)
from fedsim.server.control import STATE_FILE


@dataclass(frozen=True)
class ResumePoint:
    """Where a run goes on from: after round `server_round`."""

    server_round: int
    state: AdapterState
    sim_time: float
    wall_time: float  # the run's wall time at the end of that round
    keeps: str  # PruneBook JSON at that round ("" when the run does not prune)
    checkpoint: Path  # the round's checkpoint folder (controller state)
    lost: tuple[str, ...]  # what a process held that this resume cannot restore
    kept_ranks: dict[int, int] = field(default_factory=dict)  # client id → rank kept when it last self-pruned (HetLoRA)
    strategy: dict[str, np.ndarray] | None = None  # the strategy's `state_dict` then (None: an old checkpoint)
    privacy: dict[str, Any] | None = None  # the `PrivacyBook`'s state then (None: privacy off)
    sim_energy: float = math.nan  # the fleet's joules up to then (NaN: unknown, or a run from before fedsim kept them)
    batteries: dict[str, np.ndarray] | None = None  # the `Batteries`' state then (None: fleet.batteries off)


def resume_point(run_dir: RunDir, scenario: Scenario) -> ResumePoint:
    """The last complete round of `run_dir`, and trim its rows to it; ValueError if there is none, or
    if the run is asynchronous (the updates in flight when it stopped are in no checkpoint)."""
    if scenario.asynchronous:
        raise ValueError(
            f"{run_dir.path} is an asynchronous run (participation, strategy {scenario.strategy.name!r}): it cannot be "
            "resumed, because the updates its devices had in flight when it stopped are in no checkpoint; run it again"
        )
    metrics = read_metrics(run_dir.path)
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")
    complete = [
        int(k)
        for k in sorted(central.index, reverse=True)
        if k > 0 and _checkpoint_complete(run_dir.checkpoint_path(int(k)), scenario)
    ]
    if not complete:
        raise ValueError(
            f"{run_dir.path} has no complete round to resume from (a round's metrics and its whole checkpoint)"
        )
    k = complete[0]
    if k >= scenario.rounds:
        raise ValueError(f"{run_dir.path} already ran {k} of {scenario.rounds} rounds; ask for more with --rounds N")
    folder = run_dir.checkpoint_path(k)
    strategy = folder / STRATEGY_FILE
    privacy = _privacy_state(folder, scenario) if scenario.privacy.enabled else None
    run_dir.rows = _rows(metrics[(metrics["round"] <= k) & (metrics["kind"] != "eval_export")])
    return ResumePoint(
        server_round=k,
        state=load_adapter_state(folder),
        sim_time=float(central.loc[k, "sim_time_s"]),
        wall_time=float(central.loc[k, "wall_time_s"]),
        keeps=(folder / KEEPS_FILE).read_text() if scenario.prunes else "",
        checkpoint=folder,
        lost=_lost(scenario, saved_strategy=strategy.is_file()),
        kept_ranks=kept_ranks(metrics[metrics["round"] <= k]),
        strategy=load_arrays(strategy) if strategy.is_file() else None,
        privacy=privacy,
        sim_energy=float(central.loc[k, "sim_energy_j"]) if "sim_energy_j" in central else math.nan,
        batteries=load_arrays(folder / BATTERIES_FILE) if scenario.fleet.batteries else None,
    )


def _checkpoint_complete(folder: Path, scenario: Scenario) -> bool:
    needed = (
        ["adapter_model.safetensors"]
        + ([KEEPS_FILE] if scenario.prunes else [])
        + ([STATE_FILE] if scenario.controller else [])
        + ([PRIVACY_FILE] if scenario.privacy.enabled else [])
        + ([BATTERIES_FILE] if scenario.fleet.batteries else [])
    )
    return all((folder / name).is_file() for name in needed)


def _privacy_state(folder: Path, scenario: Scenario) -> dict[str, Any]:
    """The checkpoint's privacy state, checked against the mechanism `scenario` plans; ValueError naming
    `privacy` when the run cannot go on spending the same budget."""
    state = json.loads((folder / PRIVACY_FILE).read_text())
    k = scenario.clients
    book = PrivacyBook.build(scenario.privacy, k.num_clients, k.per_round, scenario.rounds, scenario.seed)
    try:
        book.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        hint = ""
        if scenario.privacy.target_epsilon is not None and isinstance(state.get("accountant"), dict):
            z = state["accountant"].get("noise_multiplier")
            hint = (
                f"; a target ε calibrates the noise to the planned rounds, and other rounds call for another: to go "
                f"on with the same noise past the target, set privacy.noise_multiplier = {z} in place of "
                "target_epsilon in the run's scenario.toml"
            )
        raise ValueError(f"`privacy`: {folder / PRIVACY_FILE}: {exc}{hint}") from None
    return state


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Metric rows as dicts of plain Python values (as the round loop writes them)."""
    return [{k: (None if v is pd.NA else v) for k, v in row.items()} for row in frame.astype(object).to_dict("records")]


def _lost(scenario: Scenario, saved_strategy: bool) -> tuple[str, ...]:
    """What a resume of `scenario` cannot restore (`saved_strategy`: the checkpoint holds the strategy's state)."""
    lost = []
    if scenario.strategy.name in SERVER_OPTIMIZERS and not saved_strategy:
        lost.append(f"{scenario.strategy.name}'s server moments (a checkpoint from before fedsim saved them)")
    if scenario.compression.error_feedback:
        lost.append("the clients' error-feedback residuals")
    if scenario.strategy.name == "fedsa_lora":
        lost.append("the clients' personal B factors")
    if scenario.strategy.name == "fedspeed":
        lost.append("the clients' FedSpeed correction terms")
    if scenario.compression.downlink:
        lost.append("the downlink's copies (clients get the whole adapter once)")
    return tuple(lost)
