"""Deployment on real Flower SuperNodes (`fedsim/runtime/deploy.py`, `fedsim supernode`, `fedsim deploy`).

Unit tests check the certificates against Python's own TLS stack (OpenSSL), the node keys
against Flower's own loaders, and the SuperNode checks against a table of bad inputs. The
end-to-end test starts a real SuperLink and SuperNodes on 127.0.0.1 with TLS and node
authentication and stops every process group it started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from tests_support.processes import stop_group, wait_until

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.config.scenario import load_scenario
from fedsim.results.rundir import read_metrics
from fedsim.runtime.deploy.certs import Certificates, make_certificates, make_node_keys
from fedsim.runtime.deploy.errors import DeployError
from fedsim.runtime.deploy.flower import (
    CONNECTION,
    flower_bin,
    project_root,
    superlink_command,
    supernode_command,
    write_connection,
)
from fedsim.runtime.deploy.local import LocalFederation
from fedsim.runtime.deploy.supernode import NodePlan, check_supernode
from fedsim.server.federation import discover_clients

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"


# --- certificates ----------------------------------------------------------------------


def _handshake(certs: Certificates, server_name: str) -> str:
    """Serve one TLS handshake with the SuperLink certificate on 127.0.0.1 and connect to it
    as a client that trusts only `ca.crt` and checks `server_name`; returns the TLS version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            version = str(tls.version())
        thread.join(timeout=5)
    return version


def test_certificates_are_trusted_by_openssl_for_loopback_and_extra_hosts(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs", ["superlink.lan", "10.1.2.3"])

    for name in ("localhost", "127.0.0.1", "superlink.lan", "10.1.2.3"):
        assert _handshake(certs, name).startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "elsewhere.lan")

    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(certs.ca.read_bytes()))
    for private in (certs.key, certs.ca.with_name("ca.key")):
        assert private.stat().st_mode & 0o777 == 0o600


def test_a_bad_host_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="'has space' is neither an IP address nor a DNS name"):
        make_certificates(tmp_path / "certs", ["has space"])
    assert not (tmp_path / "certs").exists()


# --- node keys -------------------------------------------------------------------------


def test_node_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    keys = make_node_keys(tmp_path / "keys", 2)

    assert [k.private.name for k in keys] == ["supernode-0", "supernode-1"]
    for k in keys:
        private = serialization.load_ssh_private_key(k.private.read_bytes(), None)  # what flower-supernode does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert try_load_public_key(k.public) == public_key_to_bytes(private.public_key())  # `flwr supernode register`
        assert k.private.stat().st_mode & 0o777 == 0o600
    assert keys[0].public.read_bytes() != keys[1].public.read_bytes()


# --- SuperNode checks --------------------------------------------------------------------

TWO = ["clients.num_clients=2"]
GOOD = dict(scenario_path=TINY, overrides=TWO, partition=1, superlink="127.0.0.1:9093", insecure=False)


@pytest.fixture
def node_files(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificates(tmp_path / "certs").ca, make_node_keys(tmp_path / "keys", 1)[0].private


def test_a_good_supernode_gets_its_partition_and_device_in_flowers_node_config(node_files: tuple[Path, Path]) -> None:
    ca, key = node_files
    plan = check_supernode(**GOOD, ca=ca, key=key)  # type: ignore[arg-type]

    assert plan == NodePlan(partition=1, num_partitions=2, device="laptop-cpu")
    assert parse_config_args([plan.node_config()]) == {"partition-id": 1, "num-partitions": 2, "device": "laptop-cpu"}
    cmd = supernode_command("127.0.0.1:9093", plan.node_config(), ca, key, 9094)
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca) and cmd[
        cmd.index("--auth-supernode-private-key") + 1
    ] == str(key)
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--isolation") + 1] == "process"  # its ClientApps run in fedsim's warm runner
    assert cmd[1:4] == [
        "-m",
        "fedsim.runtime.deploy.polling",
        "0.2",
    ]  # Flower's SuperNode, polling soon after a message
    flowers = supernode_command("127.0.0.1:9093", plan.node_config(), ca, key, 9094, poll_s=3)
    assert flowers[0].endswith("flower-supernode") and flowers[1:] == cmd[4:]


BAD_NODES = [
    ("partition past the end", dict(partition=2), "--partition 2 does not exist: scenario tiny has partitions 0..1"),
    ("negative partition", dict(partition=-1), "--partition -1 does not exist"),
    (
        "scenario that does not load",
        dict(overrides=["clients.num_clients=0"]),
        "`clients.num_clients` must be greater than or equal to 1",
    ),
    ("address without port", dict(superlink="superlink.lan"), "--superlink must be HOST:PORT"),
    ("no CA", dict(ca=None), "--ca is required unless --insecure"),
    ("no key", dict(key=None), "--key is required unless --insecure"),
    ("missing key file", dict(key=Path("/nonexistent/sn")), "SuperNode key /nonexistent/sn does not exist"),
    ("CA given with --insecure", dict(insecure=True, key=None), "--ca cannot be used with --insecure"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_NODES, ids=[b[0] for b in BAD_NODES])
def test_a_bad_supernode_is_refused_naming_the_problem(
    node_files: tuple[Path, Path], case: str, change: dict, message: str
) -> None:
    ca, key = node_files
    with pytest.raises(DeployError) as err:
        check_supernode(**{**GOOD, "ca": ca, "key": key, **change})  # type: ignore[arg-type]
    assert message in str(err.value)


def test_every_problem_is_reported_at_once(node_files: tuple[Path, Path]) -> None:
    with pytest.raises(DeployError) as err:
        check_supernode(**{**GOOD, "partition": 5, "superlink": "x", "ca": None, "key": None})  # type: ignore[arg-type]
    assert len(err.value.problems) == 4


def test_fedsim_supernode_exits_2_before_starting_flower(
    node_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ca, key = node_files
    argv = [
        "supernode",
        str(TINY),
        "--set",
        "clients.num_clients=2",
        "--partition",
        "3",
        "--superlink",
        "127.0.0.1:9093",
        "--ca",
        str(ca),
        "--key",
        str(key),
    ]
    assert main(argv) == EXIT_BAD_INPUT
    assert "--partition 3 does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # no partition at all: argparse names the flag
        main(argv[:4] + argv[6:])
    assert exit_.value.code == 2
    assert "the following arguments are required: --partition" in capsys.readouterr().err


def test_insecure_is_explicit_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--insecure" in superlink_command(None)
    secure = superlink_command(Certificates.in_dir("/certs"))
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure
    assert secure[secure.index("--host") + 1] == "127.0.0.1"  # devices reach it through the proxy only
    with pytest.raises(DeployError, match="listens on 127.0.0.1 only"):
        superlink_command(Certificates.in_dir("/certs"), "0.0.0.0")
    assert main(["deploy", "superlink"]) == EXIT_BAD_INPUT  # neither --certs nor --insecure
    assert "either --certs DIR" in capsys.readouterr().err


def test_connection_is_written_for_flwr_and_other_entries_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n')
    write_connection(home, "10.0.0.2:9093", tmp_path / "ca.crt")

    config = tomllib.loads((home / "config.toml").read_text())
    assert config["superlink"]["local"] == {"address": ":local:"} and config["superlink"]["default"] == "local"
    ca = str(tmp_path / "ca.crt")
    assert config["superlink"][CONNECTION] == {"address": "10.0.0.2:9093", "root-certificates": ca}
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(home))
    connection = read_superlink_connection(CONNECTION)
    assert connection.address == "10.0.0.2:9093" and connection.root_certificates == str(tmp_path / "ca.crt")


def test_deploy_local_refuses_bad_input_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    argv = ["deploy", "local", str(TINY), "--out", str(tmp_path / "runs"), "--nodes", "5"]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--nodes must be in 1..4" in err and "run directory" in err and "already exists" in err
    assert not (tmp_path / "runs" / "tiny-deploy").exists()


# --- discovery waits for SuperNodes that connect over time -------------------------------


class ArrivingGrid:
    """Nodes 11, 12, ... come online one per `get_node_ids` call, up to `total`; a node in
    `lost` is answered for by the SuperLink, as Flower does for a node that went away: an error
    reply from node 1 (SUPERLINK_NODE_ID) with NODE_UNAVAILABLE."""

    def __init__(self, total: int, lost: frozenset[int] = frozenset(), claims: dict[int, int] | None = None) -> None:
        self.total, self.lost, self.calls = total, lost, 0
        self.claims = claims or {}  # node → the client id it claims (default: its own, node − 11)

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return [11 + i for i in range(min(self.calls, self.total))]

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushed = list(messages)
        return [f"msg-{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        return [
            self._reply(m.metadata.dst_node_id, f"msg-{m.metadata.dst_node_id}")
            for m in self.pushed
            if f"msg-{m.metadata.dst_node_id}" in message_ids
        ]

    def _reply(self, node: int, reply_to: str) -> Message:
        src = SUPERLINK_NODE_ID if node in self.lost else node
        meta = Metadata(
            run_id=1, message_id="", src_node_id=src, dst_node_id=0, reply_to_message_id=reply_to, group_id="",
            created_at=time.time(), ttl=60.0, message_type="query",
        )  # fmt: skip
        if node in self.lost:
            return make_message(meta, error=Error(ErrorCode.NODE_UNAVAILABLE, "node unavailable"))
        claimed = self.claims.get(node, node - 11)
        return make_message(meta, RecordDict({"identity": ConfigRecord({"client-id": claimed})}))


def test_discovery_waits_until_every_supernode_has_connected(
    task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    scenario = load_scenario(TINY, ["clients.num_clients=3"])
    assert discover_clients(ArrivingGrid(3), scenario) == {0: 11, 1: 12, 2: 13}  # type: ignore[arg-type]


def test_discovery_goes_on_with_fewer_supernodes_after_the_wait_with_a_warning(
    task_identity: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FEDSIM_NODE_WAIT_S", "0.5")
    scenario = load_scenario(TINY, ["clients.num_clients=3"])
    with caplog.at_level(logging.WARNING, logger="fedsim.server.federation"):
        assert discover_clients(ArrivingGrid(2), scenario) == {0: 11, 1: 12}  # type: ignore[arg-type]
    assert "only 2 of 3 SuperNodes connected after 0.5 s" in caplog.text


def test_discovery_names_a_node_that_went_away_not_the_superlink(
    task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = load_scenario(TINY, ["clients.num_clients=3"])
    with caplog.at_level(logging.WARNING, logger="fedsim.server.federation"):
        clients = discover_clients(ArrivingGrid(3, lost=frozenset({12})), scenario)  # type: ignore[arg-type]
    assert clients == {0: 11, 2: 13}
    assert "node 12 did not identify itself: node unavailable" in caplog.text


def test_a_second_node_claiming_a_partition_is_left_out_naming_both(
    task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = load_scenario(TINY, ["clients.num_clients=3"])
    grid = ArrivingGrid(3, claims={13: 1})
    grid.calls = 2  # all three nodes are there from the start
    with caplog.at_level(logging.WARNING, logger="fedsim.server.federation"):
        clients = discover_clients(grid, scenario)  # type: ignore[arg-type]
    assert clients == {0: 11, 1: 12}
    assert "claims client id 1, which node 12 claimed first" in caplog.text


def test_deploy_run_refuses_an_existing_run_directory_before_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))  # nothing may be submitted: no SuperLink is there
    assert main(["deploy", "run", str(TINY), "--out", str(tmp_path / "runs")]) == EXIT_BAD_INPUT
    assert "already exists; choose another with --out DIR or --set name=NEW_NAME" in capsys.readouterr().err


def test_a_second_supernode_on_a_taken_runtime_port_exits_2_naming_it(
    node_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ca, key = node_files
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        argv = ["supernode", str(TINY), "--partition", "0", "--superlink", "127.0.0.1:9093", "--ca", str(ca)]
        assert main([*argv, "--key", str(key), "--runtime-port", str(port)]) == EXIT_BAD_INPUT
    assert f"--runtime-port {port} is in use" in capsys.readouterr().err


# --- end to end: SuperLink + SuperNodes with TLS and node authentication -----------------

# round_timeout_s: room for a slow healthy client on a busy 2-core box; the lost node is
# reported unavailable by the SuperLink within 60 s of its last heartbeat, well before it.
E2E = [
    "rounds=2", "name=deployed", "clients.num_clients=2", "clients.per_round=2", "clients.eval_per_round=0",
    "train.local_steps=2", "simulation.round_timeout_s=120",
]  # fmt: skip


def _from_the_public_port(fed: LocalFederation, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`flwr ARGS public` run by someone who holds only ca.crt and reaches only the public port."""
    cmd = [flower_bin("flwr"), *args, "public"]
    return subprocess.run(cmd, env=fed.env(home), cwd=home, capture_output=True, text=True, timeout=120)


@pytest.mark.deploy
def test_supernodes_with_tls_and_node_auth_run_refuse_a_stranger_and_survive_a_lost_node(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path / "federation")
    out = tmp_path / "runs"
    run: subprocess.Popen[bytes] | None = None
    try:
        fed.start_superlink()
        keys = make_node_keys(tmp_path / "keys", 3)
        for key in keys[:2]:  # the third key is not on the allow-list
            fed.register(key)

        # Only the Fleet API is reachable from the public port: with the CA every device holds,
        # registering a key, listing runs and submitting a run all fail there (nginx answers 404).
        assert fed.certs is not None
        attacker = tmp_path / "attacker"
        write_connection(attacker, fed.address, fed.certs.ca, name="public")
        for args in (
            ("supernode", "register", str(keys[2].public)),
            ("ls",),
            ("run", str(project_root()), "--run-config", 'scenario="scenarios/tiny.toml"'),
        ):
            done = _from_the_public_port(fed, attacker, *args)
            assert done.returncode != 0 and "404 Not Found" in done.stdout + done.stderr, (args, done)
        control = [
            line for line in (fed.workdir / "proxy-access.log").read_text().splitlines() if "/v1/control/" in line
        ]
        assert len(control) >= 3 and all('" 404 ' in line for line in control), control
        nodes = [fed.start_supernode(TINY, i, keys[i], E2E) for i in range(2)]
        stranger = fed.start_supernode(TINY, 1, keys[2], E2E, name="stranger")
        with (tmp_path / "flwr-run.log").open("wb") as log:
            run = subprocess.Popen(
                fed.run_command(TINY, E2E, out),
                env=fed.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        assert stranger.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (fed.workdir / "stranger.log").read_text()

        # Mid-round 2: supernode-1 has its second training message; it vanishes (power cut).
        log1 = fed.workdir / "supernode-1.log"
        wait_until(
            lambda: log1.read_text().count("Receiving: train message") >= 2,
            timeout=240,
            what="round 2 to reach supernode-1",
        )
        os.killpg(nodes[1].pid, signal.SIGKILL)
        nodes[1].wait()

        assert run.wait(timeout=240) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]

        # A run that fails on the server (its run directory cannot be made: `out` is a file) makes
        # `fedsim deploy run` exit 1, where `flwr run --stream` alone exits 0.
        (tmp_path / "not-a-folder").write_text("")
        failing = fed.run_command(TINY, [*E2E, "name=failing"], tmp_path / "not-a-folder")
        done = subprocess.run(failing, env=fed.env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "the run failed" in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    finally:
        for proc in [*([run] if run else []), *reversed(fed.processes)]:
            stop_group(proc)

    metrics = read_metrics(out / "deployed")
    assert sorted(metrics["round"].unique()) == [0, 1, 2]
    train = metrics[metrics["kind"] == "train"].set_index(["round", "client_id"])
    assert train["status"].to_dict() == {(1, 0): "ok", (1, 1): "ok", (2, 0): "ok", (2, 1): "failed"}
    # Flower's SuperLink answers for the lost node (two missed 30 s heartbeats) before the
    # 120 s round timeout: the same path as with the default timeout of an hour.
    assert train.loc[(2, 1), "reason"].startswith("node unavailable")
    ok = metrics[(metrics["kind"] == "train") & (metrics["status"] == "ok")]
    assert (ok["wall_time_s"] > 0).all()
    # the measured clock: compute is the client's own training time, the rest of the round trip
    # (polling, a forked ClientApp process, the transfer) is the server-measured remainder
    assert (ok["sim_compute_s"] == ok["wall_time_s"]).all() and (ok["sim_comm_s"] > 0).all()
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")
    assert central.loc[2, "sim_time_s"] > central.loc[1, "sim_time_s"] > 0
    assert (out / "deployed" / "checkpoints" / "round_2").is_dir() and (out / "deployed" / "adapter").is_dir()
