"""Before a SuperNode starts: does the SuperLink answer, and in the way this node will talk to it?

Flower's SuperNode retries a SuperLink it cannot talk to without end and without saying why (an
`--insecure` node against a TLS SuperLink, a CA that did not sign its certificate). `fedsim
supernode` asks first, a bounded number of times, and names the problem.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether `host:port` completes a TLS handshake (its certificate not checked here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=host):
                return True
        except (ssl.SSLError, ConnectionError, TimeoutError):
            return False


def link_problem(host: str, port: int, ca: Path | None, insecure: bool, timeout: float = 10.0) -> str | None:
    """None if the SuperLink at `host:port` is there and speaks as this node will (TLS whose
    certificate `ca` signed for `host`, or plain HTTP with `insecure`); else what is wrong.
    OSError if nothing answers at `host:port`."""
    where = f"the SuperLink at {host}:{port}"
    tls = _speaks_tls(host, port, timeout)
    if insecure:
        return (
            f"{where} speaks TLS (it was started with certificates), but this SuperNode has --insecure: give it "
            "--ca CA --key KEY instead"
            if tls
            else None
        )
    if not tls:
        return (
            f"{where} does not speak TLS (it was started with --insecure?): start it with --certs, or give this "
            "SuperNode --insecure too (no TLS, no authentication)"
        )
    assert ca is not None
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout) as sock, context.wrap_socket(sock, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as err:
        if "hostname" in str(err.verify_message).lower() or "ip address mismatch" in str(err).lower():
            return (
                f"{where} has a certificate that is not valid for {host!r}: remake it with `fedsim deploy certs DIR "
                f"--host {host}` and restart the SuperLink, or dial it by a name the certificate has"
            )
        return (
            f"{where} has a certificate that --ca {ca} did not sign ({err.verify_message}): copy the ca.crt "
            "of the SuperLink's `fedsim deploy certs` folder to this device"
        )


def wait_for_link(
    host: str, port: int, ca: Path | None, insecure: bool, tries: int = 30, every_s: float = 2.0
) -> str | None:
    """`link_problem`, asking up to `tries` times `every_s` apart while nothing answers; a problem
    saying so when nothing ever did."""
    for attempt in range(tries):
        try:
            return link_problem(host, port, ca, insecure)
        except OSError as err:
            last = err
            if attempt < tries - 1:
                time.sleep(every_s)
    return (
        f"nothing answers at {host}:{port} after {tries} tries over {tries * every_s:g} s ({last.strerror or last}): "
        "is the SuperLink running (`fedsim deploy superlink`), and is that its public port, open on its firewall?"
    )
