"""`fedsim compare`: one scenario, several strategies and seeds, one table and two plots.

    <out>/<scenario>-compare/<strategy>-seed<k>/     a normal run directory per run
    <out>/<scenario>-compare/comparison.csv|.md      per strategy, over seeds (below)
    <out>/<scenario>-compare/accuracy_vs_round.png, accuracy_vs_sim_time.png

Resumable: a run whose events.jsonl ends with `run_end` is kept and not run again; a run that
was interrupted midway is removed and run again (its directory is fedsim's own, inside the
comparison folder). All pending runs share one Flower simulation (`run_simulations`): Ray, the
client actors and the model load are paid once. Columns of the table: final central accuracy
mean and std over seeds, final central loss, final accuracy of the federated evaluation on the
clients' own test splits (the figure that counts for a personalised strategy such as
fedsa_lora, whose server holds no complete model), simulated time to `--target` accuracy (mean
over the seeds that reached it, and how many did), total bytes up and down per run, wall time
per run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.preflight import preflight
from fedsim.report import round_table, time_to_accuracy
from fedsim.rundir import RunDir, read_metrics
from fedsim.scenario import Scenario, load_scenario


def plan(scenario_path: str, strategies: Sequence[str], seeds: int, overrides: Sequence[str]) -> list[Scenario]:
    """Every run's scenario, validated before any runs (a bad strategy name fails up front)."""
    base = load_scenario(scenario_path, overrides)
    runs = []
    for strategy in strategies:
        for seed in range(base.seed, base.seed + seeds):
            extra = [*overrides, f"strategy.name='{strategy}'", f"name='{strategy}-seed{seed}'"]
            runs.append(load_scenario(scenario_path, extra, seed=seed))
    return runs


def is_complete(run_path: Path) -> bool:
    events = run_path / "events.jsonl"
    if not events.is_file():
        return False
    lines = events.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("event") == "run_end"


def run_all(
    runs: Sequence[Scenario], root: Path, source: str, say: Callable[[str], None], run: Callable[[list[tuple[Scenario, RunDir]]], list[Exception]]
) -> list[Exception]:
    """Run what is not done yet, all in one call of `run` (one simulation: `run_simulations`);
    returns the runs' failures (each also recorded in its own run directory)."""
    todo = []
    for scenario in runs:
        path = root / scenario.name
        if is_complete(path):
            say(f"{scenario.name}: done already, kept")
            continue
        if path.exists():
            say(f"{scenario.name}: interrupted earlier, running it again")
            shutil.rmtree(path)
        preflight(scenario, source)
        todo.append(scenario)
    if not todo:
        return []
    say(f"running {', '.join(s.name for s in todo)} in one simulation")
    return run([(s, RunDir.create(root, s)) for s in todo])


def comparison(runs: Sequence[Scenario], root: Path, target: float) -> pd.DataFrame:
    """One row per strategy, aggregated over its seeds."""
    rows = []
    for strategy in dict.fromkeys(s.strategy.name for s in runs):
        metrics = [read_metrics(root / s.name) for s in runs if s.strategy.name == strategy]
        tables = [round_table(m) for m in metrics]
        final = [t["central_accuracy"].iloc[-1] for t in tables]
        hits = [h[1] for m in metrics if (h := time_to_accuracy(m, target)) is not None]
        rows.append({
            "strategy": strategy,
            "seeds": len(metrics),
            "final_accuracy_mean": float(np.mean(final)),
            "final_accuracy_std": float(np.std(final)),
            "final_loss_mean": float(np.mean([t["central_loss"].iloc[-1] for t in tables])),
            "final_client_accuracy_mean": float(np.mean([_last_valid(t["client_accuracy"]) for t in tables])),
            f"sim_time_to_{target:g}_s": float(np.mean(hits)) if hits else float("nan"),
            "runs_reaching_target": len(hits),
            "bytes_up": float(np.mean([t["bytes_up"].sum() for t in tables])),
            "bytes_down": float(np.mean([t["bytes_down"].sum() for t in tables])),
            "wall_time_s": float(np.mean([t["wall_time_s"].iloc[-1] for t in tables])),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("strategy")


def _last_valid(column: pd.Series) -> float:
    valid = column.dropna()
    return float(valid.iloc[-1]) if len(valid) else float("nan")


def mean_curves(runs: Sequence[Scenario], root: Path) -> dict[str, pd.DataFrame]:
    """Per strategy, the per-round table averaged over seeds (accuracy and simulated time)."""
    curves = {}
    for strategy in dict.fromkeys(s.strategy.name for s in runs):
        tables = [round_table(read_metrics(root / s.name)) for s in runs if s.strategy.name == strategy]
        curves[strategy] = pd.concat(tables).groupby(level=0)[["central_accuracy", "sim_time_s"]].mean()
    return curves


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-style Markdown table (no extra dependency)."""
    cols = [table.index.name or "", *table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, row in table.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(runs: Sequence[Scenario], root: Path, target: float) -> pd.DataFrame:
    from dashboards.plots import compare_accuracy_png, compare_sim_time_png

    table = comparison(runs, root, target)
    table.to_csv(root / "comparison.csv")
    (root / "comparison.md").write_text(markdown(table))
    curves = mean_curves(runs, root)
    (root / "accuracy_vs_round.png").write_bytes(compare_accuracy_png(curves))
    (root / "accuracy_vs_sim_time.png").write_bytes(compare_sim_time_png(curves))
    return table
