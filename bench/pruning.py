"""Structured pruning on SmolLM2: a training step's time and memory, and accuracy after a federation, per ratio.

    .venv/bin/python bench/pruning.py                                   # both parts, ~15 min on 2 idle cores
    .venv/bin/python bench/pruning.py --skip-step                       # the federated part alone
    .venv/bin/python bench/pruning.py --scenario scenarios/tiny.toml --skip-step --doc /tmp/p.md  # a smoke run, ~1 min
    .venv/bin/python bench/pruning.py --skip-step --ratios 0 0.25 --set pruning.importance=activation --doc /tmp/a.md

Part 1, one training step (`bench/pruning_step.py`, whose docstring explains the method): time and
peak memory at ratios 0, 0.25, 0.5 relative to ratio 0, same batch, same process, with the FLOP
ratio from `fedsim.fleet.costs` beside them.

Part 2, a short federation per ratio: the quickstart scenario (SmolLM2, 4 clients, 2 per round, 4
rounds, seed 0) with every client pruned to the same target ratio, all runs in one Flower
simulation. Same seed, same data, same LoRA (r 8 on q_proj, v_proj and up_proj: FedSpine's
lora_grad score needs LoRA on an MLP projection, so the ratio-0 baseline has it too). The schedule
is shortened to the run: 2 prune events 8 steps apart, so a client reaches its target at the start
of its second round (`pruning.events=2`, `pruning.interval_steps=8`). Columns:

- central acc/loss: the global adapter on the unpruned model (the server's usual evaluation);
- pruned acc/loss: the global adapter on the ratio's pruned model (the `eval_export` row: what a
  device would deploy with `fedsim export`);
- sim s: simulated fleet time of the run; FLOPs x: mean client training FLOPs per round against
  ratio 0; down x: mean bytes sent to a client per round against ratio 0.

Both tables and the command go to `--doc` (default docs/results/pruning.md), whose "## Reading"
section is kept; `--set KEY=VALUE` overrides the scenario of part 2 (e.g. the importance score).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.printed import keep_printed, write_printed  # noqa: E402
from fedsim.cli import quiet_libraries  # noqa: E402
from fedsim.config.scenario import load_scenario  # noqa: E402
from fedsim.results.rundir import RunDir, read_metrics  # noqa: E402
from fedsim.runtime.simulation import run_simulations  # noqa: E402

SHORT_SCHEDULE = ["pruning.events=2", "pruning.interval_steps=8", 'lora.target_modules=["q_proj", "v_proj", "up_proj"]']


def federated(
    scenario_path: str, ratios: list[float], rounds: int | None, overrides: tuple[str, ...] = ()
) -> dict[float, dict[str, float]]:
    """One federation per ratio, all in one simulation; their final figures."""
    extra = [*([f"rounds={rounds}"] if rounds else []), *overrides]
    results: dict[float, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for r in ratios:
            scenario = load_scenario(
                scenario_path, [*SHORT_SCHEDULE, *extra, f"pruning.ratio={r}", f"name=pruning-{r}"]
            )
            jobs.append((scenario, RunDir.create(Path(tmp), scenario)))
        failures = run_simulations(jobs)
        if failures:
            raise RuntimeError(f"runs failed: {failures}")
        for r, (scenario, run_dir) in zip(ratios, jobs):
            m = read_metrics(run_dir.path)
            central = m[(m["kind"] == "eval_central") & (m["round"] == scenario.rounds)].iloc[0]
            exported = m[m["kind"] == "eval_export"]
            train = m[(m["kind"] == "train") & (m["status"] == "ok")]
            results[r] = {
                "central_acc": float(central["accuracy"]), "central_loss": float(central["loss"]),
                "sim_s": float(central["sim_time_s"]),
                "pruned_acc": float(exported["accuracy"].iloc[0]) if len(exported) else float(central["accuracy"]),
                "pruned_loss": float(exported["loss"].iloc[0]) if len(exported) else float(central["loss"]),
                "ratio": float(exported["prune_ratio"].iloc[0]) if len(exported) else 0.0,
                "flops": float(train["flops"].mean()), "down": float(train["bytes_down"].mean()),
            }  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(ROOT / "scenarios" / "quickstart.toml"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--rounds", type=int, help="override the scenario's rounds")
    parser.add_argument("--skip-step", action="store_true", help="skip part 1 (the training step)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="scenario override for part 2 (repeatable)"
    )
    parser.add_argument(
        "--doc",
        type=Path,
        default=ROOT / "docs" / "results" / "pruning.md",
        help="where the tables and the command are written",
    )
    args = parser.parse_args()
    if args.ratios[0] != 0.0:
        parser.error("--ratios must start with 0, the reference")
    printed = io.StringIO()
    if not args.skip_step:
        with keep_printed(printed):
            print("## Part 1: one training step (bench/pruning_step.py)", flush=True)
            step = [sys.executable, str(ROOT / "bench" / "pruning_step.py"), "--ratios", *map(str, args.ratios)]
            print(subprocess.run(step, check=True, stdout=subprocess.PIPE, text=True).stdout, end="")
    quiet_libraries()
    with keep_printed(printed):
        print(
            f"\n## Part 2: a federation per ratio ({Path(args.scenario).name}, "
            f"{' '.join([*SHORT_SCHEDULE, *args.set])})",
            flush=True,
        )
    res = federated(args.scenario, args.ratios, args.rounds, tuple(args.set))
    with keep_printed(printed):
        table(res)
    write_printed(args.doc, "Structured pruning on SmolLM2 (bench/pruning.py)", printed.getvalue())


def table(res: dict[float, dict[str, float]]) -> None:
    """Part 2's table: each ratio's final figures, costs relative to ratio 0."""
    ref = res[0.0]
    print(
        f"{'target':>6} {'ratio':>6} {'central acc':>11} {'central loss':>12} {'pruned acc':>10} {'pruned loss':>11} "
        f"{'sim s':>7} {'FLOPs x':>7} {'down x':>6}"
    )
    for r, x in res.items():
        print(
            f"{r:>6.2f} {x['ratio']:>6.3f} {x['central_acc']:>11.3f} {x['central_loss']:>12.4f} "
            f"{x['pruned_acc']:>10.3f} {x['pruned_loss']:>11.4f} "
            f"{x['sim_s']:>7.1f} {x['flops'] / ref['flops']:>7.2f} {x['down'] / ref['down']:>6.2f}"
        )


if __name__ == "__main__":
    main()
