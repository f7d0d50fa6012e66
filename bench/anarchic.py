"""Synchronous rounds, anarchic devices and FedSpeed on a battery-limited fleet: writes docs/results/anarchic.md.

    .venv/bin/python bench/anarchic.py                         # 3 strategies x 3 seeds
    .venv/bin/python bench/anarchic.py --seeds 1 --set rounds=2 --doc /tmp/anarchic.md

Runs `fedsim compare` on scenarios/phones-and-laptops.toml (phones that are online part of the
time, on batteries, laptops by day; `fleet.batteries` on) for FedIT (synchronous rounds with the
scenario's deadline), AFA-CD (devices start when they choose and each runs 2 to 8 local steps,
drawn; the server takes updates as they arrive, stale ones included) and FedSpeed,
seed by seed. From each run's central rows it reads the simulated time and the fleet's energy until
the central loss first reaches the seed's target, and writes, per strategy, the mean with a 95 %
t-interval over the seeds that reached it and how many did, beside `fedsim compare`'s own table
(accuracy, loss, bytes, with intervals). The target of a seed is, by default, the loss every
strategy reached at that seed (the highest of their final central losses: a common finish line,
set by a rule rather than picked after looking), or (1 − drop) × the loss before training with
`--drop`. The participation settings are the
asynchronous clock's: the synchronous runs ignore them. The runs are kept under --out, so an
interrupted bench resumes; the doc's "## Reading" section is kept on a rerun.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.printed import command as bench_command  # noqa: E402
from bench.results_doc import write_result  # noqa: E402
from fedsim.cli import main as fedsim  # noqa: E402
from fedsim.config.scenario import load_scenario  # noqa: E402
from fedsim.results.rundir import read_metrics  # noqa: E402
from fedsim.results.stats import Interval, paired_t_interval, t_interval  # noqa: E402

SCENARIO = "scenarios/phones-and-laptops.toml"
STRATEGIES = "fedit,afa_cd,fedspeed"
SETTINGS = [
    "model.name='tiny-llama'",  # the fleet's behaviour is the point; SmolLM2 would take hours on 2 cores
    "rounds=20",
    "fleet.batteries=true",
    "participation.min_steps=2",
    "participation.max_steps=8",
    "participation.steps_policy='uniform'",  # 'battery' gives every device max_steps here: none runs low
]


def central(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics[metrics["kind"] == "eval_central"].sort_values("round")


def to_target(rows: pd.DataFrame, target: float) -> tuple[float, float]:
    """(simulated seconds, fleet joules) when the central loss in `rows` first reached `target`; NaN when never."""
    hit = rows[rows["loss"] <= target]
    if hit.empty:
        return math.nan, math.nan
    first = hit.iloc[0]
    return float(first["sim_time_s"]), float(first["sim_energy_j"])


def _cell(ci: Interval) -> str:
    """mean [lo, hi]; "not reached" without a value."""
    if not math.isfinite(ci.estimate):
        return "not reached"
    return f"{ci.estimate:.4g}" + (f" [{ci.lo:.4g}, {ci.hi:.4g}]" if ci.defined else "")


def summary(compare_dir: Path, strategies: list[str], drop: float | None) -> str:
    """The time- and energy-to-target table over the seeds of each strategy, and each one's
    difference from the first strategy's, paired by seed."""
    curves: dict[tuple[str, int], pd.DataFrame] = {}
    for run in sorted(p for p in compare_dir.iterdir() if (p / "scenario.toml").is_file()):
        scenario = load_scenario(run / "scenario.toml")
        if scenario.strategy.name in strategies:
            curves[(scenario.strategy.name, scenario.seed)] = central(read_metrics(run))
    targets: dict[int, float] = {}
    for (_, seed), rows in curves.items():
        mine = (1.0 - drop) * float(rows["loss"].iloc[0]) if drop is not None else float(rows["loss"].iloc[-1])
        targets[seed] = max(targets.get(seed, -math.inf), mine)
    found: dict[str, list[tuple[int, float, float, float]]] = {s: [] for s in strategies}
    for (strategy, seed), rows in sorted(curves.items()):
        found[strategy].append((seed, targets[seed], *to_target(rows, targets[seed])))
    base = {seed: (seconds, joules) for seed, _, seconds, joules in found[strategies[0]]}
    lines = [
        f"| strategy | seeds reaching the target | simulated time to target (s) | − {strategies[0]} (s) "
        f"| energy to target (J) | − {strategies[0]} (J) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for strategy, runs in found.items():
        reached = [r for r in runs if math.isfinite(r[2])]
        cells = []
        for index in (2, 3):
            cells.append(_cell(t_interval([r[index] for r in reached])))
            mine = [r[index] for r in runs]
            other = [base.get(r[0], (math.nan, math.nan))[index - 2] for r in runs]
            cells.append("" if strategy == strategies[0] else _cell(paired_t_interval(mine, other)))
        lines.append(f"| {strategy} | {len(reached)} of {len(runs)} | " + " | ".join(cells) + " |")
    per_run = ["| run | seed | target loss | time (s) | energy (J) |", "| --- | --- | --- | --- | --- |"]
    for strategy, runs in found.items():
        for seed, target, seconds, joules in runs:
            per_run.append(f"| {strategy} | {seed} | {target:.4f} | {seconds:.4g} | {joules:.4g} |")
    return "\n".join(lines) + "\n\nPer run (NaN: the target was not reached):\n\n" + "\n".join(per_run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--seeds", default="3")
    parser.add_argument(
        "--drop",
        type=float,
        default=None,
        help="target: (1 - drop) x the loss before training (default: common finish)",
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-anarchic"), help="where runs are kept (resumable)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results" / "anarchic.md"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    args = parser.parse_args()
    command = ["compare", SCENARIO, "--strategies", args.strategies, "--seeds", args.seeds, "--out", args.out]
    for override in [*SETTINGS, *args.set]:
        command += ["--set", override]
    code = fedsim(command)
    if code != 0:
        return code
    compare_dir = Path(args.out) / f"{Path(SCENARIO).stem}-compare"
    table = (compare_dir / "comparison.md").read_text().replace("# fedsim compare", "## fedsim compare's table", 1)
    doc = Path(args.doc)
    target_rule = (
        f"(1 − {args.drop:g}) × the central loss before training (the highest over the strategies)"
        if args.drop is not None
        else "the highest final central loss over the strategies, a loss every strategy reached"
    )
    write_result(
        doc,
        f"# anarchic: FedIT, AFA-CD and FedSpeed on phones and laptops\n\nWritten by `{bench_command()}`.\n\n"
        f"## Time and energy to a target loss\n\nTarget, per seed: {target_rule}; mean and 95 % t-interval "
        "over the seeds that reached it.\n\n"
        f"{summary(compare_dir, args.strategies.split(','), args.drop)}\n\n{table}",
    )
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
