"""Flower's own command lines and configuration, as fedsim uses them: the SuperLink (loopback only
with TLS), the SuperNode (`--isolation process`: fedsim's warm runner runs its ClientApps), the
`flwr` connection in `$FLWR_HOME/config.toml`, and the run config of the fedsim ServerApp."""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedsim.runtime.deploy.certs import LOOPBACK, Certificates
from fedsim.runtime.deploy.errors import DeployError

PUBLIC_PORT = 9093  # where SuperNodes connect: the proxy (with --insecure, the SuperLink itself)
LOCAL_PORT = 9092  # the TLS SuperLink on 127.0.0.1: Fleet (from the proxy), Control (`flwr`), Runtime
FLOWER_POLL_S = 3.0  # an idle Flower SuperNode asks the SuperLink for work this often
SUPERNODE_POLL_S = 0.2  # fedsim's SuperNode asks this soon after a message (`fedsim.runtime.deploy.polling`)
# The `flwr` connection fedsim writes. Not a folder name a checkout would have: `flwr` reads an
# argument naming a folder with a pyproject.toml as an app, so "fedsim" clashed with a fedsim checkout.
CONNECTION = "fedsim-superlink"
INSECURE_WARNING = (
    "--insecure: traffic between SuperLink, SuperNodes and `flwr` is NOT encrypted, SuperNodes are NOT "
    "authenticated, and the Control API (register nodes, submit runs) is open to anyone who reaches the port; "
    "use it only on a trusted network for testing"
)


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
    certs: Certificates | None, host: str = "127.0.0.1", port: int = LOCAL_PORT, extra: Sequence[str] = ()
) -> list[str]:
    """`flower-superlink` with TLS and SuperNode authentication (`certs`), or `--insecure`
    (`certs` None). With `certs` it listens on loopback only (`host` must be one) and devices reach
    it through the proxy (`fedsim.runtime.deploy.proxy`). Dependencies come from this environment,
    not from `uv sync` at run time."""
    if certs is not None and host not in LOOPBACK:
        raise DeployError([f"a TLS SuperLink listens on 127.0.0.1 only, behind the proxy; got host {host!r}"])
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
    node_config: str,
    ca: Path | None,
    key: Path | None,
    runtime_port: int,
    extra: Sequence[str] = (),
    warm: bool = True,
    poll_s: float = SUPERNODE_POLL_S,
) -> list[str]:
    """`flower-supernode` for one partition (`node_config`: `NodePlan.node_config()`): TLS with `ca`
    and authentication with `key`, or `--insecure` when both are None. With `warm` its ClientApps
    run in fedsim's warm runner (`--isolation process`, `fedsim.runtime.deploy.warm`), which talks
    to the node's local Runtime API on 127.0.0.1:`runtime_port` (one per SuperNode on a machine);
    else in a new `flwr-clientapp` process per message (Flower's default, `subprocess`). With
    `poll_s` under Flower's 3 s, the node asks for its next message `poll_s` after a message,
    backing off to 3 s (`fedsim.runtime.deploy.polling`); else it polls as Flower does."""
    node = (
        [sys.executable, "-m", "fedsim.runtime.deploy.polling", str(poll_s)]
        if poll_s < FLOWER_POLL_S
        else [flower_bin("flower-supernode")]
    )
    cmd = [
        *node,
        "--superlink",
        superlink,
        "--node-config",
        node_config,
        "--isolation",
        "process" if warm else "subprocess",
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


def warm_runner_command(runtime_port: int) -> list[str]:
    """fedsim's ClientApp runner for the SuperNode whose Runtime API is on 127.0.0.1:`runtime_port`."""
    return [sys.executable, "-m", "fedsim.runtime.deploy.warm", f"127.0.0.1:{runtime_port}"]


def register_command(public_key: Path, connection: str = CONNECTION) -> list[str]:
    """`flwr supernode register` of one SuperNode key; run it with `cwd=FLWR_HOME` (`flwr` reads an
    argument that names a folder holding a pyproject.toml as an app)."""
    return [flower_bin("flwr"), "supernode", "register", str(Path(public_key).resolve()), connection]


def flwr_run_command(scenario: str | Path, overrides: Sequence[str], out: str | Path) -> list[str]:
    """`flwr run` of the fedsim app on the `CONNECTION` SuperLink, streaming the ServerApp's log."""
    config = run_config(Path(scenario).resolve(), overrides, Path(out).resolve())
    return [flower_bin("flwr"), "run", str(project_root()), CONNECTION, "--run-config", config, "--stream"]


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
    root = Path(__file__).resolve().parents[3]  # fedsim/runtime/deploy/ → the project
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
