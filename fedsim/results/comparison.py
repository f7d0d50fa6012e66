"""The tables and curves of `fedsim compare`, read from its finished run directories.

Per strategy and metric (`METRICS`: final central accuracy and loss, final accuracy of the
federated evaluation on the clients' own test splits — the figure that counts for a personalised
strategy such as fedsa_lora, whose server holds no complete model —, simulated time and the
fleet's energy to the target accuracy, bytes up and down, wall time), over the seeds
(`fedsim.results.stats`):

- `mean` and the Student-t 95 % interval over the seeds' final values (`seed_lo`, `seed_hi`);
- central accuracy and loss also `pooled`: their value over every (seed, held-out example) pair
  of the final round (`final_eval.parquet`), and its paired percentile bootstrap interval
  (`pooled_lo`, `pooled_hi`); the loss token-weighted, Σ l_i n_i / Σ n_i;
- against the baseline strategy, paired by seed: `diff` (mean of the per-seed differences) with
  its t interval, and for central accuracy and loss `diff_pooled`, the bootstrap over the (seed,
  example) pairs, each resampled with the baseline's result on the same example (at a seed every
  strategy is scored on the same held-out set: `read_results` checks it); `distinguishable` when
  every defined interval excludes 0.

comparison.csv holds one row per (strategy, metric) with all of these (`COLUMNS`); comparison.md
shows the same as "mean [lo, hi]" text, under the command that produced it. Energy that a run
does not know (a device profile without power figures) is NaN in the csv and "n/a" in the text,
never 0.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.config.scenario import Scenario
from fedsim.results.report import round_table, time_to_accuracy
from fedsim.results.rundir import read_final_eval, read_metrics
from fedsim.results.stats import (
    RESAMPLES,
    Interval,
    bootstrap_mean,
    bootstrap_mean_difference,
    distinguishable,
    paired_t_interval,
    t_interval,
)

METRICS: dict[str, str] = {  # a run's final value → its label in comparison.md
    "central_accuracy": "central accuracy",
    "central_loss": "central loss",
    "client_accuracy": "client accuracy",
    "time_to_target_s": "sim time to target (s)",
    "energy_to_target_j": "energy to target (J)",
    "bytes_up": "bytes up",
    "bytes_down": "bytes down",
    "wall_time_s": "wall time (s)",
}
PER_EXAMPLE: dict[str, tuple[str, str | None]] = {  # metric → final_eval.parquet's (value, weight) columns
    "central_accuracy": ("correct", None),
    "central_loss": ("loss", "n_tokens"),
}
COLUMNS = [
    "strategy", "metric", "n", "mean", "seed_lo", "seed_hi", "pooled", "pooled_lo", "pooled_hi",
    "diff_n", "diff", "diff_seed_lo", "diff_seed_hi", "diff_pooled", "diff_pooled_lo", "diff_pooled_hi",
    "distinguishable",
]  # fmt: skip
BOOTSTRAP_SEED = 0  # the bootstrap's generator seed: the same runs give the same table


@dataclass(frozen=True)
class RunResult:
    """One finished run of a comparison, read back."""

    name: str
    strategy: str
    seed: int
    table: pd.DataFrame  # `fedsim.results.report.round_table`
    final: dict[str, float]  # `METRICS` → the run's value (NaN: no federated evaluation, target not reached, unknown)
    examples: pd.DataFrame | None  # final_eval.parquet, None when missing or not of the last round
    curve_examples: int  # held-out examples scored in each round before the last (the most)
    final_examples: int  # ... in the last


def read_results(runs: Sequence[Scenario], root: Path, target: float) -> list[RunResult]:
    """Each run's result, `target` the accuracy of `time_to_target_s`. ValueError when two runs
    at one seed were scored on different held-out sets (their [data] sections or final
    example indices differ)."""
    results = [_read(root / s.name, s, target) for s in runs]
    for seed in dict.fromkeys(r.seed for r in results):
        _check_held_out(root, [r for r in results if r.seed == seed])
    return results


def _read(path: Path, scenario: Scenario, target: float) -> RunResult:
    metrics = read_metrics(path)
    table = round_table(metrics)
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["num_examples"]
    last = int(table.index[-1])
    hit = time_to_accuracy(metrics, target)
    final = {
        "central_accuracy": float(table["central_accuracy"].iloc[-1]),
        "central_loss": float(table["central_loss"].iloc[-1]),
        "client_accuracy": _last_valid(table["client_accuracy"]),
        "time_to_target_s": hit.sim_time_s if hit is not None else math.nan,
        "energy_to_target_j": hit.sim_energy_j if hit is not None else math.nan,
        "bytes_up": float(table["bytes_up"].sum()),
        "bytes_down": float(table["bytes_down"].sum()),
        "wall_time_s": float(table["wall_time_s"].iloc[-1]),
    }
    try:
        examples: pd.DataFrame | None = read_final_eval(path)
    except FileNotFoundError:
        examples = None
    if examples is not None and not (examples["round"] == last).all():
        examples = None  # left by an earlier end of a run resumed for more rounds
    before = central[central.index < last]
    return RunResult(
        path.name,
        scenario.strategy.name,
        scenario.seed,
        table,
        final,
        examples,
        int(before.max()) if len(before) else int(central[last]),
        int(central[last]),
    )


def _last_valid(column: pd.Series) -> float:
    valid = column.dropna()
    return float(valid.iloc[-1]) if len(valid) else float("nan")


def _check_held_out(root: Path, results: Sequence[RunResult]) -> None:
    """The runs of one seed were scored on one held-out set."""
    data = {r.name: tomllib.loads((root / r.name / "scenario.toml").read_text()).get("data") for r in results}
    first = results[0]
    for r in results[1:]:
        if data[r.name] != data[first.name]:
            raise ValueError(
                f"{r.name} and {first.name} (seed {r.seed}) differ in [data]: "
                "their held-out sets differ; remove one and run again"
            )
        if (
            r.examples is not None
            and first.examples is not None
            and not np.array_equal(r.examples["example"], first.examples["example"])
        ):
            raise ValueError(
                f"{r.name} and {first.name} (seed {r.seed}) scored different held-out examples in their final rounds"
            )


def comparison(results: Sequence[RunResult], baseline: str, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """One row per (strategy, metric), `COLUMNS` (module docstring); the baseline's rows have no
    differences. `seed`: the bootstrap's generator."""
    base = _by_seed(results, baseline)
    rows = []
    for strategy in dict.fromkeys(r.strategy for r in results):
        mine = _by_seed(results, strategy)
        for metric in METRICS:
            row = {"strategy": strategy, "metric": metric, **_summary(mine, metric, seed)}
            if strategy != baseline:
                row |= _difference(mine, base, metric, seed)
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS).astype({"n": "Int64", "diff_n": "Int64"})


def _by_seed(results: Sequence[RunResult], strategy: str) -> dict[int, RunResult]:
    return {r.seed: r for r in sorted(results, key=lambda r: r.seed) if r.strategy == strategy}


def _summary(runs: dict[int, RunResult], metric: str, seed: int) -> dict[str, Any]:
    values = [r.final[metric] for r in runs.values()]
    over_seeds = t_interval(values)
    pooled = _pooled(list(runs.values()), metric, seed)
    return {"n": int(np.isfinite(values).sum()), **_columns("", over_seeds, pooled)}


def _difference(runs: dict[int, RunResult], base: dict[int, RunResult], metric: str, seed: int) -> dict[str, Any]:
    seeds = [s for s in runs if s in base]
    mine, theirs = [runs[s].final[metric] for s in seeds], [base[s].final[metric] for s in seeds]
    over_seeds = paired_t_interval(mine, theirs)
    pooled = _pooled([runs[s] for s in seeds], metric, seed, [base[s] for s in seeds])
    n = int(np.isfinite(np.subtract(mine, theirs)).sum())
    return {
        "diff_n": n,
        **_columns("diff_", over_seeds, pooled),
        "distinguishable": distinguishable(over_seeds, pooled),
    }


def _columns(prefix: str, over_seeds: Interval, pooled: Interval) -> dict[str, float]:
    mean = "diff" if prefix else "mean"
    return {
        mean: over_seeds.estimate, f"{prefix}seed_lo": over_seeds.lo, f"{prefix}seed_hi": over_seeds.hi,
        f"{prefix}pooled": pooled.estimate, f"{prefix}pooled_lo": pooled.lo, f"{prefix}pooled_hi": pooled.hi,
    }  # fmt: skip


def _pooled(runs: Sequence[RunResult], metric: str, seed: int, baseline: Sequence[RunResult] | None = None) -> Interval:
    """The bootstrap over the runs' (seed, example) pairs (paired with `baseline`'s runs, seed by
    seed); undefined when the metric has no per-example results or a run lacks them."""
    undefined = Interval(math.nan, math.nan, math.nan)
    both = [*runs, *(baseline or [])]
    if metric not in PER_EXAMPLE or not runs or any(r.examples is None for r in both):
        return undefined
    value, weight = PER_EXAMPLE[metric]

    def pool(side: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray | None]:
        frame = pd.concat([r.examples for r in side if r.examples is not None])
        return frame[value].to_numpy(dtype=float), frame[weight].to_numpy(dtype=float) if weight else None

    x, w = pool(runs)
    if baseline is None:
        return bootstrap_mean(x, w, seed=seed)
    y, v = pool(baseline)
    return bootstrap_mean_difference(x, y, w, v, seed=seed)


def mean_curves(results: Sequence[RunResult]) -> dict[str, pd.DataFrame]:
    """Per strategy, per round: central accuracy and loss, mean over seeds with the t interval
    (`central_accuracy_lo` / `_hi`, `central_loss_lo` / `_hi`; NaN with one seed), and the mean
    simulated time `sim_time_s`."""
    curves = {}
    for strategy in dict.fromkeys(r.strategy for r in results):
        tables = pd.concat([r.table for r in results if r.strategy == strategy])
        rows = {}
        for server_round, group in tables.groupby(level=0):
            row = {"sim_time_s": float(group["sim_time_s"].mean())}
            for column in ("central_accuracy", "central_loss"):
                iv = t_interval(group[column])
                row |= {column: iv.estimate, f"{column}_lo": iv.lo, f"{column}_hi": iv.hi}
            rows[server_round] = row
        curves[strategy] = pd.DataFrame.from_dict(rows, orient="index").rename_axis("round")
    return curves


def markdown(table: pd.DataFrame, results: Sequence[RunResult], baseline: str, target: float, command: str) -> str:
    """comparison.md: the command, the seeds and example counts, the final metrics per strategy
    and their differences from `baseline`, each "mean [lo, hi]"."""
    seeds = sorted({r.seed for r in results})
    per_strategy = len(seeds)
    curve, final = sorted({r.curve_examples for r in results}), sorted({r.final_examples for r in results})
    missing = [r.name for r in results if r.examples is None]
    lines = [
        "# fedsim compare", "", "```", command, "```", "",
        f"Seeds {', '.join(map(str, seeds))} ({per_strategy} run(s) per strategy); baseline `{baseline}`; target "
        f"accuracy {target:g}.",
        f"Held-out examples: curves {_join(curve)} per round; final: {_join(final)}"
        + (
            " (the per-round curves are scored on fewer examples than the final round)."
            if max(curve) < min(final)
            else "."
        ),
        "", "## Final round, mean [95 % interval]", "",
        *_final_table(table, target), "",
        f"## Difference from `{baseline}`, paired by seed", "",
        *_difference_table(table, baseline, target), "",
        *_legend(per_strategy, baseline),
    ]  # fmt: skip
    if missing:
        lines += [
            "",
            "No per-example results (final_eval.parquet) for "
            f"{', '.join(missing)}: their strategies have no pooled intervals.",
        ]
    return "\n".join(lines) + "\n"


def _join(values: Sequence[int]) -> str:
    return " / ".join(map(str, values))


def _final_table(table: pd.DataFrame, target: float) -> list[str]:
    head = [
        "strategy",
        "runs",
        "central accuracy",
        "central loss",
        "client accuracy",
        f"sim time to {target:g} (s)",
        f"energy to {target:g} (J)",
        "reached",
        "bytes up",
        "bytes down",
        "wall time (s)",
    ]
    lines = _row(head) + ["|" + "---|" * len(head)]
    for strategy, rows in table.groupby("strategy", sort=False):
        by = rows.set_index("metric")
        cells = [_cell(by.loc[m]) for m in ("central_accuracy", "central_loss", "client_accuracy", "time_to_target_s")]
        cells.append(_energy_cell(by))
        reached = f"{int(by.loc['time_to_target_s', 'n'])}/{int(by.loc['central_accuracy', 'n'])}"
        rest = [_cell(by.loc[m]) for m in ("bytes_up", "bytes_down", "wall_time_s")]
        lines += _row([str(strategy), str(int(by.loc["central_accuracy", "n"])), *cells, reached, *rest])
    return lines


def _difference_table(table: pd.DataFrame, baseline: str, target: float) -> list[str]:
    metrics = ("central_accuracy", "central_loss", "client_accuracy", "time_to_target_s")
    head = [
        "strategy", "central accuracy", "central loss", "client accuracy", f"sim time to {target:g} (s)",
        f"energy to {target:g} (J)",
    ]  # fmt: skip
    lines = _row(head) + ["|" + "---|" * len(head)]
    for strategy, rows in table[table["strategy"] != baseline].groupby("strategy", sort=False):
        by = rows.set_index("metric")
        lines += _row([str(strategy), *(_cell(by.loc[m], "diff_") for m in metrics), _energy_cell(by, "diff_")])
    return lines


def _energy_cell(by: pd.DataFrame, prefix: str = "") -> str:
    """The energy to target's cell (`_cell`): "n/a" when runs reached the target but none knows its energy."""
    n = f"{prefix}n"
    if by.loc["time_to_target_s", n] > 0 and by.loc["energy_to_target_j", n] == 0:
        return "n/a"
    return _cell(by.loc["energy_to_target_j"], prefix)


def _row(cells: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(cells) + " |"]


def _cell(row: pd.Series, prefix: str = "") -> str:
    """ "mean [lo, hi] pooled [lo, hi]", each part where defined; a difference gets "~" when it
    cannot be told from 0."""
    sign = "+" if prefix else ""
    estimate = row["diff" if prefix else "mean"]
    if not math.isfinite(estimate):
        return "–"
    text = f"{estimate:{sign}.4g}"
    if math.isfinite(row[f"{prefix}seed_lo"]):
        text += f" [{row[f'{prefix}seed_lo']:.4g}, {row[f'{prefix}seed_hi']:.4g}]"
    if math.isfinite(row[f"{prefix}pooled_lo"]):
        text += f" pooled [{row[f'{prefix}pooled_lo']:.4g}, {row[f'{prefix}pooled_hi']:.4g}]"
    if prefix and not row["distinguishable"]:
        text += " ~"
    return text


def _legend(seeds: int, baseline: str) -> list[str]:
    one = (
        " With one seed the t interval is undefined: central accuracy and loss are judged by the bootstrap alone, "
        "the other metrics cannot be told apart."
        if seeds < 2 else ""
    )  # fmt: skip
    return [
        "[lo, hi]: Student-t 95 % interval over seeds (of the per-seed differences, for a difference)."
        " pooled [lo, hi]: percentile bootstrap 95 % interval over the (seed, held-out example) pairs of the"
        " final round,"
        f" {RESAMPLES} resamples, generator seed {BOOTSTRAP_SEED}; accuracy the share correct, loss token-weighted;"
        f" a difference resamples each pair with `{baseline}`'s result on the same example."
        " Sim time and energy to target: over the runs that reached it; energy is the fleet's joules on the clock"
        " (training, radio, waiting for the round), n/a: a device profile without power figures."
        f" ~: cannot be told apart from `{baseline}` (an interval "
        f"contains 0).{one}",
    ]
