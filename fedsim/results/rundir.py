"""The run directory: everything a run leaves on disk, written so a killed run loses at most
the round in flight.

Layout of ``<out>/<name>/``::

    scenario.toml            the resolved scenario (defaults filled in, overrides applied)
    metrics.parquet          one row per client per round and one per round (schema below)
    events.jsonl             one JSON object per line: run start/end, rounds, rejected replies
    checkpoints/round_<k>/   the global adapter after round k, in PEFT's format
    keeps.json               pruning: each client's keep and steps trained, after the last round
                             (`fedsim.fleet.keeps`; also in each checkpoint, for `fedsim resume`)
    controller.npz           with a controller: its state after the last round (also in each checkpoint)
    strategy.npz             what the strategy carries across rounds besides the adapter, after the last
                             round (a server optimiser's moments; empty for most; also in each checkpoint)
    privacy.json             privacy on: the accountant's and the adaptive clip's state after the last round
                             (`fedsim.privacy.PrivacyBook`; also in each checkpoint, so a resume spends the same budget)
    batteries.npz            fleet.batteries on: each client's charge and when it was last brought up to date, after
                             the last round (`fedsim.fleet.energy.Batteries`; also in each checkpoint)
    adapter/                 the final global adapter: PeftModel.from_pretrained(base, path)
    final_eval.parquet       the last round's central evaluation, one row per held-out example
                             (the whole held-out set; schema `FINAL_EVAL_COLUMNS` below)
    error.log                only if the run failed while running: the Python traceback of each failure
                             (appended, each under a "=== <UTC time> <ExceptionType>" line); the terminal
                             shows one line and events.jsonl a `run_failed` event (`RunDir.fail`)

metrics.parquet schema (`METRIC_COLUMNS`):

    round        int    0 = before training; k = after round k
    client_id    int    the client's partition id; -1 for server rows
    kind         str    train | eval_client | eval_central | eval_export (the final adapter on the
                        pruned model of each target ratio, central test set: `fedsim.server.export`)
    status       str    ok | failed (ClientApp error or no reply) | rejected (reply failed
                        validation) | straggler (finished too late: deadline or over-commitment;
                        update discarded) | dropped (dropped out mid-round) | infeasible (the
                        training step does not fit the device's memory; not trained)
    device       str    the client's device profile ("" for server rows)
    lora_rank    int    train/eval_client: the LoRA rank the client trained or evaluated at (0 for server rows)
    rank_kept    int    train, with a reply: the rank of the adapter the client sent back, below lora_rank
                        when it self-pruned (hetlora; the server then caps its rank there); 0 otherwise
    num_examples int    examples trained on / evaluated (eval_central: `eval.central_examples` of the
                        held-out set each round, the whole set at the run's last round)
    loss         float  train: mean loss over local steps; eval: response-token loss
    loss_before  float  train: loss on a fixed probe batch before local training (else NaN)
    loss_after   float  train: the same batch after local training (else NaN)
    accuracy     float  eval: greedy exact match (train: NaN)
    deployed_loss float eval_central, with `pruning.deploy_ratios`: the fleet's deployed models'
                        loss, each device's model cut to its profile's ratio, device-weighted (`fedsim.server.deployed`)
    deployed_accuracy float  eval_central: their accuracy, likewise (both NaN without deploy ratios)
    tokens       int    train: tokens processed, padding excluded (else 0)
    wall_time_s  float  train/eval_client: the client's own time for its work;
                        eval_central: wall time of the run so far, at the end of that round
    flops        float  train: training FLOPs the client counted for its batches (fedsim.fleet.costs)
    sim_compute_s float train: simulated compute time, flops / device throughput (fedsim.fleet.clock);
                        with fleet.clock = measured, the training time the client reported
    sim_comm_s   float  train: simulated transfer time of bytes_down and bytes_up; measured:
                        the rest of the round trip the server timed (transfer, process start, load)
    bytes_up     int    train: reply payload as sent (Flower's deflated record tree)
    bytes_down   int    train: the message the client received, likewise
    sim_time_s   float  eval_central: simulated fleet time at the end of that round (cumulative)
    energy_j     float  train, a client that ran (ok, straggler): the joules it spent on the round on the clock,
                        compute + radio + idle until the round ended (`fedsim.server.rounds.spend_energy`);
                        eval_central: the round's total over its clients (0 at round 0). NaN: a figure its device
                        profile lacks (others: NaN, not billed)
    sim_energy_j float  eval_central: the fleet's joules up to the end of that round (cumulative; NaN once unknown)
    staleness    int    train, asynchronous (`fedsim.server.asynchronous`): server steps between the model version
                        the update started from and the step that took it, τ = round − model_version (0 synchronous)
    model_version int   train, asynchronous: the server step whose model the device trained from (0 synchronous)
    local_steps  int    train, asynchronous: the local steps the device chose (0 synchronous: train.local_steps)
    sim_start_s  float  train, asynchronous: simulated time the device started (NaN synchronous)
    in_flight    int    eval_central, asynchronous: devices still training when the step ended (0 synchronous)
    alpha        float  train, ComPEFT: the α the server applied to this update (NaN otherwise)
    aggregation_bias float eval_central: ‖mean(sB)·mean(A) − mean(sB·A)‖_F / ‖mean(sB·A)‖_F over
                        the round's kept clients, mean over layers (fedsim.server.rounds.round_bias)
    prune_target float  train/eval_client: the client's target pruning ratio (0 = unpruned; fedsim.fleet.keeps);
                        eval_export: the target ratio of the exported model
    prune_ratio  float  train: share of the prunable parameters the client had removed at the end of
                        its round (others: what it held); eval_export: the exported model's
    contribution float  train, with a learning controller: relative held-out loss decrease of the global
                        model moved by the client's share of an average (`rounds.contributions`; NaN if not scored)
    update_norm  float  train: ‖local − received‖ of the client's decoded update (NaN if none)
    arm_rank     int    train, with a controller: the LoRA rank the bandit chose for the client (0 otherwise)
    arm_ratio    float  train, with a controller: the pruning ratio it chose (NaN otherwise)
    arm_predicted_s float  train, with a controller: the arm's round time predicted from the device's
                        pace before it played (`controllers.pace`; NaN before its profile was seen)
    reward       float  train, with a controller: the reward the bandit learned from (NaN if none)
    dp_epsilon   float  eval_central, privacy on: ε spent by the rounds so far, at the run's δ (the `privacy`
                        event states δ and the mechanism; 0 at round 0, NaN with privacy off)
    dp_clip      float  eval_central, privacy on: the clip C_t the round's updates were bounded by (NaN otherwise)
    dp_unclipped float  eval_central, adaptive clipping: b̃, the noised share of the round's updates that were
                        not clipped, which moved the next round's clip (NaN otherwise)
    reason       str    why a row is not ok ("" when ok)

final_eval.parquet schema (`FINAL_EVAL_COLUMNS`), rows in held-out order; its token-weighted loss
and mean `correct` are the final eval_central row's loss and accuracy (`fedsim.model.training`):

    round        int    the round evaluated (a run's last; compare with metrics.parquet's)
    example      int    index in the held-out set (`fedsim.data.partitions.central_test_set`, seeded by the run's seed)
    loss         float  the example's mean response-token loss l_i (NaN without a response token)
    n_tokens     int    response tokens n_i that l_i is the mean of
    correct      bool   greedy exact match

Every file is replaced atomically (write to a temporary name, then rename). State saved as arrays
(`strategy.npz`) is a plain .npz without pickle, byte for byte the same for the same arrays
(`save_arrays`).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.config.scenario import Scenario, scenario_toml

METRIC_COLUMNS: dict[str, str] = {
    "round": "int64",
    "client_id": "int64",
    "kind": "string",
    "status": "string",
    "num_examples": "int64",
    "loss": "float64",
    "loss_before": "float64",
    "loss_after": "float64",
    "accuracy": "float64",
    "deployed_loss": "float64",
    "deployed_accuracy": "float64",
    "tokens": "int64",
    "wall_time_s": "float64",
    "device": "string",
    "lora_rank": "int64",
    "rank_kept": "int64",
    "flops": "float64",
    "sim_compute_s": "float64",
    "sim_comm_s": "float64",
    "bytes_up": "int64",
    "bytes_down": "int64",
    "sim_time_s": "float64",
    "energy_j": "float64",
    "sim_energy_j": "float64",
    "staleness": "int64",
    "model_version": "int64",
    "local_steps": "int64",
    "sim_start_s": "float64",
    "in_flight": "int64",
    "alpha": "float64",
    "aggregation_bias": "float64",
    "prune_target": "float64",
    "prune_ratio": "float64",
    "contribution": "float64",
    "update_norm": "float64",
    "arm_rank": "int64",
    "arm_ratio": "float64",
    "arm_predicted_s": "float64",
    "reward": "float64",
    "dp_epsilon": "float64",
    "dp_clip": "float64",
    "dp_unclipped": "float64",
    "reason": "string",
}
_DEFAULTS: dict[str, Any] = {
    "status": "ok",
    "num_examples": 0,
    "loss": math.nan,
    "loss_before": math.nan,
    "loss_after": math.nan,
    "accuracy": math.nan,
    "deployed_loss": math.nan,
    "deployed_accuracy": math.nan,
    "tokens": 0,
    "wall_time_s": math.nan,
    "device": "",
    "lora_rank": 0,
    "rank_kept": 0,
    "flops": math.nan,
    "sim_compute_s": math.nan,
    "sim_comm_s": math.nan,
    "bytes_up": 0,
    "bytes_down": 0,
    "sim_time_s": math.nan,
    "energy_j": math.nan,
    "sim_energy_j": math.nan,
    "staleness": 0,
    "model_version": 0,
    "local_steps": 0,
    "sim_start_s": math.nan,
    "in_flight": 0,
    "alpha": math.nan,
    "aggregation_bias": math.nan,
    "prune_target": 0.0,
    "prune_ratio": 0.0,
    "contribution": math.nan,
    "update_norm": math.nan,
    "arm_rank": 0,
    "arm_ratio": math.nan,
    "arm_predicted_s": math.nan,
    "reward": math.nan,
    "dp_epsilon": math.nan,
    "dp_clip": math.nan,
    "dp_unclipped": math.nan,
    "reason": "",
}

FINAL_EVAL_COLUMNS: dict[str, str] = {
    "round": "int64",
    "example": "int64",
    "loss": "float64",
    "n_tokens": "int64",
    "correct": "bool",
}
FINAL_EVAL_FILE = "final_eval.parquet"
KEEPS_FILE = "keeps.json"
ERROR_LOG = "error.log"
STRATEGY_FILE = "strategy.npz"
PRIVACY_FILE = "privacy.json"
BATTERIES_FILE = "batteries.npz"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # every member's timestamp in `save_arrays`: the same arrays, the same bytes


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """`arrays` as an .npz at `path` (atomically), in their order, without pickle (numeric arrays
    only), every member dated `_ZIP_TIME`: the same arrays give the same bytes. `np.load` reads it."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(array), allow_pickle=False)
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays an .npz at `path` holds (`save_arrays`), in its order; pickled objects are refused."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


class RunExistsError(FileExistsError):
    """The run directory is already there; fedsim never overwrites a run silently."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"run directory {path} already exists; choose another with --out DIR or --set name=NEW_NAME, or remove it"
        )


def metrics_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows → a DataFrame with exactly the documented columns and dtypes."""
    unknown = {k for r in rows for k in r} - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metric columns {sorted(unknown)}")
    full = [{**_DEFAULTS, **r} for r in rows]
    frame = pd.DataFrame(full, columns=list(METRIC_COLUMNS))
    return frame.astype(METRIC_COLUMNS)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RunDir:
    """Owns one run's directory: creates it, appends events and metric rows, stores checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    @classmethod
    def create(cls, out: Path, scenario: Scenario) -> RunDir:
        path = Path(out) / scenario.name
        if path.exists():
            raise RunExistsError(path)
        path.mkdir(parents=True)
        (path / "checkpoints").mkdir()
        run = cls(path)
        run.save_scenario(scenario)
        return run

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.parquet"

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round_{server_round}"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory (to resume it: `fedsim.server.resume`)."""
        if not (Path(path) / "metrics.parquet").is_file() or not (Path(path) / "scenario.toml").is_file():
            raise FileNotFoundError(f"{path} is not a fedsim run directory (no metrics.parquet or scenario.toml)")
        return cls(Path(path))

    def save_scenario(self, scenario: Scenario) -> None:
        _atomic_write(self.path / "scenario.toml", scenario_toml(scenario).encode())

    @property
    def keeps_path(self) -> Path:
        return self.path / KEEPS_FILE

    def save_keeps(self, text: str, server_round: int) -> None:
        """Each client's pruning record after `server_round`: in its checkpoint, and the latest at the top."""
        _atomic_write(self.checkpoint_path(server_round) / KEEPS_FILE, text.encode())
        _atomic_write(self.keeps_path, text.encode())

    def save_strategy(self, state: Mapping[str, np.ndarray], server_round: int | None = None) -> None:
        """The strategy's state across rounds (`STRATEGY_FILE`, `save_arrays`): after `server_round`, in
        its checkpoint; None: after the last round, at the top."""
        folder = self.path if server_round is None else self.checkpoint_path(server_round)
        save_arrays(folder / STRATEGY_FILE, state)

    def save_privacy(self, state: Mapping[str, Any], server_round: int | None = None) -> None:
        """The privacy state (`PRIVACY_FILE`, JSON): after `server_round`, in its checkpoint; None: after the
        last round, at the top."""
        folder = self.path if server_round is None else self.checkpoint_path(server_round)
        _atomic_write(folder / PRIVACY_FILE, json.dumps(state, indent=1, allow_nan=False).encode())

    def save_batteries(self, state: Mapping[str, np.ndarray], server_round: int | None = None) -> None:
        """The batteries' state (`BATTERIES_FILE`, `save_arrays`): after `server_round`, in its checkpoint; None:
        after the last round, at the top."""
        folder = self.path if server_round is None else self.checkpoint_path(server_round)
        save_arrays(folder / BATTERIES_FILE, state)

    def save_final_eval(
        self, server_round: int, loss: Sequence[float], n_tokens: Sequence[int], correct: Sequence[bool]
    ) -> None:
        """The per-example central evaluation of `server_round`, example k of the held-out set in row k."""
        frame = pd.DataFrame({"round": server_round, "example": range(len(correct))})
        frame = frame.assign(loss=list(loss), n_tokens=list(n_tokens), correct=list(correct))
        _atomic_write(self.path / FINAL_EVAL_FILE, frame.astype(FINAL_EVAL_COLUMNS).to_parquet(index=False))

    @property
    def error_log_path(self) -> Path:
        return self.path / ERROR_LOG

    def fail(self, exc: BaseException) -> Path:
        """Record that the run failed with `exc`: its traceback in error.log (`append_traceback`)
        and a `run_failed` event; returns the log's path."""
        path = append_traceback(self.error_log_path, exc)
        self.event("run_failed", error=repr(exc), log=ERROR_LOG)
        return path

    def event(self, kind: str, /, **fields: Any) -> None:
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
        line = json.dumps({"time": time.time(), "event": kind, **clean}, default=str, allow_nan=False)
        with open(self.path / "events.jsonl", "a") as fh:
            fh.write(line + "\n")

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and rewrite metrics.parquet (small: one row per client-round)."""
        self.rows.extend(rows)
        frame = metrics_frame(self.rows)
        _atomic_write(self.metrics_path, frame.to_parquet(index=False))


def append_traceback(path: Path, exc: BaseException) -> Path:
    """Append `exc`'s full traceback (as far as it was raised), under a "=== <UTC time>
    <ExceptionType>" line, to the log file at `path`; returns `path`."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    with open(path, "a") as fh:
        fh.write(f"=== {stamp} UTC {type(exc).__name__}\n{''.join(traceback.format_exception(exc))}\n")
    return path


def last_event(run_dir: str | Path) -> dict[str, Any]:
    """The last line of a run's events.jsonl (`{"event": "run_end", ...}` once it finished), {} if none."""
    events = Path(run_dir) / "events.jsonl"
    lines = events.read_text().splitlines() if events.is_file() else []
    return dict(json.loads(lines[-1])) if lines else {}


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / "metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedsim run directory (no metrics.parquet)")
    return pd.read_parquet(path)


def read_final_eval(run_dir: str | Path) -> pd.DataFrame:
    """The run's final_eval.parquet; FileNotFoundError if it has none (a run still going, or one
    recorded without it)."""
    path = Path(run_dir) / FINAL_EVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {FINAL_EVAL_FILE} (per-example results of its final round)")
    return pd.read_parquet(path)
