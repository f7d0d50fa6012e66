"""`fedsim deploy ...` (where the SuperLink runs) and `fedsim supernode` (on each device).

    fedsim deploy certs DIR [--host H ...]          local CA + SuperLink certificate
    fedsim deploy keys DIR --nodes N                SuperNode key pairs
    fedsim deploy superlink --certs DIR [--host H] [--port 9093]   SuperLink on 127.0.0.1 + proxy on H:9093
    fedsim deploy register KEY.pub ...              put SuperNode keys on the SuperLink's allow-list
    fedsim deploy run SCENARIO [--set k=v] [--out DIR]   run a scenario on the SuperNodes; exit 1 if it fails
    fedsim deploy local SCENARIO [--nodes N]        all of it on this machine
    fedsim supernode SCENARIO --partition K --superlink HOST:PORT --ca CA --key KEY

Exit codes as `fedsim run`'s: 2 bad input (nothing started), 1 a failure while running. Like the
rest of the CLI, each command imports what it uses in its own body, so that the CLI starts fast.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.config.errors import EXIT_BAD_INPUT, EXIT_FAILED

if TYPE_CHECKING:
    from fedsim.runtime.deploy.processes import Together


def _warn_insecure() -> None:
    from fedsim.runtime.deploy.flower import INSECURE_WARNING

    print(f"fedsim: WARNING: {INSECURE_WARNING}", file=sys.stderr)


def _flower_args(args: argparse.Namespace) -> list[str]:
    extra = list(args.flower_args or [])
    return extra[1:] if extra[:1] == ["--"] else extra


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or "~/.flwr").expanduser().resolve()


def cmd_certs(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy.certs import make_certificates
    from fedsim.runtime.deploy.errors import DeployError

    try:
        certs = make_certificates(args.dir, args.host or [], days=args.days)
    except DeployError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    hosts = ", ".join(["127.0.0.1", "::1", "localhost", *(args.host or [])])
    print(f"CA certificate   {certs.ca}   (copy it to every SuperNode)")
    print(f"CA key           {certs.ca.with_name('ca.key')}   (keep it private; only signs certificates)")
    print(f"SuperLink cert   {certs.cert}  valid for {hosts}, {args.days} days")
    print(f"SuperLink key    {certs.key}")
    print(f"next: fedsim deploy superlink --certs {args.dir}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy.certs import make_node_keys
    from fedsim.runtime.deploy.errors import DeployError

    try:
        keys = make_node_keys(args.dir, args.nodes, prefix=args.prefix)
    except DeployError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for k in keys:
        print(f"{k.private}  (copy to its SuperNode)   register: fedsim deploy register {k.public}")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy.certs import Certificates
    from fedsim.runtime.deploy.errors import DeployError
    from fedsim.runtime.deploy.flower import CONNECTION, flower_env, superlink_command, write_connection
    from fedsim.runtime.deploy.processes import Together, wait_for_port
    from fedsim.runtime.deploy.proxy import NGINX_MISSING, Proxy, nginx_binary

    if args.insecure == bool(args.certs):
        print("fedsim: give either --certs DIR (TLS + SuperNode authentication) or --insecure", file=sys.stderr)
        return EXIT_BAD_INPUT
    certs = None if args.insecure else Certificates.in_dir(args.certs)
    problems = certs.missing() if certs is not None else []
    if certs is not None and nginx_binary() is None:
        problems.append(NGINX_MISSING)
    if certs is not None and args.port == args.local_port:
        problems.append(f"--port and --local-port must differ (the proxy and the SuperLink), both are {args.port}")
    if problems:
        print(f"fedsim: cannot start the SuperLink:\n{DeployError(problems)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.insecure:
        _warn_insecure()
    # where `flwr` on this machine reaches the Control API: the SuperLink itself
    local = f"{_dial(args.host)}:{args.port}" if certs is None else f"127.0.0.1:{args.local_port}"
    home = _flwr_home()
    config = write_connection(home, local, certs.ca if certs else None)
    together = Together(flower_env())
    if certs is None:
        link = together.start("superlink", superlink_command(None, args.host, args.port, _flower_args(args)))
    else:
        workdir = Path(args.workdir or Path(args.certs) / "proxy").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        proxy = Proxy(args.host, args.port, args.local_port, certs, workdir)
        link = together.start("superlink", superlink_command(certs, "127.0.0.1", args.local_port, _flower_args(args)))
        try:
            wait_for_port(args.local_port, link)
            wait_for_port(args.port, together.start("proxy", proxy.command()), host=_dial(args.host))
        except RuntimeError as exc:
            together.stop()
            print(f"fedsim: {exc}; proxy logs in {workdir}", file=sys.stderr)
            return EXIT_FAILED
        print(f"fedsim: devices connect to {args.host}:{args.port} (nginx: Fleet API only; logs in {workdir})")
    print(f"fedsim: connection {CONNECTION!r} ({local}, for `flwr` on this machine) written to {config}", flush=True)
    print("fedsim: register each SuperNode's key: fedsim deploy register KEY.pub", flush=True)
    return _until_one_ends(together, "fedsim")


def _until_one_ends(together: Together, who: str) -> int:
    """Wait for the first program of `together` to end (the rest are then stopped): 0 when a
    signal ended them, else that program's exit code (EXIT_FAILED for 0), said on stderr."""
    name, code = together.wait()
    if name == "signal":
        return 0
    print(f"{who}: {name} exited with code {code}; stopped the rest", file=sys.stderr)
    return code or EXIT_FAILED


def _dial(host: str) -> str:
    """Where to check that a server listening on `host` is up."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def cmd_register(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy.errors import DeployError
    from fedsim.runtime.deploy.flower import flower_env, register_command

    public = [Path(k) for k in args.public_keys]
    problems = [f"{k} is not a file (a SuperNode's public key, KEY.pub)" for k in public if not k.is_file()]
    if problems:
        print(f"fedsim: cannot register:\n{DeployError(problems)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    home = _flwr_home()
    home.mkdir(parents=True, exist_ok=True)
    failed = 0
    for key in public:  # from FLWR_HOME: no folder there can pass for an app
        done = subprocess.run(register_command(key), env=flower_env(FLWR_HOME=str(home)), cwd=home)
        failed += done.returncode != 0
    return EXIT_FAILED if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.config.scenario import ScenarioError, load_scenario
    from fedsim.results.report import summary_text
    from fedsim.results.rundir import RunExistsError, last_event, read_metrics
    from fedsim.runtime.deploy.errors import DeployError
    from fedsim.runtime.deploy.flower import flower_env, flwr_run_command

    overrides = args.set or []
    try:
        scenario = load_scenario(args.scenario, overrides)
        cmd = flwr_run_command(args.scenario, overrides, args.out)
    except (ScenarioError, DeployError) as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_path = Path(args.out).resolve() / scenario.name
    if run_path.exists():
        print(f"fedsim: {RunExistsError(run_path)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    home = _flwr_home()
    done = subprocess.run(cmd, env=flower_env(FLWR_HOME=str(home)), cwd=home if home.is_dir() else None)
    end = last_event(run_path)
    if end.get("event") != "run_end":
        why = f"its last event: {end}" if end else "no run directory was written"
        print(
            f"fedsim: the run failed (flwr run exit {done.returncode}; {why}); the ServerApp's log is above",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(summary_text(read_metrics(run_path), run_path))
    return 0


def cmd_supernode(args: argparse.Namespace) -> int:
    from fedsim.runtime.deploy.errors import DeployError
    from fedsim.runtime.deploy.flower import flower_env, supernode_command, warm_runner_command
    from fedsim.runtime.deploy.link_check import wait_for_link
    from fedsim.runtime.deploy.processes import Together, wait_for_port
    from fedsim.runtime.deploy.supernode import check_supernode, parse_address, runtime_port

    try:
        plan = check_supernode(
            args.scenario, args.set or [], args.partition, args.superlink, args.ca, args.key, args.insecure
        )
        port = runtime_port(args.runtime_port, args.partition)
    except DeployError as exc:
        print(f"fedsim supernode: cannot start:\n{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.insecure:
        _warn_insecure()
    host, link_port = parse_address(args.superlink) or ("", 0)
    if problem := wait_for_link(host, link_port, args.ca, args.insecure, tries=args.tries):
        print(f"fedsim supernode: {problem}", file=sys.stderr)
        return EXIT_FAILED
    tls = " without TLS" if args.insecure else f", TLS (CA {args.ca}), key {args.key}"
    print(
        f"fedsim supernode: partition {plan.partition} of {plan.num_partitions} (device {plan.device}) -> SuperLink "
        f"{args.superlink}{tls}; runtime port {port}",
        flush=True,
    )
    together = Together(flower_env())
    warm = args.clientapp == "warm"
    node = together.start(
        "flower-supernode",
        supernode_command(
            args.superlink, plan.node_config(), args.ca, args.key, port, _flower_args(args), warm, args.poll
        ),
    )
    try:
        wait_for_port(port, node)
    except RuntimeError as exc:
        together.stop()
        print(f"fedsim supernode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if warm:
        together.start("ClientApp runner", warm_runner_command(port))
    return _until_one_ends(together, "fedsim supernode")


def cmd_local(args: argparse.Namespace) -> int:
    from fedsim.config.scenario import ScenarioError, load_scenario
    from fedsim.results.rundir import RunExistsError
    from fedsim.runtime.deploy.certs import make_node_keys
    from fedsim.runtime.deploy.local import LocalFederation
    from fedsim.runtime.deploy.proxy import NGINX_MISSING, nginx_binary

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
    if run_path.exists():
        problems.append(str(RunExistsError(run_path)))
    if not args.insecure and nginx_binary() is None:
        problems.append(NGINX_MISSING)
    if problems:
        print("fedsim: " + "\n".join(problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.insecure:
        _warn_insecure()
    workdir = Path(args.workdir or Path(args.out) / f"{scenario.name}-deploy")
    with LocalFederation(workdir, insecure=args.insecure) as fed:
        security = "insecure" if args.insecure else f"TLS + SuperNode authentication, behind nginx on {fed.address}"
        print(f"fedsim deploy: SuperLink on {fed.control_address} ({security}); logs in {fed.workdir}", flush=True)
        try:
            fed.start_superlink()
            keys = [None] * nodes if args.insecure else make_node_keys(fed.workdir / "keys", nodes)
            for i, key in enumerate(keys):
                if key is not None:
                    fed.register(key)
                fed.start_supernode(Path(args.scenario).resolve(), i, key, args.set or [])
        except RuntimeError as exc:  # the SuperLink or the proxy did not start, or a registration failed
            print(f"fedsim deploy: {exc}; logs in {fed.workdir}", file=sys.stderr)
            return EXIT_FAILED
        print(f"fedsim deploy: {nodes} SuperNodes started (partitions 0..{nodes - 1}); running:", flush=True)
        done = subprocess.run(fed.run_command(args.scenario, args.set or [], args.out), env=fed.env())
    if done.returncode != 0:
        print(f"fedsim deploy: logs of every process are in {fed.workdir}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`fedsim deploy ...` and `fedsim supernode` on the CLI's subcommands."""
    from fedsim.runtime.deploy.flower import FLOWER_POLL_S, SUPERNODE_POLL_S

    deploy = sub.add_parser(
        "deploy",
        help="deploy the ClientApp on real Flower SuperNodes (TLS + node auth)",
        description="Deploy fedsim on Flower's deployment engine: a SuperLink behind a proxy that exposes only the "
        "Fleet API, and SuperNodes, secured by default. See docs/deploy.md.",
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
    certs.set_defaults(func=cmd_certs)

    keys = dsub.add_parser(
        "keys",
        help="make SuperNode key pairs for node authentication",
        description="Make ECDSA P-384 key pairs supernode-0 .. supernode-{N-1} (+ .pub) in OpenSSH format, for "
        "`fedsim deploy register` and `fedsim supernode --key`.",
    )
    keys.add_argument("dir", help="folder to write the keys into")
    keys.add_argument("--nodes", type=int, required=True, help="how many key pairs")
    keys.add_argument("--prefix", default="supernode", help="file name prefix (default: supernode)")
    keys.set_defaults(func=cmd_keys)

    link = dsub.add_parser(
        "superlink",
        help="start the SuperLink (127.0.0.1 only) and the proxy devices reach it through",
        description="Write the `fedsim-superlink` connection into $FLWR_HOME/config.toml (for `flwr` on this "
        "machine), then run flower-superlink with TLS and --enable-supernode-auth on 127.0.0.1:--local-port, and "
        "nginx on --host:--port forwarding only the Fleet API to it. Both stop when either stops.",
    )
    link.add_argument("--certs", help="folder from `fedsim deploy certs` (ca.crt, server.pem, server.key)")
    link.add_argument(
        "--host",
        default="127.0.0.1",
        help="address devices reach the proxy on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)",
    )
    link.add_argument("--port", type=int, default=9093, help="the public port devices connect to (default: 9093)")
    link.add_argument(
        "--local-port",
        type=int,
        default=9092,
        help="the SuperLink's own port on 127.0.0.1: Fleet (from the proxy), Control (`flwr`), Runtime (default: 9092)",
    )
    link.add_argument("--workdir", help="the proxy's configuration, logs and temporary files (default: CERTS/proxy)")
    link.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no SuperNode authentication, no proxy: every API on --host:--port (testing only; warns)",
    )
    _add_flower_args(link)
    link.set_defaults(func=cmd_superlink)

    register = dsub.add_parser(
        "register",
        help="put SuperNode keys on the SuperLink's allow-list",
        description="Run `flwr supernode register KEY.pub fedsim-superlink` for each key, from $FLWR_HOME.",
    )
    register.add_argument("public_keys", nargs="+", metavar="KEY.pub", help="SuperNode public keys")
    register.set_defaults(func=cmd_register)

    run = dsub.add_parser(
        "run",
        help="run a scenario on the connected SuperNodes; exit 1 if the run fails",
        description="Submit the fedsim app with `flwr run` to the SuperLink of the `fedsim-superlink` connection, "
        "stream the ServerApp's log, print the summary; exit 1 unless the run directory records the run's end.",
    )
    run.add_argument("scenario", help="scenario TOML file (the same file and --set as every `fedsim supernode`)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario value (repeatable)")
    run.add_argument(
        "--out", default="runs", help="parent folder of the run directory, on this machine (default: runs)"
    )
    run.set_defaults(func=cmd_run)

    local = dsub.add_parser(
        "local",
        help="run a scenario on a SuperLink + SuperNodes on this machine",
        description="Make certificates and keys, start a SuperLink, its proxy and one SuperNode per partition on "
        "this machine, register the keys, run the scenario, stop everything. The run directory is the same as "
        "`fedsim run`'s.",
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
    local.set_defaults(func=cmd_local)

    node = sub.add_parser(
        "supernode",
        help="check a SuperNode's partition against the scenario, then start Flower's SuperNode",
        description="Check that PARTITION exists in the scenario, that the TLS and key files are usable and that the "
        "SuperLink answers as this node will talk to it, then run flower-supernode (node config 'partition-id=N "
        "num-partitions=M device=\"PROFILE\"') and fedsim's warm ClientApp runner beside it.",
    )
    node.add_argument("scenario", help="the scenario the federation runs (the same file and --set as the run)")
    node.add_argument(
        "--partition", type=int, required=True, help="this node's client id / data partition, 0..clients.num_clients-1"
    )
    node.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's public address, e.g. 192.168.1.10:9093"
    )
    node.add_argument("--ca", type=Path, help="the SuperLink's CA certificate (ca.crt)")
    node.add_argument(
        "--key", type=Path, help="this SuperNode's private key (registered with `fedsim deploy register`)"
    )
    node.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="scenario override, as given to the run (repeatable)"
    )
    node.add_argument(
        "--runtime-port",
        type=int,
        help="this node's local Runtime API port, one per SuperNode on a machine (default: 9094 + partition, or the "
        "next free one)",
    )
    node.add_argument(
        "--clientapp",
        choices=("warm", "fresh"),
        default="warm",
        help="warm: each message in a process forked from one that has imported torch & co (default); fresh: a new "
        "flwr-clientapp process per message, Flower's default (slower)",
    )
    node.add_argument(
        "--poll",
        type=float,
        default=SUPERNODE_POLL_S,
        metavar="S",
        help=f"after a message, ask the SuperLink for the next one S seconds later, each further wait 1.25 times "
        f"longer up to Flower's {FLOWER_POLL_S:g} s (default: {SUPERNODE_POLL_S:g}); {FLOWER_POLL_S:g} or more: "
        "Flower's SuperNode as it is",
    )
    node.add_argument(
        "--tries", type=int, default=30, help="times to try the SuperLink, 2 s apart, before giving up (default: 30)"
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
