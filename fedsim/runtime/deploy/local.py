"""A whole deployment on one machine: a SuperLink behind its proxy and SuperNodes, each a process
group of its own with a log file in one work folder (`fedsim deploy local`, the tests, the bench).
With TLS the SuperNodes dial the proxy (`address`) and `flwr` the SuperLink itself
(`control_address`), exactly as across machines; with `insecure` both dial the SuperLink."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedsim.runtime.deploy.certs import NodeKey, make_certificates
from fedsim.runtime.deploy.flower import (
    flower_env,
    register_command,
    superlink_command,
    write_connection,
)
from fedsim.runtime.deploy.processes import free_port, stop_group, wait_for_port
from fedsim.runtime.deploy.proxy import Proxy


class LocalFederation:
    """SuperLink, proxy and SuperNodes on 127.0.0.1, TLS and node authentication unless `insecure`.
    `stop()` (or leaving the `with` block) ends every process group it started."""

    def __init__(self, workdir: str | Path, insecure: bool = False, port: int | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.insecure = insecure
        self.port = port or free_port()  # what SuperNodes dial: the proxy, or an insecure SuperLink
        self.local_port = self.port if insecure else free_port()  # the SuperLink itself
        self.flwr_home = self.workdir / "flwr-home"  # the SuperLink's and `flwr`'s
        self.certs = None if insecure else make_certificates(self.workdir / "certs")
        self.proxy = (
            None if self.certs is None else Proxy("127.0.0.1", self.port, self.local_port, self.certs, self.workdir)
        )
        write_connection(self.flwr_home, self.control_address, self.certs.ca if self.certs else None)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.local_port}"

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
        """The SuperLink, and with TLS the proxy in front of it; returns the SuperLink's process."""
        proc = self._spawn(superlink_command(self.certs, "127.0.0.1", self.local_port), "superlink.log", self.env())
        wait_for_port(self.local_port, proc, timeout)
        if self.proxy is not None:
            wait_for_port(self.port, self._spawn(self.proxy.command(), "proxy.log", self.env()), timeout)
        return proc

    def register(self, key: NodeKey) -> None:
        """Put `key` on the SuperLink's allow-list (`flwr supernode register`)."""
        cmd = register_command(key.public)
        done = subprocess.run(cmd, env=self.env(), cwd=self.flwr_home, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )

    def supernode_command(
        self,
        scenario: str | Path,
        partition: int,
        key: NodeKey | None,
        overrides: Sequence[str] = (),
        clientapp: str = "warm",
        poll_s: float | None = None,
    ) -> list[str]:
        """`fedsim supernode` (the checking wrapper) for `partition`, with its own runtime port
        (`clientapp` and `poll_s`: its --clientapp and --poll, None = the default)."""
        cmd = [
            sys.executable, "-m", "fedsim.cli", "supernode", str(scenario), "--partition", str(partition),
            "--superlink", self.address,
        ]  # fmt: skip
        cmd += [a for o in overrides for a in ("--set", o)]
        cmd += (
            ["--insecure"]
            if self.certs is None or key is None
            else ["--ca", str(self.certs.ca), "--key", str(key.private)]
        )
        cmd += ["--poll", str(poll_s)] if poll_s is not None else []
        return [*cmd, "--runtime-port", str(free_port()), "--clientapp", clientapp]

    def start_supernode(
        self,
        scenario: str | Path,
        partition: int,
        key: NodeKey | None,
        overrides: Sequence[str] = (),
        name: str | None = None,
        clientapp: str = "warm",
        poll_s: float | None = None,
    ) -> subprocess.Popen[bytes]:
        name = name or f"supernode-{partition}"
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        cmd = self.supernode_command(scenario, partition, key, overrides, clientapp, poll_s)
        return self._spawn(cmd, f"{name}.log", self.env(home))

    def run_command(self, scenario: str | Path, overrides: Sequence[str], out: str | Path) -> list[str]:
        """`fedsim deploy run` of `scenario` on this federation (exits non-zero when the run fails)."""
        cmd = [sys.executable, "-m", "fedsim.cli", "deploy", "run", str(Path(scenario).resolve())]
        return [*cmd, *(a for o in overrides for a in ("--set", o)), "--out", str(Path(out).resolve())]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every process group started here (newest first), SIGKILL what is left."""
        for proc in reversed(self.processes):
            stop_group(proc, timeout)
        self.processes.clear()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
