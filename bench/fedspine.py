"""FedSpine's experiment: the bandit controller against fixed (rank, ratio) arms, same fleet, same seeds.

    .venv/bin/python bench/fedspine.py --tiny                 # CI-sized: the tiny model, ~10 min on 2 cores
    .venv/bin/python bench/fedspine.py                        # SmolLM2 on the 80 Jetsons (hours on a CPU)
    .venv/bin/python bench/fedspine.py --tiny --arms corners --seeds 0 1
    # the lean SmolLM2 run: 8 devices, ~1 h on 2 cores
    .venv/bin/python bench/fedspine.py --ranks 4 16 --ratios 0 0.2 --rounds 10 --bandits sucb ucb1 \
        --keep runs/fedspine-lean --set clients.num_clients=8 --set clients.per_round=8 \
        --set clients.eval_per_round=0 --set train.local_steps=4 --set data.central_test_size=32 \
        --set controller.sucb_depth=2 --set 'controller.sucb_snap="grid"' \
        --set 'fleet.groups=[{profile="jetson-tx2", count=3}, {profile="jetson-xavier-nx", count=4}, \
        {profile="jetson-agx-orin", count=1}]' \
        --bandit-set 'controller.pool="none"' --doc docs/results/fedspine-lean.md

Every row is one federation of `scenarios/fedspine-jetson-80.toml` (30 TX2, 40 Xavier NX, 10 AGX
Orin; 8 clients per round; LoRA on q, v, up_proj; global rank = the largest arm rank) in which
only `[controller]` differs; the rows a command runs for a seed share one Flower simulation:

- `bandit (sucb)`: the scenario's controller, FedSpine's default, and any others named with
  `--bandits` (ucb1, discounted_ucb, exp3, thompson, linucb, ...);
- `fixed r/p`: every device at rank r, ratio p (`fixed` controller), for each grid arm (`--arms
  all`) or the four corners (`--arms corners`); the best and the worst of them are marked, and a
  row whose devices could not all hold its arm (it then plays the nearest arm that fits) is
  footnoted with the share of client-rounds played elsewhere;
- `per-profile`: a hand-tuned arm per profile, slower devices smaller and more pruned
  (`per_profile`: on the scenario's grid TX2 4/0.2, Xavier NX 4/0, AGX Orin 16/0), or the
  arms of `--profile-arms` for a fleet of other profiles;
- `fedit`: the uniform baseline: a rank-8 global adapter, every device at rank 8, unpruned (a
  `fixed` controller with one arm, which is the same as none).

`--keep DIR` keeps every row's run directory in DIR (named by its label, seed and a hash of its
overrides) and reuses a finished one instead of running it again: a later command that changes
only the bandit reruns only the bandit rows, and its table still holds every row. Simulated times
do not depend on the machine, so rows from different commands compare exactly; reuse is the
user's call, so only rows whose code did not change should be kept across a code change.
`--rows PATTERN...` runs only the rows whose label matches one of the shell-style patterns (e.g.
`'bandit*'`); the table then needs the rest finished in DIR. One command at a time may use a
DIR (it is locked), so a run in progress is never taken for an unfinished one and started over.

Target: the central (deployed) loss (or, with `--metric accuracy`, accuracy) that `fedit` reaches at its last
round, unless `--target` is given. "sim s to target" is the simulated fleet time at the first round
that reaches it (mean over seeds; "—" if a seed never does), and the speedups are fedit's and the
best fixed arm's time over the row's. Final figures are means over seeds. `--window K` scores
each round by the mean of its last K evaluations, for the final figure and the time to target
alike: on a small held-out set one round's loss moves by up to 0.1 (docs/results/fedspine-lean-deployed.md).

At the same sparsity (FedSpine's comparison): the scenario's `pruning.deploy_ratios` (the TX2s
deploy at 0.2) make every row scored on the models the fleet would deploy, each device's pruned to
its profile's ratio (`fedsim.server.deployed`), and the bandit's contributions on them too (the
reward's `deploy_weight`, 0 by default, would also credit training at a device's deploy ratio); the metric is then
`deployed_loss` unless `--metric` says otherwise. `--set 'pruning.deploy_ratios={jetson-tx2=0}'`
compares the unpruned models instead.

The table and the command go to `--doc` (default docs/results/fedspine.md; none with
`--tiny` unless given), whose "## Reading" section is kept.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.printed import keep_printed, write_printed  # noqa: E402
from fedsim.cli import quiet_libraries  # noqa: E402
from fedsim.config.scenario import load_scenario  # noqa: E402
from fedsim.results.rundir import RunDir, read_metrics  # noqa: E402
from fedsim.runtime.simulation import run_simulations  # noqa: E402

SCENARIO = ROOT / "scenarios" / "fedspine-jetson-80.toml"
DOC = ROOT / "docs" / "results" / "fedspine.md"
SLOW_TO_FAST = ("jetson-tx2", "jetson-xavier-nx", "jetson-agx-orin")


def per_profile(ranks: list[int], ratios: list[float]) -> str:
    """The hand-tuned arms: the i-th slowest of n profiles gets the rank i/(n−1) of the way up the
    ranks and the ratio i/(n−1) of the way down the ratios (slowest: smallest rank, most pruned)."""
    n = len(SLOW_TO_FAST)
    arms = {
        p: (ranks[round(i * (len(ranks) - 1) / (n - 1))], ratios[round((n - 1 - i) * (len(ratios) - 1) / (n - 1))])
        for i, p in enumerate(SLOW_TO_FAST)
    }
    return "{" + ", ".join(f'"{p}" = [{r}, {q}]' for p, (r, q) in arms.items()) + "}"


def settings(
    arms: str,
    bandits: list[str],
    ranks: list[int],
    ratios: list[float],
    bandit_set: list[str] | None = None,
    profile_arms: str | None = None,
) -> dict[str, list[str]]:
    """Row label → scenario overrides (`bandit_set`: more, for the bandit rows only; `profile_arms`:
    the per-profile row's arms as a TOML table, instead of `per_profile`'s)."""
    grid = [(r, p) for r in ranks for p in ratios]
    if arms == "corners":
        grid = [(ranks[0], ratios[0]), (ranks[0], ratios[-1]), (ranks[-1], ratios[0]), (ranks[-1], ratios[-1])]
    space = [f"controller.ranks={ranks}", f"controller.ratios={ratios}", f"lora.rank={max(ranks)}"]
    rows = {f"bandit ({b})": [*space, f'controller.name="{b}"', *(bandit_set or [])] for b in bandits}
    rows |= {
        f"fixed {r}/{p:g}": [*space, 'controller.name="fixed"', f"controller.fixed_arm=[{r}, {p}]"] for r, p in grid
    }
    rows["per-profile"] = [
        *space,
        'controller.name="fixed"',
        f"controller.profile_arms={profile_arms or per_profile(ranks, ratios)}",
    ]
    rows["fedit"] = [
        "lora.rank=8",
        "controller.ranks=[8]",
        "controller.ratios=[0.0]",
        'controller.name="fixed"',
    ]  # = no controller
    return rows


def run_seed(
    seed: int, rows: dict[str, list[str]], extra: list[str], keep: Path | None = None, run: list[str] | None = None
) -> dict[str, object]:
    """Every row's metrics for one seed; the rows not already finished in `keep` (and, with `run`,
    matching one of its patterns) run in one Flower simulation. A row neither finished nor run is
    left out."""
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or Path(tmp)
        jobs, metrics = [], {}
        for label, overrides in rows.items():
            row_overrides = [*extra, *overrides]
            name = (
                f"{re.sub(r'[^A-Za-z0-9]+', '-', label).strip('-')}-s{seed}-"
                f"{hashlib.sha256(repr(row_overrides).encode()).hexdigest()[:8]}"
            )
            scenario = load_scenario(SCENARIO, [*row_overrides, f'name="{name}"'], seed=seed)
            if keep is not None and (done := _finished(keep / name, scenario.rounds)) is not None:
                metrics[label] = done
                continue
            if run is not None and not any(fnmatch.fnmatch(label, pattern) for pattern in run):
                continue
            if (keep is not None) and (keep / name).exists():
                shutil.rmtree(keep / name)  # an unfinished run: start it over
            jobs.append((label, scenario, RunDir.create(out, scenario)))
        if jobs:
            failures = run_simulations([(scenario, run_dir) for _, scenario, run_dir in jobs])
            if failures:
                raise RuntimeError(f"runs failed: {failures}")
        metrics |= {label: read_metrics(run_dir.path) for label, _, run_dir in jobs}
        return {label: metrics[label] for label in rows if label in metrics}


def _finished(path: Path, rounds: int):  # type: ignore[no-untyped-def]
    """The metrics of a run in `path` that reached its last round's central evaluation, else None."""
    try:
        m = read_metrics(path)
    except FileNotFoundError:
        return None
    return m if ((m["kind"] == "eval_central") & (m["round"] == rounds)).any() else None


def _lock(folder: Path):  # type: ignore[no-untyped-def]
    """An exclusive lock on `folder` for this process, or exit naming the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "w")  # noqa: SIM115 (held open: the lock lives as long as the file)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"{folder} is in use by another fedspine bench; wait for it or choose another --keep DIR")
    return handle


def central(metrics, deployed: bool = False, window: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(sim seconds, loss, accuracy) of the central evaluation, by round (`deployed`: of the
    fleet's deployed models, `pruning.deploy_ratios`); with `window` K > 1, each round's loss and
    accuracy are the mean of its last K evaluations (fewer at the start)."""
    c = metrics[metrics["kind"] == "eval_central"].sort_values("round")
    prefix = "deployed_" if deployed else ""
    loss, acc = (c[prefix + name].rolling(window, min_periods=1).mean().to_numpy() for name in ("loss", "accuracy"))
    return c["sim_time_s"].to_numpy(), loss, acc


def time_to(metrics, metric: str, target: float, window: int = 1) -> float:  # type: ignore[no-untyped-def]
    t, loss, acc = central(metrics, metric.startswith("deployed"), window)
    hit = loss <= target if metric.endswith("loss") else acc >= target
    return float(t[np.argmax(hit)]) if hit.any() else math.nan


def off_arm(metrics, label: str) -> float:  # type: ignore[no-untyped-def]
    """Share of a `fixed r/p` row's client-rounds played at another arm: `fixed` falls back to the
    nearest arm that fits a device's memory (`controllers.fixed`), so on a memory-limited fleet the
    row is not one arm for everybody. 0 for other rows."""
    arm = re.fullmatch(r"fixed (\d+)/([\d.]+)", label)
    t = metrics[metrics["kind"] == "train"]
    if arm is None or "arm_rank" not in t or t.empty:
        return 0.0
    t = t.dropna(subset=["arm_rank"])
    other = (t["arm_rank"] != int(arm[1])) | ((t["arm_ratio"] - float(arm[2])).abs() > 1e-9)
    return float(other.mean()) if len(t) else 0.0


def _speedup(reference: float, t: float) -> str:
    return "—" if math.isnan(t) or math.isnan(reference) or t == 0 else f"{reference / t:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CI-sized)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, help="override the scenario's rounds")
    parser.add_argument("--arms", choices=("all", "corners"), default="all")
    parser.add_argument(
        "--bandits",
        nargs="*",
        default=["sucb"],
        help="controllers to compare (the first is the headline; none: the baselines only)",
    )
    parser.add_argument(
        "--metric",
        choices=("loss", "accuracy", "deployed_loss", "deployed_accuracy"),
        help="deployed_*: of the fleet's deployed models (`pruning.deploy_ratios`); default: deployed_loss when the "
        "scenario has deploy ratios, else loss",
    )
    parser.add_argument("--target", type=float, help="default: fedit's final value")
    parser.add_argument(
        "--window",
        type=int,
        default=1,
        metavar="K",
        help="score each round by the mean of its last K central evaluations (final: the last K rounds' mean): one "
        "round's evaluation swings with a small held-out set",
    )
    parser.add_argument("--ranks", type=int, nargs="+", help="the arm grid's ranks (default: the scenario's)")
    parser.add_argument("--ratios", type=float, nargs="+", help="the arm grid's ratios (default: the scenario's)")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep the rows' runs in DIR and reuse the finished ones"
    )
    parser.add_argument(
        "--rows", nargs="+", metavar="PATTERN", help="with --keep: run only these rows (shell patterns of labels)"
    )
    parser.add_argument(
        "--bandit-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="scenario overrides for the bandit rows only (repeatable): tune the bandit, keep the baselines",
    )
    parser.add_argument(
        "--profile-arms",
        metavar="TOML",
        help="the per-profile row's arms, e.g. '{\"jetson-tx2\" = [4, "
        "0.2]}' (default: slower profiles smaller and more pruned)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more scenario overrides (repeatable)"
    )
    parser.add_argument(
        "--doc",
        type=Path,
        metavar="PATH",
        help="write the table and this command to PATH, keeping its '## "
        f"Reading' (default {DOC.relative_to(ROOT)}; with --tiny, none)",
    )
    args = parser.parse_args()
    quiet_libraries()
    extra = (
        (["model.name=tiny-llama"] if args.tiny else []) + ([f"rounds={args.rounds}"] if args.rounds else []) + args.set
    )
    base = load_scenario(SCENARIO, extra)
    grid = base.controller
    assert grid is not None  # the scenario has a [controller]
    args.metric = args.metric or ("deployed_loss" if any(base.pruning.deploy_ratios.values()) else "loss")
    rows = settings(
        args.arms,
        args.bandits,
        args.ranks or list(grid.ranks),
        args.ratios or list(grid.ratios),
        args.bandit_set,
        args.profile_arms,
    )
    if args.rows and not args.keep:
        parser.error("--rows needs --keep DIR: the other rows come from there")
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    lock = _lock(args.keep) if args.keep else None  # noqa: F841 (held until the process ends)
    per_seed = [run_seed(s, rows, extra, args.keep, args.rows) for s in args.seeds]
    with keep_printed() as printed:
        report(args, rows, per_seed)
    doc = args.doc or (None if args.tiny else DOC)
    if doc is not None:
        write_printed(doc, "FedSpine's experiment: the bandit against fixed arms", printed.getvalue())


def report(args: argparse.Namespace, rows: dict[str, list[str]], per_seed: list[dict[str, object]]) -> None:
    """Print the table: every finished row's final figures and time to target, best and worst fixed arm marked."""
    if missing := [label for label in rows if any(label not in m for m in per_seed)]:
        print(
            f"finished so far; not yet in {args.keep}: {', '.join(missing)} "
            "(best and worst below: of the finished rows)"
        )
        rows = {label: v for label, v in rows.items() if label not in missing}
        if "fedit" not in rows or not any(label.startswith("fixed") for label in rows):
            return
    deployed = args.metric.startswith("deployed")
    final = {
        label: np.mean([[central(m[label], deployed, args.window)[i][-1] for i in (0, 1, 2)] for m in per_seed], axis=0)
        for label in rows
    }
    column = 1 if args.metric.endswith("loss") else 2
    target = args.target if args.target is not None else float(final["fedit"][column])
    reach = {label: np.mean([time_to(m[label], args.metric, target, args.window) for m in per_seed]) for label in rows}
    fixed = [label for label in rows if label.startswith("fixed")]
    sign = 1 if args.metric.endswith("loss") else -1
    better = (lambda a, b: a < b) if sign > 0 else (lambda a, b: a > b)
    best = min(fixed, key=lambda label: (math.isnan(reach[label]), reach[label], final[label][column] * sign))
    worst = max(
        fixed, key=lambda label: (math.isnan(reach[label]), np.nan_to_num(reach[label]), final[label][column] * sign)
    )
    print(
        f"\nfedspine-jetson-80{' (tiny)' if args.tiny else ''}, seeds {args.seeds}; target {args.metric} "
        f"{'<=' if sign > 0 else '>='} {target:.4f} (fedit's final unless --target)"
        f"{f'; each round the mean of its last {args.window}' if args.window > 1 else ''}"
    )
    head = "deployed " if deployed else "final "
    print(
        f"{'row':<22} {head + 'loss':>13} {head + 'acc':>12} {'sim s (run)':>11} {'sim s to target':>15} "
        f"{'x fedit':>7} {'x best fixed':>12}"
    )
    for label in rows:
        s, loss, acc = final[label]
        note = " (best fixed)" if label == best else " (worst fixed)" if label == worst else ""
        t = reach[label]
        print(
            f"{label + note:<22} {loss:>13.4f} {acc:>12.3f} {s:>11.4g} {'—' if math.isnan(t) else f'{t:.4g}':>15} "
            f"{_speedup(reach['fedit'], t):>7} {_speedup(reach[best], t):>12}"
        )
    for label in fixed:
        if share := np.mean([off_arm(m[label], label) for m in per_seed]):
            print(f"  {label}: {share:.0%} of its client-rounds at a nearer arm that fits the device's memory")
    headline = f"bandit ({args.bandits[0]})" if args.bandits else ""
    if headline not in rows:
        return
    verdict = better(final[headline][column], final[best][column])
    print(
        f"\n{headline} vs best fixed arm{' finished' if missing else ''} ({best}): final {args.metric} "
        f"{'better' if verdict else 'not better'}"
    )


if __name__ == "__main__":
    main()
