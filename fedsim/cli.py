"""The `fedsim` command line.

    fedsim run SCENARIO [--out DIR] [--set dotted.key=value ...] [--seed N]
    fedsim resume RUN_DIR [--rounds N]               # go on from the last complete round
    fedsim compare SCENARIO --strategies a,b,... [--seeds N] [--baseline S] [--target ACC] [--out DIR] [--set k=v ...]
    fedsim report RUN_DIR [--target ACC] [--arms]
    fedsim export RUN_DIR --device PROFILE | --client ID [--out DIR]   # a device's pruned model, adapter merged
    fedsim dashboard [RUNS_ROOT] [--host H] [--port P]
    fedsim models
    fedsim tasks
    fedsim deploy certs DIR [--host H ...]          # local CA + SuperLink certificate (TLS)
    fedsim deploy keys DIR --nodes N                # SuperNode key pairs (node authentication)
    fedsim deploy superlink --certs DIR [--host H] [--port P] [-- FLOWER_ARGS]
    fedsim supernode SCENARIO --partition N --superlink HOST:PORT --ca CA --key KEY [-- FLOWER_ARGS]
    fedsim deploy local SCENARIO [--nodes N] [--set k=v ...] [--out DIR]   # all of it on this machine

Exit codes: 0 success, 1 the run failed while running, 2 bad input (scenario, arguments, an
existing run directory) — in which case nothing was written.

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

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only in the command that needs them
    from fedsim.config.scenario import Scenario
    from fedsim.results.rundir import RunDir
    from fedsim.server.resume import ResumePoint

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


def _simulate(scenario: Scenario, run_dir: RunDir, resume: ResumePoint | None = None) -> int:
    """Run (or resume) the simulation, print the summary; a run that fails keeps what it saved."""
    from fedsim.results.report import summary_text
    from fedsim.results.rundir import read_metrics
    from fedsim.runtime.simulation import run_simulation

    try:
        run_simulation(scenario, run_dir, progress=_progress, resume=resume)
    except Exception as exc:  # the run started: report, keep what was saved
        run_dir.event("run_failed", error=repr(exc))
        logging.getLogger("fedsim").exception("run failed")
        print(f"fedsim: run failed: {exc}\nwhat was saved is in {run_dir.path}", file=sys.stderr)
        return EXIT_FAILED
    print(summary_text(read_metrics(run_dir.path), run_dir.path))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.config.scenario import ScenarioError, load_scenario
    from fedsim.results.rundir import RunDir, RunExistsError
    from fedsim.server.preflight import preflight

    try:
        scenario = load_scenario(args.scenario, args.set or [], seed=args.seed)
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
    from fedsim.config.scenario import ScenarioError
    from fedsim.runtime.compare import CompareError, plan, run_all, write_outputs
    from fedsim.runtime.simulation import run_simulations

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        runs = plan(args.scenario, strategies, args.seeds, args.set or [], args.baseline)
    except CompareError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    root = Path(args.out) / f"{Path(args.scenario).stem}-compare"
    root.mkdir(parents=True, exist_ok=True)
    try:
        failures = run_all(
            runs,
            root,
            args.scenario,
            lambda line: print(f"fedsim compare: {line}", flush=True),
            lambda jobs: run_simulations(jobs, progress=_progress),
        )
    except ScenarioError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if failures:
        for failure in failures:
            print(f"fedsim compare: a run failed: {failure!r}", file=sys.stderr)
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
    from fedsim.results.report import arms_table, ratio_table, round_table, time_to_accuracy
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
        hit = time_to_accuracy(metrics, target)
        print(f"time to accuracy {target:g}: " + (f"round {hit[0]}, {hit[1]:.1f}s simulated" if hit else "not reached"))
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

    return dashboard_main([args.runs_root, "--host", args.host, "--port", str(args.port)])


def _insecure_warning() -> None:
    from fedsim.runtime.deploy import INSECURE_WARNING

    print(f"fedsim: WARNING: {INSECURE_WARNING}", file=sys.stderr)


def _flower_args(args: argparse.Namespace) -> list[str]:
    extra = list(args.flower_args or [])
    return extra[1:] if extra[:1] == ["--"] else extra


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy import DeployError, make_certificates

    try:
        certs = make_certificates(args.dir, args.host or [], days=args.days)
    except DeployError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    hosts = ", ".join(["127.0.0.1", "::1", "localhost", *(args.host or [])])
    print(f"CA certificate   {certs.ca}   (copy it to every SuperNode and to where you run `flwr`)")
    print(f"CA key           {certs.ca.with_name('ca.key')}   (keep it private; only signs certificates)")
    print(f"SuperLink cert   {certs.cert}  valid for {hosts}, {args.days} days")
    print(f"SuperLink key    {certs.key}")
    print(f"next: fedsim deploy superlink --certs {args.dir}")
    return 0


def cmd_deploy_keys(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy import CONNECTION, DeployError, make_node_keys

    try:
        keys = make_node_keys(args.dir, args.nodes, prefix=args.prefix)
    except DeployError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for k in keys:
        print(f"{k.private}  (copy to its SuperNode)   register: flwr supernode register {k.public} {CONNECTION}")
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy import (
        CONNECTION,
        Certificates,
        DeployError,
        flower_env,
        superlink_command,
        write_connection,
    )

    if args.insecure == bool(args.certs):
        print("fedsim: give either --certs DIR (TLS + SuperNode authentication) or --insecure", file=sys.stderr)
        return EXIT_BAD_INPUT
    certs = None if args.insecure else Certificates.in_dir(args.certs)
    if certs is not None and (missing := certs.missing()):
        print(f"fedsim: {DeployError(missing)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.insecure:
        _insecure_warning()
    local = args.host in ("0.0.0.0", "::", "127.0.0.1", "localhost")
    address = f"127.0.0.1:{args.port}" if local else f"{args.host}:{args.port}"
    home = Path(os.environ.get("FLWR_HOME") or "~/.flwr").expanduser()
    config = write_connection(home, address, certs.ca if certs else None)
    cmd = superlink_command(certs, args.host, args.port, _flower_args(args))
    print(f"fedsim: connection {CONNECTION!r} ({address}) written to {config}", flush=True)
    print(f"fedsim: register each SuperNode's key: flwr supernode register KEY.pub {CONNECTION}", flush=True)
    print(f"fedsim: starting {' '.join(cmd)}", flush=True)
    os.execve(cmd[0], cmd, flower_env())


def cmd_supernode(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy import DeployError, check_supernode, flower_env, supernode_command

    try:
        plan = check_supernode(
            args.scenario, args.set or [], args.partition, args.superlink, args.ca, args.key, args.insecure
        )
    except DeployError as exc:
        print(f"fedsim supernode: cannot start:\n{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.insecure:
        _insecure_warning()
    cmd = supernode_command(args.superlink, plan, args.ca, args.key, args.runtime_port, _flower_args(args))
    print(
        f"fedsim supernode: partition {plan.partition} of {plan.num_partitions} (device {plan.device}) -> SuperLink "
        f"{args.superlink}" + (" without TLS" if args.insecure else f", TLS (CA {args.ca}), key {args.key}"),
        flush=True,
    )
    os.execve(cmd[0], cmd, flower_env())


def cmd_deploy_local(args: argparse.Namespace) -> int:
    import subprocess

    from fedsim.config.scenario import ScenarioError, load_scenario
    from fedsim.results.report import summary_text
    from fedsim.results.rundir import read_metrics
    from fedsim.runtime.deploy import LocalFederation, make_node_keys

    try:
        scenario = load_scenario(args.scenario, args.set or [])
    except ScenarioError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    n = scenario.clients.num_clients
    nodes = args.nodes or n
    run_path = Path(args.out).resolve() / scenario.name
    problems = (
        [f"--nodes must be in 1..{n} (`clients.num_clients`: one SuperNode per partition), got {nodes}"]
        if not 1 <= nodes <= n
        else []
    )
    problems += (
        [f"run directory {run_path} already exists; choose another with --out DIR or --set name=NEW_NAME"]
        if run_path.exists()
        else []
    )
    if problems:
        print("fedsim: " + "\n".join(problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.insecure:
        _insecure_warning()
    workdir = Path(args.workdir or Path(args.out) / f"{scenario.name}-deploy")
    with LocalFederation(workdir, insecure=args.insecure) as fed:
        print(
            f"fedsim deploy: SuperLink on {fed.address} "
            f"({'insecure' if args.insecure else 'TLS + SuperNode authentication'}); logs in {fed.workdir}",
            flush=True,
        )
        try:
            fed.start_superlink()
            keys = [None] * nodes if args.insecure else make_node_keys(fed.workdir / "keys", nodes)
            for i, key in enumerate(keys):
                if key is not None:
                    fed.register(key)
                fed.start_supernode(Path(args.scenario).resolve(), i, key, args.set or [])
        except RuntimeError as exc:  # the SuperLink did not start, or a registration failed
            print(f"fedsim deploy: {exc}; logs in {fed.workdir}", file=sys.stderr)
            return EXIT_FAILED
        print(f"fedsim deploy: {nodes} SuperNodes started (partitions 0..{nodes - 1}); flwr run:", flush=True)
        done = subprocess.run(fed.run_command(args.scenario, args.set or [], args.out), env=fed.env())
    if done.returncode != 0 or not (run_path / "metrics.parquet").is_file():
        print(
            f"fedsim deploy: the run failed (flwr run exit {done.returncode}); logs in {fed.workdir}", file=sys.stderr
        )
        return EXIT_FAILED
    print(summary_text(read_metrics(run_path), run_path))
    return 0


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
        description="Serve a web dashboard over the run directories under RUNS_ROOT.",
    )
    dash.add_argument("runs_root", nargs="?", default="runs", help="folder holding run directories (default: runs)")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8050, help="port (default: 8050; 0 = any free port)")
    dash.set_defaults(func=cmd_dashboard)

    _add_deploy(sub)
    sub.add_parser("models", help="list the built-in models").set_defaults(func=cmd_models)
    sub.add_parser("tasks", help="list the built-in tasks").set_defaults(func=cmd_tasks)
    return parser


def _add_deploy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`fedsim deploy ...` (run where the SuperLink is) and `fedsim supernode` (run on each device)."""
    deploy = sub.add_parser(
        "deploy",
        help="deploy the ClientApp on real Flower SuperNodes (TLS + node auth)",
        description="Deploy fedsim on Flower's deployment engine: a "
        "SuperLink and SuperNodes, secured by default. See docs/deploy.md.",
    )
    dsub = deploy.add_subparsers(dest="deploy_command", required=True, metavar="STEP")

    certs = dsub.add_parser(
        "certs",
        help="make a local CA and a SuperLink TLS certificate",
        description="Make a local CA (ca.crt, ca.key) and a SuperLink certificate it signs (server.pem, server.key), "
        "valid for 127.0.0.1, ::1, localhost and every --host.",
    )
    certs.add_argument("dir", help="folder to write the four files into")
    certs.add_argument(
        "--host",
        action="append",
        metavar="NAME_OR_IP",
        help="a host name or IP address SuperNodes use to reach the SuperLink (repeatable)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    certs.set_defaults(func=cmd_deploy_certs)

    keys = dsub.add_parser(
        "keys",
        help="make SuperNode key pairs for node authentication",
        description="Make ECDSA P-384 key pairs supernode-0 .. supernode-{N-1} (+ .pub) in OpenSSH format, for `flwr "
        "supernode register` and `fedsim supernode --key`.",
    )
    keys.add_argument("dir", help="folder to write the keys into")
    keys.add_argument("--nodes", type=int, required=True, help="how many key pairs")
    keys.add_argument("--prefix", default="supernode", help="file name prefix (default: supernode)")
    keys.set_defaults(func=cmd_deploy_keys)

    link = dsub.add_parser(
        "superlink",
        help="start Flower's SuperLink with TLS and SuperNode authentication",
        description="Write the `fedsim` connection into $FLWR_HOME/config.toml (for `flwr supernode register` and "
        "`flwr run`), then run flower-superlink with TLS and --enable-supernode-auth.",
    )
    link.add_argument("--certs", help="folder from `fedsim deploy certs` (ca.crt, server.pem, server.key)")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0, every interface)")
    link.add_argument(
        "--port", type=int, default=9093, help="the one port for SuperNodes, `flwr` and the ServerApp (default: 9093)"
    )
    link.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no SuperNode authentication (testing only; prints a warning)",
    )
    _add_flower_args(link)
    link.set_defaults(func=cmd_deploy_superlink)

    local = dsub.add_parser(
        "local",
        help="run a scenario on a SuperLink + SuperNodes on this machine",
        description="Make certificates and keys, start a SuperLink and one SuperNode "
        "per partition on this machine, register the keys, run the scenario with "
        "`flwr run`, stop everything. The run directory is the same as `fedsim run`'s.",
    )
    local.add_argument("scenario", help="scenario TOML file")
    local.add_argument(
        "--nodes", type=int, help="SuperNodes to start, partitions 0..N-1 (default: clients.num_clients)"
    )
    local.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario value (repeatable)")
    local.add_argument("--out", default="runs", help="parent folder of the run directory (default: runs)")
    local.add_argument("--workdir", help="certificates, keys, Flower homes and logs (default: OUT/NAME-deploy)")
    local.add_argument(
        "--insecure", action="store_true", help="no TLS and no SuperNode authentication (prints a warning)"
    )
    local.set_defaults(func=cmd_deploy_local)

    node = sub.add_parser(
        "supernode",
        help="check a SuperNode's partition against the scenario, then start Flower's SuperNode",
        description="Check that PARTITION exists in the scenario and that the TLS and key files are usable, then exec "
        "flower-supernode with --node-config 'partition-id=N num-partitions=M device=\"PROFILE\"'.",
    )
    node.add_argument("scenario", help="the scenario the federation runs (the same file and --set as `flwr run`)")
    node.add_argument(
        "--partition", type=int, required=True, help="this node's client id / data partition, 0..clients.num_clients-1"
    )
    node.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address, e.g. 192.168.1.10:9093"
    )
    node.add_argument("--ca", type=Path, help="the SuperLink's CA certificate (ca.crt)")
    node.add_argument(
        "--key", type=Path, help="this SuperNode's private key (registered with `flwr supernode register KEY.pub`)"
    )
    node.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="scenario override, as given to the run (repeatable)"
    )
    node.add_argument(
        "--runtime-port",
        type=int,
        default=9094,
        help="this node's local Runtime API port; one per SuperNode on a machine (default: 9094)",
    )
    node.add_argument(
        "--insecure", action="store_true", help="no TLS and no node authentication (testing only; prints a warning)"
    )
    _add_flower_args(node)
    node.set_defaults(func=cmd_supernode)


def _add_flower_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "flower_args", nargs="*", metavar="FLOWER_ARG", help="after --: passed on to Flower's command unchanged"
    )


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
