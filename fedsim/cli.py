"""The `fedsim` command line.

    fedsim run SCENARIO [--out DIR] [--set dotted.key=value ...] [--seed N]
    fedsim compare SCENARIO --strategies a,b,... [--seeds N] [--target ACC] [--out DIR] [--set k=v ...]
    fedsim report RUN_DIR [--target ACC]
    fedsim dashboard [RUNS_ROOT] [--host H] [--port P]
    fedsim models
    fedsim tasks

Exit codes: 0 success, 1 the run failed while running, 2 bad input (scenario, arguments, an
existing run directory) — in which case nothing was written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def _progress(summary: dict[str, Any]) -> None:
    r, n = summary["round"], summary["rounds"]
    train = "      -     " if r == 0 else f"{summary['train_loss']:9.4f}   "
    failed = f"  ({summary['clients_failed']} failed)" if summary["clients_failed"] else ""
    lost = f"  ({summary['clients_lost']} lost: straggler/dropped/infeasible)" if summary.get("clients_lost") else ""
    print(
        f"round {r:>3}/{n:<3} train loss {train} central loss {summary['central_loss']:8.4f}"
        f"  accuracy {summary['central_accuracy']:6.3f}  sim {_duration(summary['sim_time_s']):>8}"
        f"  elapsed {summary['elapsed_s']:7.1f}s{failed}{lost}",
        flush=True,
    )


def _duration(seconds: float) -> str:
    """Simulated time for people: 42.0s, 13.5m, 2.25h."""
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.2f}h"


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.preflight import preflight
    from fedsim.report import summary_text
    from fedsim.rundir import RunDir, RunExistsError, read_metrics
    from fedsim.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(args.scenario, args.set or [], seed=args.seed)
        preflight(scenario, args.scenario)
        run_dir = RunDir.create(Path(args.out), scenario)
    except (ScenarioError, RunExistsError) as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from fedsim.simulation import run_simulation

    print(
        f"fedsim: {scenario.name}: {scenario.model.name} on {scenario.data.task}, {scenario.clients.num_clients} clients "
        f"({scenario.clients.per_round}/round), {scenario.rounds} rounds, strategy {scenario.strategy.name}, seed {scenario.seed}",
        flush=True,
    )
    try:
        run_simulation(scenario, run_dir, progress=_progress)
    except Exception as exc:  # the run started: report, keep what was saved
        run_dir.event("run_failed", error=repr(exc))
        logging.getLogger("fedsim").exception("run failed")
        print(f"fedsim: run failed: {exc}\nwhat was saved is in {run_dir.path}", file=sys.stderr)
        return EXIT_FAILED
    print(summary_text(read_metrics(run_dir.path), run_dir.path))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedsim.compare import plan, run_all, write_outputs
    from fedsim.scenario import ScenarioError
    from fedsim.simulation import run_simulation

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        runs = plan(args.scenario, strategies, args.seeds, args.set or [])
    except ScenarioError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    root = Path(args.out) / f"{Path(args.scenario).stem}-compare"
    root.mkdir(parents=True, exist_ok=True)
    try:
        run_all(runs, root, args.scenario, lambda line: print(f"fedsim compare: {line}", flush=True), lambda s, d: run_simulation(s, d, progress=_progress))
    except ScenarioError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    table = write_outputs(runs, root, args.target)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"\ntable: {root / 'comparison.csv'} and .md; plots: {root / 'accuracy_vs_round.png'}, {root / 'accuracy_vs_sim_time.png'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.report import round_table, time_to_accuracy
    from fedsim.rundir import read_metrics

    try:
        metrics = read_metrics(args.run_dir)
    except FileNotFoundError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(round_table(metrics).to_string(float_format=lambda v: f"{v:.4f}"))
    for target in args.target or []:
        hit = time_to_accuracy(metrics, target)
        print(
            f"time to accuracy {target:g}: "
            + (f"round {hit[0]}, {hit[1]:.1f}s simulated" if hit else "not reached")
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedsim.models import list_models

    for m in list_models():
        print(f"{m.name:<16} {m.description}")
    print("(or any local model folder, or a Hugging Face id org/name when online)")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from fedsim.tasks import list_tasks

    for t in list_tasks():
        print(f"{t.name:<12} {t.description}  [domains: {', '.join(t.domains)}]")
    print("(or your own .jsonl/.json/.csv/.parquet with prompt/response or instruction/output fields)")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboards import main as dashboard_main

    return dashboard_main([args.runs_root, "--host", args.host, "--port", str(args.port)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim",
        description="Simulate federated LoRA fine-tuning of a language model on a fleet of devices (Flower + Ray).",
        epilog="Start with: fedsim run scenarios/quickstart.toml",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a scenario and write a run directory", description="Run a scenario file on Flower's simulation engine.")
    run.add_argument("scenario", help="scenario TOML file, e.g. scenarios/quickstart.toml")
    run.add_argument("--out", default="runs", help="parent folder of the run directory (default: runs)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario value, e.g. --set train.lr=1e-4 (repeatable)")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser("compare", help="run a scenario once per strategy and seed, and compare them", description="Run a scenario once per strategy and seed (resumable), then write a comparison table and plots.")
    compare.add_argument("scenario", help="scenario TOML file")
    compare.add_argument("--strategies", required=True, help="comma-separated strategy names, e.g. fedit,fedprox,fedadam")
    compare.add_argument("--seeds", type=int, default=1, help="seeds per strategy, from the scenario's seed on (default: 1)")
    compare.add_argument("--target", type=float, default=0.3, help="central accuracy for the time-to-accuracy column (default: 0.3)")
    compare.add_argument("--out", default="runs", help="parent folder of the comparison folder (default: runs)")
    compare.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario value for every run (repeatable)")
    compare.set_defaults(func=cmd_compare)

    report = sub.add_parser("report", help="print a run's per-round table", description="Print the per-round table of a run directory.")
    report.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    report.add_argument("--target", type=float, action="append", metavar="ACC", help="also print the simulated time to reach this central accuracy (repeatable)")
    report.set_defaults(func=cmd_report)

    dash = sub.add_parser("dashboard", help="serve a web dashboard over run directories", description="Serve a web dashboard over the run directories under RUNS_ROOT.")
    dash.add_argument("runs_root", nargs="?", default="runs", help="folder holding run directories (default: runs)")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8050, help="port (default: 8050; 0 = any free port)")
    dash.set_defaults(func=cmd_dashboard)

    sub.add_parser("models", help="list the built-in models").set_defaults(func=cmd_models)
    sub.add_parser("tasks", help="list the built-in tasks").set_defaults(func=cmd_tasks)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for fedsim's own progress: libraries' deprecation notes and progress
    bars (datasets, transformers, Ray, Flower's run_simulation notice) are not for our users."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # e.g. Ray's note on GPU env vars
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import transformers
    from flwr.supercore.logger import FLOWER_LOGGER, update_console_handler

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # Flower's logger is DEBUG with its own console handler: keep errors (a crashed client's
    # traceback), and do not let its records reach the root handler a second time.
    update_console_handler(level=logging.ERROR)
    FLOWER_LOGGER.propagate = False


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
