"""Deploy fedsim's ClientApp on real Flower SuperNodes (Flower 1.41's deployment engine),
secured by default: TLS between SuperLink and SuperNodes, and SuperNode authentication.

The pieces, each a plain function so that the CLI (`fedsim deploy ...`, `fedsim supernode`),
the one-machine flow (`LocalFederation`) and the tests share them:

- `make_certificates`: a local CA and a SuperLink certificate signed by it, with SANs for
  127.0.0.1, ::1 and localhost (the SuperLink's own ServerApp process connects there) and any
  host names or IPs the SuperNodes will use. For testing and private networks; with real
  certificates give Flower the same three files (CA, certificate chain, key).
- `make_node_keys`: one ECDSA P-384 key pair per SuperNode, in the OpenSSH formats that
  `flwr supernode register KEY.pub` and `flower-supernode --auth-supernode-private-key KEY`
  read (what `ssh-keygen -t ecdsa -b 384` writes).
- `check_supernode`: what a SuperNode needs before it starts (its partition exists in the
  scenario, its files are there and readable), every problem at once.
- `superlink_command` / `supernode_command`: Flower's own command lines, with TLS and node
  authentication unless `insecure`.
- `write_connection`: the `[superlink.NAME]` entry of `$FLWR_HOME/config.toml` that
  `flwr supernode register` and `flwr run` use.

Transport: Flower 1.41 serves the Fleet API (SuperLink ↔ SuperNodes) over HTTP(S) with
protobuf bodies on the SuperLink's one port (default 9093 here). Its SuperLink can also start the
older gRPC Fleet API behind an internal switch (`FLWR_INTERNAL_GRPC_FLEET_API=1`), but the
1.41 `flower-supernode` has no gRPC client at all (`start_client_internal._init_connection`
only calls `http_request_response`), so fedsim uses HTTPS.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.fleet.fleet import fleet_profiles
from fedsim.protocol import PARTITION_ID

log = logging.getLogger(__name__)

DEFAULT_PORT = 9093  # the SuperLink's one HTTP(S) port: Fleet, Control and Runtime APIs
CONNECTION = "fedsim"  # the connection name written to $FLWR_HOME/config.toml
LOOPBACK = ("127.0.0.1", "::1", "localhost")
INSECURE_WARNING = (
    "--insecure: traffic between SuperLink, SuperNodes and `flwr` is NOT encrypted and SuperNodes "
    "are NOT authenticated (anyone who reaches the port can join and read the model); use it "
    "only on a trusted network for testing"
)


class DeployError(ValueError):
    """Bad input to a deployment command; the message names every problem and the fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


# --- certificates and keys -----------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """The files a TLS SuperLink needs (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`);
    SuperNodes and `flwr` need only `ca`."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, folder: str | Path) -> Certificates:
        d = Path(folder).expanduser().resolve()
        return cls(ca=d / "ca.crt", cert=d / "server.pem", key=d / "server.key")

    def missing(self) -> list[str]:
        return [
            f"{p} does not exist (make it with `fedsim deploy certs {p.parent}`)"
            for p in (self.ca, self.cert, self.key)
            if not p.is_file()
        ]


def san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SubjectAlternativeName entries for the loopback names plus `hosts` (IP or DNS name)."""
    problems: list[str] = []
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*LOOPBACK, *hosts]:
        h = host.strip()
        if h in seen:
            continue
        seen.add(h)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
            continue
        except ValueError:
            pass
        if not h or any(c.isspace() or c in "/:@" for c in h):
            problems.append(f"--host {host!r} is neither an IP address nor a DNS name")
        else:
            names.append(x509.DNSName(h))
    if problems:
        raise DeployError(problems)
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certificates(folder: str | Path, hosts: Sequence[str] = (), days: int = 365) -> Certificates:
    """A new local CA (`ca.crt`, `ca.key`) and a SuperLink certificate (`server.pem`,
    `server.key`) it signs, valid for `days`, with SANs for loopback and `hosts`."""
    sans = san_entries(hosts)  # validate before writing anything
    out = Certificates.in_dir(folder)
    out.ca.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim local CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim superlink")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    out.ca.write_bytes(ca_cert.public_bytes(pem))
    _write_private(
        out.ca.with_name("ca.key"),
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    out.cert.write_bytes(cert.public_bytes(pem))
    _write_private(out.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair: `private` for `flower-supernode`, `public` (`.pub`) for
    `flwr supernode register`."""

    private: Path
    public: Path


def make_node_key(path: str | Path) -> NodeKey:
    """A new ECDSA P-384 key pair at `path` and `path.pub`, in OpenSSH format."""
    private = Path(path).expanduser().resolve()
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = private.with_name(private.name + ".pub")
    ssh_pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(ssh_pub + f" {private.name}\n".encode())
    return NodeKey(private, public)


def make_node_keys(folder: str | Path, nodes: int, prefix: str = "supernode") -> list[NodeKey]:
    """`nodes` key pairs `prefix-0` .. `prefix-{nodes-1}` in `folder`."""
    if nodes < 1:
        raise DeployError([f"--nodes must be >= 1, got {nodes}"])
    return [make_node_key(Path(folder) / f"{prefix}-{i}") for i in range(nodes)]


def key_problem(path: Path) -> str | None:
    """None if `path` is an OpenSSH ECDSA private key flower-supernode can use; else why not."""
    if not path.is_file():
        return f"SuperNode key {path} does not exist (make one with `fedsim deploy keys DIR --nodes N`)"
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        return f"SuperNode key {path} is not an unencrypted OpenSSH private key ({exc})"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return f"SuperNode key {path} is a {type(key).__name__}; Flower needs an ECDSA key (ssh-keygen -t ecdsa -b 384)"
    return None


def ca_problem(path: Path) -> str | None:
    """None if `path` holds a PEM certificate; else why not."""
    if not path.is_file():
        return f"CA certificate {path} does not exist (copy the SuperLink's ca.crt to this machine)"
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        return f"CA certificate {path} is not a PEM certificate ({exc})"
    return None


# --- checking a SuperNode before it starts ------------------------------------------


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of "HOST:PORT" or "[IPv6]:PORT"; None if it is not one."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


@dataclass(frozen=True)
class NodePlan:
    """What `fedsim supernode` starts: Flower's node config for one partition of a scenario."""

    partition: int
    num_partitions: int
    device: str  # the device profile the scenario's fleet gives this partition

    def node_config(self) -> str:
        """Flower's `--node-config` value (space-separated TOML key=value pairs)."""
        return f'{PARTITION_ID}={self.partition} num-partitions={self.num_partitions} device="{self.device}"'


def check_supernode(
    scenario_path: str | Path,
    overrides: Sequence[str],
    partition: int,
    superlink: str,
    ca: Path | None,
    key: Path | None,
    insecure: bool,
) -> NodePlan:
    """The node plan for `partition` of the scenario, or DeployError listing every problem: a
    scenario that does not load, a partition it does not have, a bad SuperLink address, missing
    or unreadable TLS and authentication files (or such files given with --insecure)."""
    problems: list[str] = []
    plan = None
    try:
        scenario = load_scenario(scenario_path, overrides)
    except ScenarioError as exc:
        problems += [f"scenario {scenario_path}: {p}" for p in exc.problems]
    else:
        n = scenario.clients.num_clients
        if not 0 <= partition < n:
            problems.append(
                f"--partition {partition} does not exist: scenario {scenario.name} has partitions 0..{n - 1} "
                f"(`clients.num_clients` = {n}); every SuperNode needs its own partition in that range"
            )
        else:
            try:
                devices = fleet_profiles(scenario.fleet, n)[0]
                plan = NodePlan(
                    partition, n, devices[partition] if partition < len(devices) else scenario.fleet.default_profile
                )
            except ValueError as exc:
                problems.append(f"scenario {scenario_path}: `fleet`: {exc}")
    if parse_address(superlink) is None:
        problems.append(
            "--superlink must be HOST:PORT (the SuperLink's address, "
            f"e.g. 192.168.1.10:{DEFAULT_PORT}), got {superlink!r}"
        )
    problems += tls_problems(ca, key, insecure)
    if problems:
        raise DeployError(problems)
    assert plan is not None
    return plan


def tls_problems(ca: Path | None, key: Path | None, insecure: bool) -> list[str]:
    """What is wrong with a SuperNode's TLS and authentication files (none with --insecure)."""
    problems: list[str] = []
    if insecure:
        problems += [
            f"{flag} cannot be used with --insecure (no TLS, no node authentication)"
            for flag, v in (("--ca", ca), ("--key", key))
            if v
        ]
    else:
        if ca is None:
            problems.append(
                "--ca is required unless --insecure: the SuperLink's CA certificate (ca.crt from `fedsim deploy certs`)"
            )
        elif (p := ca_problem(ca)) is not None:
            problems.append(p)
        if key is None:
            problems.append(
                "--key is required unless --insecure: this SuperNode's private key, whose .pub was registered on the "
                "SuperLink with `flwr supernode register KEY.pub fedsim`"
            )
        elif (p := key_problem(key)) is not None:
            problems.append(p)
    return problems


# --- Flower's command lines -----------------------------------------------------------


def flower_bin(name: str) -> str:
    """A Flower executable next to this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def flower_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment in which Flower finds its helpers (`flower-superexec`, `flwr-clientapp`,
    started by name) next to this Python."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def superlink_command(
    certs: Certificates | None, host: str = "0.0.0.0", port: int = DEFAULT_PORT, extra: Sequence[str] = ()
) -> list[str]:
    """`flower-superlink` with TLS and SuperNode authentication (`certs`), or `--insecure`
    (`certs` None). Dependencies come from this environment, not from `uv sync` at run time."""
    cmd = [
        flower_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(certs.ca),
            "--ssl-certfile",
            str(certs.cert),
            "--ssl-keyfile",
            str(certs.key),
            "--enable-supernode-auth",
        ]
    return [*cmd, *extra]


def supernode_command(
    superlink: str,
    plan: NodePlan,
    ca: Path | None,
    key: Path | None,
    runtime_port: int = 9094,
    extra: Sequence[str] = (),
) -> list[str]:
    """`flower-supernode` for one partition: TLS with `ca` and authentication with `key`, or
    `--insecure` when both are None. `runtime_port`: the node's local Runtime API (one per
    SuperNode on a machine)."""
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        superlink,
        "--node-config",
        plan.node_config(),
        "--port",
        str(runtime_port),
    ]
    if ca is None and key is None:
        cmd.append("--insecure")
    else:
        assert ca is not None and key is not None, "TLS needs both the CA and the node key"
        cmd += [
            "--root-certificates",
            str(Path(ca).resolve()),
            "--auth-supernode-private-key",
            str(Path(key).resolve()),
        ]
    return [*cmd, *extra]


def write_connection(flwr_home: Path, address: str, ca: Path | None, name: str = CONNECTION) -> Path:
    """Add (or replace) `[superlink.NAME]` in `flwr_home/config.toml`, the connection that
    `flwr supernode register ... NAME` and `flwr run . NAME` use; it becomes the default
    connection if there is none. Other entries are kept."""
    path = Path(flwr_home) / "config.toml"
    config: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = dict(config.get("superlink", {}))
    entry: dict[str, Any] = {"address": address}
    if ca is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(ca).resolve())  # Flower wants an absolute path
    links[name] = entry
    links.setdefault("default", name)
    config["superlink"] = links
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def project_root() -> Path:
    """The fedsim project folder that `flwr run` packages (its pyproject.toml has [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[2]  # fedsim/runtime/ → the project
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise DeployError(
            [f"no fedsim project at {root} (a pyproject.toml with [tool.flwr.app]); run from a fedsim checkout"]
        )
    return root


def run_config(scenario: str | Path, overrides: Sequence[str], out: str | Path) -> str:
    """`flwr run --run-config` for the fedsim ServerApp (fedsim/runtime/server_app.py). Real devices
    run on the measured clock (`fleet.clock = "measured"`) unless the overrides say otherwise."""
    if not any(o.strip().startswith("fleet.clock") for o in overrides):
        overrides = [*overrides, "fleet.clock=measured"]
    joined = ";".join(overrides)
    for name, value in (("scenario", str(scenario)), ("overrides", joined), ("out", str(out))):
        if '"' in value or "\\" in value:
            raise DeployError([f"{name} cannot contain quotes or backslashes in a Flower run config, got {value!r}"])
    return f'scenario="{scenario}" overrides="{joined}" out="{out}"'


# --- one machine: SuperLink + SuperNodes as process groups -----------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60, host: str = "127.0.0.1") -> None:
    """Return once `host:port` accepts connections; RuntimeError if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            program = proc.args[0] if isinstance(proc.args, Sequence) else proc.args
            raise RuntimeError(
                f"{Path(str(program)).name} exited with code {proc.returncode} before opening port {port}"
            )
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g} s")


class LocalFederation:
    """A SuperLink and SuperNodes on this machine, each a process group of its own with a log
    file in `workdir`; TLS and node authentication unless `insecure`. `stop()` (or leaving the
    `with` block) ends every group it started."""

    def __init__(self, workdir: str | Path, insecure: bool = False, port: int | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.insecure = insecure
        self.port = port or free_port()
        self.flwr_home = self.workdir / "flwr-home"  # the SuperLink's and `flwr`'s
        self.certs = None if insecure else make_certificates(self.workdir / "certs")
        write_connection(self.flwr_home, self.address, self.certs.ca if self.certs else None)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        return flower_env(FLWR_HOME=str(flwr_home or self.flwr_home))

    def _spawn(self, cmd: Sequence[str], log_name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with (self.workdir / log_name).open("ab") as logf:
            proc = subprocess.Popen(
                list(cmd),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=self.workdir,
                start_new_session=True,
            )
        self.processes.append(proc)
        return proc

    def start_superlink(self, timeout: float = 60) -> subprocess.Popen[bytes]:
        proc = self._spawn(superlink_command(self.certs, "127.0.0.1", self.port), "superlink.log", self.env())
        wait_for_port(self.port, proc, timeout)
        return proc

    def register(self, key: NodeKey) -> None:
        """Put `key` on the SuperLink's allow-list (`flwr supernode register`)."""
        cmd = [flower_bin("flwr"), "supernode", "register", str(key.public), CONNECTION]
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )

    def supernode_command(
        self, scenario: str | Path, partition: int, key: NodeKey | None, overrides: Sequence[str] = ()
    ) -> list[str]:
        """`fedsim supernode` (the checking wrapper) for `partition`, with its own runtime port."""
        cmd = [
            sys.executable,
            "-m",
            "fedsim.cli",
            "supernode",
            str(scenario),
            "--partition",
            str(partition),
            "--superlink",
            self.address,
        ]
        cmd += [a for o in overrides for a in ("--set", o)]
        cmd += (
            ["--insecure"]
            if self.certs is None or key is None
            else ["--ca", str(self.certs.ca), "--key", str(key.private)]
        )
        return [*cmd, "--runtime-port", str(free_port())]

    def start_supernode(
        self,
        scenario: str | Path,
        partition: int,
        key: NodeKey | None,
        overrides: Sequence[str] = (),
        name: str | None = None,
    ) -> subprocess.Popen[bytes]:
        name = name or f"supernode-{partition}"
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        return self._spawn(self.supernode_command(scenario, partition, key, overrides), f"{name}.log", self.env(home))

    def run_command(self, scenario: str | Path, overrides: Sequence[str], out: str | Path) -> list[str]:
        """`flwr run` of the fedsim app on this federation, streaming the ServerApp's log."""
        config = run_config(Path(scenario).resolve(), overrides, Path(out).resolve())
        return [flower_bin("flwr"), "run", str(project_root()), CONNECTION, "--run-config", config, "--stream"]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every process group started here (newest first), SIGKILL what is left."""
        for proc in reversed(self.processes):
            stop_group(proc, timeout)
        self.processes.clear()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True) and the
    groups its children detached into (the SuperLink's SuperExec); SIGKILL what is left once
    the leader has exited or `timeout` has passed."""
    groups = [proc.pid, *_detached_children(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def _detached_children(pid: int) -> list[int]:
    """Direct children of `pid` leading a session of their own (Linux /proc; [] elsewhere)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children if os.getpgid(int(c)) == int(c)]
    except (OSError, ValueError):
        return []
