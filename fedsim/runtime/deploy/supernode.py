"""What `fedsim supernode` checks before it starts Flower's SuperNode: its partition exists in the
scenario, its TLS and key files are usable, and its local Runtime API port is free. Every problem
is reported at once (`DeployError`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.fleet.fleet import fleet_profiles
from fedsim.protocol import PARTITION_ID
from fedsim.runtime.deploy.certs import ca_problem, key_problem
from fedsim.runtime.deploy.errors import DeployError
from fedsim.runtime.deploy.flower import PUBLIC_PORT
from fedsim.runtime.deploy.processes import port_free

FIRST_RUNTIME_PORT = 9094  # a SuperNode's local Runtime API, when none is given: this + its partition


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
            f"e.g. 192.168.1.10:{PUBLIC_PORT}), got {superlink!r}"
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
                "SuperLink with `fedsim deploy register KEY.pub`"
            )
        elif (p := key_problem(key)) is not None:
            problems.append(p)
    return problems


def runtime_port(requested: int | None, partition: int) -> int:
    """The SuperNode's local Runtime API port: `requested` if it is free; if none is requested,
    `FIRST_RUNTIME_PORT + partition` or the next free one (so SuperNodes of different partitions on
    one machine never pick the same). DeployError if `requested` is taken."""
    if requested is not None:
        if not port_free(requested):
            raise DeployError(
                [
                    f"--runtime-port {requested} is in use on 127.0.0.1 (another SuperNode on this machine?): give a "
                    "free one, or leave --runtime-port out to have one picked"
                ]
            )
        return requested
    for port in range(FIRST_RUNTIME_PORT + partition, 65536):
        if port_free(port):
            return port
    raise DeployError([f"no free port from {FIRST_RUNTIME_PORT + partition} on: give --runtime-port"])
