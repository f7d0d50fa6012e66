"""Tables and summaries over a run's metrics (pandas in, pandas or text out)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

# Central-row columns a run has only with some features: shown when the run has them.
OPTIONAL = ("deployed_loss", "deployed_accuracy", "dp_epsilon", "dp_clip", "dp_unclipped")
ENERGY = ("energy_j", "sim_energy_j")  # central-row columns: the round's joules, and the run's so far
SI_PREFIXES = ("", "k", "M", "G", "T", "P", "E")


def _weighted(frame: pd.DataFrame, column: str) -> float:
    w = frame["num_examples"].to_numpy(dtype=float)
    return float(np.average(frame[column], weights=w)) if len(frame) and w.sum() > 0 else float("nan")


def round_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per round: train loss (clients' mean), clients ok/failed, federated and central
    evaluation, wall time and simulated time so far, the fleet's joules in the round (`energy_j`) and so
    far (`sim_energy_j`; NaN: unknown, or a run from before fedsim kept them); with deploy ratios the
    deployed models' figures, with privacy the ε spent so far (`dp_epsilon`) and, adaptive clipping,
    the clip and the share left unclipped."""
    rows = []
    for server_round, group in metrics.groupby("round", sort=True):
        train = group[group["kind"] == "train"]
        ok = train[train["status"] == "ok"]
        client_eval = group[(group["kind"] == "eval_client") & (group["status"] == "ok")]
        central = group[group["kind"] == "eval_central"]
        lost = train["status"].isin(["straggler", "dropped", "infeasible"])
        rows.append(
            {
                "round": int(server_round),
                "train_loss": float(ok["loss"].mean()) if len(ok) else float("nan"),
                "clients_ok": len(ok),
                "clients_failed": int(train["status"].isin(["failed", "rejected"]).sum()),
                "clients_lost": int(lost.sum()),
                "bytes_up": int(train["bytes_up"].sum()) if "bytes_up" in train else 0,
                "bytes_down": int(train["bytes_down"].sum()) if "bytes_down" in train else 0,
                "client_loss": _weighted(client_eval, "loss"),
                "client_accuracy": _weighted(client_eval, "accuracy"),
                "central_loss": float(central["loss"].iloc[0]) if len(central) else float("nan"),
                "central_accuracy": float(central["accuracy"].iloc[0]) if len(central) else float("nan"),
                "wall_time_s": float(central["wall_time_s"].iloc[0]) if len(central) else float("nan"),
                "sim_time_s": float(central["sim_time_s"].iloc[0])
                if len(central) and "sim_time_s" in central
                else float("nan"),
                **{k: float(central[k].iloc[0]) if len(central) and k in central else math.nan for k in ENERGY},
                "aggregation_bias": float(central["aggregation_bias"].iloc[0])
                if len(central) and "aggregation_bias" in central
                else float("nan"),
                **{k: float(central[k].iloc[0]) for k in OPTIONAL if len(central) and k in central},
            }
        )
    table = pd.DataFrame(rows).set_index("round")
    absent = [k for k in OPTIONAL if k in table and table[k].isna().all()]
    if "dp_unclipped" in absent and "dp_clip" in table:  # a fixed clip: the scenario's, said once
        absent.append("dp_clip")
    return table.drop(columns=absent)


def ratio_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Pruned runs: the final adapter on each target ratio's pruned model (`eval_export` rows),
    one row per target ratio; empty for an unpruned run."""
    rows = metrics[metrics["kind"] == "eval_export"] if "kind" in metrics else metrics.iloc[:0]
    columns = ["prune_target", "prune_ratio", "accuracy", "loss", "num_examples"]
    return (
        rows[columns].set_index("prune_target").sort_index()
        if len(rows)
        else pd.DataFrame(columns=columns).set_index("prune_target")
    )


def arms_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """With a controller: per device profile, the arm it settled on — the most chosen (rank,
    ratio) over the last third of the rounds — its share of those choices and mean reward, the
    mean reward over the whole run, how many distinct arms were tried, and `predicted_share`: the
    median of the pace's predicted round time over the measured one (compute + comm) of its
    clients, i.e. how far to trust the screen on that profile (NaN without a prediction). Empty
    without a controller."""
    train = (
        metrics[(metrics["kind"] == "train") & (metrics["arm_rank"] > 0)] if "arm_rank" in metrics else metrics.iloc[:0]
    )
    columns = [
        "settled_rank",
        "settled_ratio",
        "settled_share",
        "settled_reward",
        "mean_reward",
        "arms_tried",
        "pulls",
        "predicted_share",
    ]
    if train.empty:
        return pd.DataFrame(columns=["device", *columns]).set_index("device")
    late = train[train["round"] > train["round"].max() * 2 / 3]
    rows = []
    for device, group in train.groupby("device", sort=True):
        tail = late[late["device"] == device]
        tail = tail if len(tail) else group
        counts = tail.groupby(["arm_rank", "arm_ratio"]).size().sort_values(ascending=False, kind="stable")
        rank, ratio = counts.index[0]
        chosen = tail[(tail["arm_rank"] == rank) & (tail["arm_ratio"] == ratio)]
        rows.append({
            "device": device, "settled_rank": int(rank), "settled_ratio": float(ratio),
            "settled_share": counts.iloc[0] / len(tail),
            "settled_reward": float(chosen["reward"].mean()), "mean_reward": float(group["reward"].mean()),
            "arms_tried": int(group.groupby(["arm_rank", "arm_ratio"]).ngroups), "pulls": len(group),
            "predicted_share": _predicted_share(group),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("device")


def _predicted_share(rows: pd.DataFrame) -> float:
    """Median of arm_predicted_s / (sim_compute_s + sim_comm_s) over the rows that have both."""
    if "arm_predicted_s" not in rows:
        return float("nan")
    share = rows["arm_predicted_s"] / (rows["sim_compute_s"] + rows["sim_comm_s"])
    share = share[np.isfinite(share) & (share > 0)]
    return float(share.median()) if len(share) else float("nan")


class Reached(NamedTuple):
    """When a run's central accuracy first reached a target."""

    round: int
    sim_time_s: float  # simulated seconds so far
    sim_energy_j: float  # the fleet's joules so far (NaN: unknown)


def time_to_accuracy(metrics: pd.DataFrame, target: float) -> Reached | None:
    """(round, simulated seconds, joules) at which central accuracy first reached `target`, or None."""
    table = round_table(metrics)
    reached = table[table["central_accuracy"] >= target]
    if reached.empty:
        return None
    first = reached.index[0]
    return Reached(int(first), float(reached.loc[first, "sim_time_s"]), float(reached.loc[first, "sim_energy_j"]))


def significant(value: float) -> str:
    """Three significant digits, never in exponent form (for |value| below 1024: a scaled figure)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def si(value: float, unit: str) -> str:
    """A count in powers of 1000 with `unit`: si(1.92e9, "FLOP") → "1.92 GFLOP", si(1500, "J") → "1.5 kJ"."""
    size, power = float(value), 0
    while abs(size) >= 1000 and power < len(SI_PREFIXES) - 1:
        size, power = size / 1000, power + 1
    return f"{significant(size)} {SI_PREFIXES[power]}{unit}"


def joules(value: float) -> str:
    """'12.3 kJ' (`si` in J); 'n/a' when unknown (NaN), never 0."""
    return si(value, "J") if math.isfinite(value) else "n/a"


def target_line(metrics: pd.DataFrame, target: float) -> str:
    """`fedsim report --target`'s line: the round, simulated time and energy at which central accuracy
    first reached `target`."""
    hit = time_to_accuracy(metrics, target)
    if hit is None:
        return f"time to accuracy {target:g}: not reached"
    spent = joules(hit.sim_energy_j)
    return f"time to accuracy {target:g}: round {hit.round}, {hit.sim_time_s:.1f}s simulated, {spent} spent"


def _clock(run_dir: str | Path) -> str:
    """'simulated', or 'measured' for a deployment on real devices (the run's `fleet.clock`)."""
    import tomllib

    path = Path(run_dir) / "scenario.toml"
    clock = (
        tomllib.loads(path.read_text()).get("fleet", {}).get("clock", "simulated") if path.is_file() else "simulated"
    )
    return "measured" if clock == "measured" else "simulated"


def _held_out(metrics: pd.DataFrame) -> str:
    """How many held-out examples the central evaluation scored: "N each round", or the earlier
    rounds' count and the last round's when the last one scored more."""
    counts = metrics[metrics["kind"] == "eval_central"].groupby("round")["num_examples"].max()
    last = int(counts.index[-1])
    earlier = counts[counts.index < last]
    if earlier.empty or (earlier == counts[last]).all():
        return f"{int(counts[last])} each round"
    return (
        f"{int(earlier.max())} in rounds 0-{last - 1}, {int(counts[last])} in round {last} "
        "(its accuracy and loss are the figures to quote)"
    )


def privacy_line(table: pd.DataFrame, run_dir: str | Path) -> list[str]:
    """The summary's privacy line ([] without privacy): ε spent, at the δ of the run's `privacy` event."""
    if "dp_epsilon" not in table:
        return []
    said = _event(run_dir, "privacy")
    mode, delta = said.get("mode", "?"), said.get("delta")
    at = f" at δ = {delta:.3g}" if isinstance(delta, float) else ""
    return [
        f"{'privacy':<18}{mode} DP, ε = {table['dp_epsilon'].iloc[-1]:.3g}{at} after round {table.index[-1]} "
        "(the mechanism: events.jsonl's `privacy` event)"
    ]


def _event(run_dir: str | Path, kind: str) -> dict[str, Any]:
    """The last `kind` event of a run's events.jsonl ({} if none)."""
    path = Path(run_dir) / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return next((e for e in reversed(events) if e.get("event") == kind), {})


def summary_text(metrics: pd.DataFrame, run_dir: str | Path) -> str:
    """The one-screen summary printed at the end of `fedsim run`."""
    table, ratios = round_table(metrics), ratio_table(metrics)
    first, last = table.iloc[0], table.iloc[-1]
    best_round = int(table["central_accuracy"].idxmax())
    failed = int(table["clients_failed"].sum())
    lost = int(table["clients_lost"].sum())
    return "\n".join(
        [
            "",
            f"done: {len(table) - 1} rounds in {last['wall_time_s']:.1f}s",
            f"central accuracy  {first['central_accuracy']:.3f} (round 0) -> {last['central_accuracy']:.3f} "
            f"(round {table.index[-1]}); best {table['central_accuracy'].max():.3f} at round {best_round}",
            f"central loss      {first['central_loss']:.4f} -> {last['central_loss']:.4f}",
            f"held-out examples {_held_out(metrics)}",
            *(
                [
                    f"deployed models   loss {first['deployed_loss']:.4f} -> {last['deployed_loss']:.4f}, accuracy "
                    f"{last['deployed_accuracy']:.3f}  (each profile's model cut to pruning.deploy_ratios)"
                ]
                if "deployed_loss" in table
                else []
            ),
            f"{_clock(run_dir) + ' time':<18}{last['sim_time_s']:.1f}s "
            f"on the fleet (wall {last['wall_time_s']:.1f}s here)",
            f"{'energy':<18}{joules(last['sim_energy_j'])} on the fleet (training, radio, waiting for the round)",
            f"client failures   {failed} failed or rejected, {lost} stragglers/dropped/infeasible",
            *privacy_line(table, run_dir),
            f"run directory     {run_dir}",
            f"final adapter     {Path(run_dir) / 'adapter'}  (PeftModel.from_pretrained(base, path))",
            f"per-round table   fedsim report {run_dir}",
            *(
                [
                    "pruned models     "
                    f"{', '.join(f'ratio {r.prune_ratio:.2f}: acc {r.accuracy:.3f}' for r in ratios.itertuples())}  "
                    f"(fedsim export {run_dir} --device PROFILE)"
                ]
                if len(ratios)
                else []
            ),
        ]
    )
