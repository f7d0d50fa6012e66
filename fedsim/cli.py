"""The `fedsim` command line.

    fedsim run SCENARIO [--out DIR] [--set dotted.key=value ...] [--seed N]
    fedsim resume RUN_DIR [--rounds N]               # go on from the last complete round
    fedsim compare SCENARIO --strategies a,b,... [--seeds N] [--baseline S] [--target ACC] [--out DIR] [--set k=v ...]
    fedsim report RUN_DIR [--target ACC] [--arms]
    fedsim export RUN_DIR --device PROFILE | --client ID [--out DIR]   # a device's pruned model, adapter merged
    fedsim dashboard [RUNS_ROOT] [--host H] [--port P] [--poll S]
    fedsim models
    fedsim tasks
    fedsim deploy certs|keys|superlink|register|run|local ...   # real SuperNodes (runtime/deploy/commands.py)
    fedsim supernode SCENARIO --partition N --superlink HOST:PORT --ca CA --key KEY

Exit codes: 0 success, 1 the run failed while running, 2 bad input (scenario, arguments, an
existing run directory, and what `fedsim.server.preflight` finds: fleet files, model, data) — in
which case nothing was written. A run that fails while running prints one line, `fedsim: run NAME
failed: Type: message (traceback in RUN_DIR/error.log)`; the traceback is in that file, never on
the terminal (KeyboardInterrupt is not caught).

Each command imports what it uses inside its own function, so that `fedsim --help` and the
deployment commands start in under a second without loading torch or Ray; the layering contract
(`lint-imports`) sees those imports like any other.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config.errors import EXIT_BAD_INPUT, EXIT_FAILED
from fedsim.runtime.deploy.commands import add_parsers as add_deploy_parsers

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only in the command that needs them
    from fedsim.config.scenario import Scenario
    from fedsim.results.rundir import RunDir
    from fedsim.server.resume import ResumePoint


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


def failure_line(what: str, exc: BaseException, log: Path | str) -> str:
    """`fedsim: WHAT failed: Type: message (traceback in LOG)`, the message on one line."""
    message = " ".join(str(exc).split())
    return f"fedsim: {what} failed: {type(exc).__name__}{': ' + message if message else ''} (traceback in {log})"


def _simulate(scenario: Scenario, run_dir: RunDir, resume: ResumePoint | None = None) -> int:
    """Run (or resume) the simulation, print the summary. A run that fails keeps what it saved,
    records `run_failed` and its traceback (error.log) and prints one line: exit 1."""
    from fedsim.results.report import summary_text
    from fedsim.results.rundir import read_metrics
    from fedsim.runtime.simulation import run_simulation

    try:
        run_simulation(scenario, run_dir, progress=_progress, resume=resume)
    except Exception as exc:  # the run started: one line here, the traceback in its log; not KeyboardInterrupt
        print(failure_line(f"run {scenario.name}", exc, _record_failure(run_dir, exc)), file=sys.stderr)
        return EXIT_FAILED
    print(summary_text(read_metrics(run_dir.path), run_dir.path))
    return 0


def _record_failure(run_dir: RunDir, exc: BaseException) -> str:
    """Record the failure in the run directory (`RunDir.fail`); where its traceback is."""
    try:
        return str(run_dir.fail(exc))
    except OSError as err:  # the run directory is gone or full: say so instead
        return f"nowhere: {run_dir.error_log_path} could not be written: {err}"


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.config.scenario import ScenarioError, load_scenario
    from fedsim.results.rundir import RunDir, RunExistsError
    from fedsim.server.preflight import preflight

    try:
        track = [f"tracking.backends={list(args.track)!r}".replace("'", '"')] if args.track else []
        scenario = load_scenario(args.scenario, [*(args.set or []), *track], seed=args.seed)
        preflight(scenario, args.scenario)
        run_dir = RunDir.create(Path(args.out), scenario)
    except (ScenarioError, RunExistsError) as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    print(
        f"fedsim: {scenario.name}: {scenario.model.name} on {scenario.data.task}, {scenario.clients.num_clients} "
        f"clients ({scenario.clients.per_round}/round), {scenario.rounds} rounds, strategy {scenario.strategy.name}, "
        f"seed {scenario.seed}",
        flush=True,
    )
    return _simulate(scenario, run_dir)


def cmd_resume(args: argparse.Namespace) -> int:
    from fedsim.config.scenario import ScenarioError, load_scenario
    from fedsim.results.rundir import RunDir
    from fedsim.server.preflight import preflight
    from fedsim.server.resume import resume_point

    try:
        run_dir = RunDir.open(Path(args.run_dir))
        source = str(run_dir.path / "scenario.toml")
        scenario = load_scenario(source, [f"rounds={args.rounds}"] if args.rounds else [])
        preflight(scenario, source)
        point = resume_point(run_dir, scenario)
    except (ScenarioError, FileNotFoundError, ValueError) as exc:
        print(f"fedsim resume: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir.save_scenario(scenario)

    lost = f"; not restored: {', '.join(point.lost)}" if point.lost else ""
    print(f"fedsim: {scenario.name}: resuming after round {point.server_round} of {scenario.rounds}{lost}", flush=True)
    return _simulate(scenario, run_dir, point)


def cmd_compare(args: argparse.Namespace) -> int:
    from fedsim.results.rundir import ERROR_LOG, append_traceback
    from fedsim.runtime.compare import CompareError, kept_problems, plan, run_all, write_outputs
    from fedsim.runtime.simulation import run_simulations

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    root = Path(args.out) / f"{Path(args.scenario).stem}-compare"
    try:
        runs = plan(args.scenario, strategies, args.seeds, args.set or [], args.baseline)
        if problems := kept_problems(runs, root):
            raise CompareError(args.scenario, problems)
    except CompareError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    root.mkdir(parents=True, exist_ok=True)
    try:
        failures = run_all(
            runs,
            root,
            lambda line: print(f"fedsim compare: {line}", flush=True),
            lambda jobs: run_simulations(jobs, progress=_progress),
        )
    except Exception as exc:  # the simulation itself (Ray, Flower), not one run: the log is the comparison's
        print(failure_line(f"compare {root.name}", exc, append_traceback(root / ERROR_LOG, exc)), file=sys.stderr)
        return EXIT_FAILED
    if failures:
        for run_dir, failure in failures:
            print(failure_line(f"run {run_dir.path.name}", failure, run_dir.error_log_path), file=sys.stderr)
        print(
            "fedsim compare: failed runs are recorded in their run "
            f"directories under {root}; run the command again to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        text = write_outputs(runs, root, args.target, args.baseline, ["fedsim", *args.argv])
    except ValueError as exc:  # runs at one seed scored on different held-out sets
        print(f"fedsim compare: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(text)
    plots = ("accuracy_vs_round.png", "accuracy_vs_sim_time.png", "loss_vs_round.png")
    print(f"table: {root / 'comparison.csv'} and .md; plots: {', '.join(str(root / p) for p in plots)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.results.report import arms_table, ratio_table, round_table, target_line
    from fedsim.results.rundir import read_metrics

    try:
        metrics = read_metrics(args.run_dir)
    except FileNotFoundError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.arms:
        print(round_table(metrics).to_string(float_format=lambda v: f"{v:.4f}"))
    else:
        arms = arms_table(metrics)
        if arms.empty:
            print(f"fedsim report: {args.run_dir} ran without a controller: no arms to show", file=sys.stderr)
            return EXIT_BAD_INPUT
        print("arms the controller settled on, per device profile (most chosen over the last third of the rounds):")
        print(arms.to_string(float_format=lambda v: f"{v:.3f}"))
        return 0
    ratios = ratio_table(metrics)
    if len(ratios):
        print("\nfinal adapter on each target ratio's pruned model (central test set):")
        print(ratios.to_string(float_format=lambda v: f"{v:.4f}"))
    for target in args.target or []:
        print(target_line(metrics, target))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedsim.config.errors import InputError
    from fedsim.server.export import export

    run_dir = Path(args.run_dir)
    name = args.device if args.client is None else f"client-{args.client}"
    out = Path(args.out) if args.out else run_dir / "export" / name
    if not (run_dir / "adapter").is_dir() or not (run_dir / "scenario.toml").is_file():
        print(f"fedsim export: {run_dir} is not a finished fedsim run (no adapter/ or scenario.toml)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        exported = export(run_dir, out, profile=args.device, client=args.client)
    except (InputError, ValueError, FileExistsError) as exc:
        print(f"fedsim export: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    params = sum(p.numel() for p in exported.model.parameters())
    print(f"{out}: {name}'s model, {exported.ratio:.1%} of the prunable parameters removed, "
          f"{params / 1e6:.2f} M parameters"
          + (f" ({exported.padding:.1%} zero padding to uniform layers)" if exported.padding else "")
          + "; AutoModelForCausalLM.from_pretrained(path) loads it")  # fmt: skip
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedsim.model.loader import list_models

    for m in list_models():
        print(f"{m.name:<16} {m.description}")
    print("(or any local model folder, or a Hugging Face id org/name when online)")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from fedsim.data.tasks import list_tasks

    for t in list_tasks():
        print(f"{t.name:<12} {t.description}  [domains: {', '.join(t.domains)}]")
    print("(or your own .jsonl/.json/.csv/.parquet with prompt/response or instruction/output fields)")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboards import main as dashboard_main

    return dashboard_main([args.runs_root, "--host", args.host, "--port", str(args.port), "--poll", str(args.poll)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim",
        description="Simulate federated LoRA fine-tuning of a language model on a fleet of devices (Flower + Ray).",
        epilog="Start with: fedsim run scenarios/quickstart.toml",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a scenario and write a run directory",
        description="Run a scenario file on Flower's simulation engine.",
    )
    run.add_argument("scenario", help="scenario TOML file, e.g. scenarios/quickstart.toml")
    run.add_argument("--out", default="runs", help="parent folder of the run directory (default: runs)")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a scenario value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument(
        "--track",
        action="append",
        choices=("tensorboard", "mlflow", "wandb"),
        help="log the run to this tracker (repeatable; replaces the scenario's `tracking.backends`)",
    )
    run.set_defaults(func=cmd_run)

    res = sub.add_parser(
        "resume",
        help="go on with a stopped run from its last complete round",
        description="Go on with a run that was killed, failed, or finished, from its last complete round (its "
        "checkpoint: adapter, pruning record, controller state), with the same seeds. --rounds N extends it.",
    )
    res.add_argument("run_dir", help="a run directory")
    res.add_argument("--rounds", type=int, help="run up to N rounds in all (default: the scenario's)")
    res.set_defaults(func=cmd_resume)

    compare = sub.add_parser(
        "compare",
        help="run a scenario once per strategy and seed, and compare them",
        description="Run a scenario once per strategy and seed (resumable), then write a comparison table (mean and "
        "95 % intervals over seeds and held-out examples, differences from --baseline) and plots.",
    )
    compare.add_argument("scenario", help="scenario TOML file")
    compare.add_argument(
        "--strategies", required=True, help="comma-separated strategy names, e.g. fedit,fedprox,fedadam"
    )
    compare.add_argument(
        "--seeds", type=int, default=3, help="seeds per strategy, from the scenario's seed on (default: 3)"
    )
    compare.add_argument(
        "--baseline",
        default="fedit",
        help="strategy the others are compared with, paired by seed; one of --strategies (default: fedit)",
    )
    compare.add_argument(
        "--target", type=float, default=0.3, help="central accuracy for the time-to-accuracy column (default: 0.3)"
    )
    compare.add_argument("--out", default="runs", help="parent folder of the comparison folder (default: runs)")
    compare.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a scenario value for every run (repeatable)"
    )
    compare.set_defaults(func=cmd_compare)

    report = sub.add_parser(
        "report", help="print a run's per-round table", description="Print the per-round table of a run directory."
    )
    report.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    report.add_argument(
        "--target",
        type=float,
        action="append",
        metavar="ACC",
        help="also print the simulated time to reach this central accuracy (repeatable)",
    )
    report.add_argument(
        "--arms",
        action="store_true",
        help="instead: per device profile, the (rank, ratio) arm the controller settled on",
    )
    report.set_defaults(func=cmd_report)

    exp = sub.add_parser(
        "export",
        help="write a device's pruned model with the adapter merged",
        description="Write the final adapter merged into the pruned model one device deploys (with deploy ratios, "
        "the model the run scored it on), loadable with transformers' AutoModelForCausalLM.from_pretrained.",
    )
    exp.add_argument("run_dir", help="a finished run directory")
    which = exp.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--device", metavar="PROFILE", help="device profile, e.g. jetson-tx2: the model of its most trained client"
    )
    which.add_argument("--client", type=int, metavar="ID", help="one client id: the model that device deploys")
    exp.add_argument("--out", help="output folder (default: RUN_DIR/export/PROFILE or RUN_DIR/export/client-ID)")
    exp.set_defaults(func=cmd_export)

    dash = sub.add_parser(
        "dashboard",
        help="serve a web dashboard over run directories",
        description="Serve a web dashboard (Plotly Dash) over the run directories under RUNS_ROOT, at any depth: "
        "runs, one run's curves and fleet, comparisons with seeds grouped; runs in progress update in place.",
    )
    dash.add_argument(
        "runs_root", nargs="?", default="runs", help="folder of run directories, or a compare folder (default: runs)"
    )
    dash.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; there is no authentication)"
    )
    dash.add_argument("--port", type=int, default=8050, help="port (default: 8050; 0 = any free port)")
    dash.add_argument("--poll", type=float, default=5.0, help="seconds between checks of a running run (default: 5)")
    dash.set_defaults(func=cmd_dashboard)

    add_deploy_parsers(sub)
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: `fedsim compare` writes it down
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
