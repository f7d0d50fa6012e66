"""What a deployment exposes, and what a SuperNode checks before it starts: the proxy's
configuration (nginx itself checks it), the SuperLink probe's messages against real TLS and plain
servers, the runtime port, and what `flwr run` bundles."""

from __future__ import annotations

import io
import socket
import ssl
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.runtime.deploy import proxy
from fedsim.runtime.deploy.certs import Certificates, make_certificates
from fedsim.runtime.deploy.errors import DeployError
from fedsim.runtime.deploy.link_check import link_problem, wait_for_link
from fedsim.runtime.deploy.proxy import FLEET_PREFIX, Proxy, nginx_binary
from fedsim.runtime.deploy.supernode import runtime_port

ROOT = Path(__file__).resolve().parents[3]
needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (install.sh installs it)")


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


# --- the proxy --------------------------------------------------------------------------------


@needs_nginx
def test_the_proxy_forwards_only_the_fleet_api_and_nginx_accepts_its_configuration(
    tmp_path: Path, certs: Certificates
) -> None:
    p = Proxy("0.0.0.0", 9093, 9092, certs, tmp_path / "proxy")
    p.workdir.mkdir()
    cmd = p.command()
    text = p.config_path.read_text()
    locations = [line.strip() for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == [f"location {FLEET_PREFIX} {{", "location / { return 404; }"]
    assert "limit_except POST { deny all; }" in text and "proxy_pass https://127.0.0.1:9092;" in text
    assert "listen 0.0.0.0:9093 ssl;" in text and "proxy_ssl_verify on;" in text
    checked = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_a_tls_superlink_is_never_started_without_its_proxy(
    tmp_path: Path, certs: Certificates, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(proxy, "nginx_binary", lambda: None)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert main(["deploy", "superlink", "--certs", str(certs.ca.parent), "--host", "0.0.0.0"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "nginx is not installed" in err and "apt-get install nginx-light" in err and "--insecure" in err
    assert not (tmp_path / "home").exists()  # nothing written


# --- the SuperLink probe --------------------------------------------------------------------


@pytest.fixture
def tls_server(certs: Certificates) -> Iterator[int]:
    """A TLS server with the SuperLink's certificate (it answers nothing)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    yield from _serve(lambda conn: context.wrap_socket(conn, server_side=True).close())


@pytest.fixture
def plain_server() -> Iterator[int]:
    """A plain HTTP server that answers 400 to anything, as an insecure SuperLink would."""
    yield from _serve(lambda conn: (conn.recv(1024), conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")))


def _serve(handle) -> Iterator[int]:  # type: ignore[no-untyped-def]
    server = socket.create_server(("0.0.0.0", 0))  # 127.0.0.2 reaches it too
    server.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                handle(conn)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_a_matching_superlink_passes(tls_server: int, certs: Certificates, plain_server: int) -> None:
    assert link_problem("127.0.0.1", tls_server, certs.ca, insecure=False) is None
    assert link_problem("127.0.0.1", plain_server, None, insecure=True) is None


def test_an_insecure_supernode_is_told_the_superlink_speaks_tls(tls_server: int) -> None:
    problem = link_problem("127.0.0.1", tls_server, None, insecure=True)
    assert problem is not None and "speaks TLS" in problem and "--ca CA --key KEY instead" in problem


def test_a_tls_supernode_is_told_the_superlink_does_not_speak_tls(plain_server: int, certs: Certificates) -> None:
    problem = link_problem("127.0.0.1", plain_server, certs.ca, insecure=False)
    assert problem is not None and "does not speak TLS" in problem


def test_a_wrong_ca_and_a_name_the_certificate_lacks_are_named(
    tls_server: int, tmp_path: Path, certs: Certificates
) -> None:
    other = make_certificates(tmp_path / "other").ca
    problem = link_problem("127.0.0.1", tls_server, other, insecure=False)
    assert problem is not None and f"--ca {other} did not sign" in problem
    problem = link_problem("127.0.0.2", tls_server, certs.ca, insecure=False)  # loopback, not in the SANs
    assert problem is not None and "not valid for '127.0.0.2'" in problem and "--host 127.0.0.2" in problem


def test_nobody_listening_gives_up_after_the_tries_it_was_given(certs: Certificates) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        problem = wait_for_link("127.0.0.1", port, certs.ca, insecure=False, tries=3, every_s=0.01)
    assert problem is not None and f"nothing answers at 127.0.0.1:{port} after 3 tries" in problem


# --- the runtime port -------------------------------------------------------------------------


def test_a_runtime_port_in_use_is_refused_and_none_given_picks_the_partitions_own_or_the_next() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        with pytest.raises(DeployError, match=f"--runtime-port {taken} is in use"):
            runtime_port(taken, 0)
        with socket.create_server(("127.0.0.1", 9094 + 7)) as also_busy:  # partition 7's own port is taken
            assert also_busy and runtime_port(None, 7) == 9094 + 8


# --- what `flwr run` sends to every node ----------------------------------------------------


def test_the_app_bundle_holds_the_code_and_the_scenarios_only() -> None:
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pyproject.toml", ".info", "fedsim", "clients", "strategies", "scenarios"}
    assert "clients/app.py" in names and "fedsim/runtime/server_app.py" in names and "scenarios/tiny.toml" in names
    assert all(n.endswith((".py", ".toml")) for n in names if not n.startswith(".info"))
