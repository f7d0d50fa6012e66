"""TLS material for a deployment, made with the `cryptography` package Flower already depends on:

- `make_certificates`: a local CA and a SuperLink certificate it signs, with SANs for 127.0.0.1, ::1
  and localhost (the proxy and the ServerApp connect there) and any host names or IPs the
  SuperNodes dial. For testing and private networks; with real certificates give the same three
  files (CA, certificate chain, key).
- `make_node_keys`: one ECDSA P-384 key pair per SuperNode, in the OpenSSH formats that
  `flwr supernode register KEY.pub` and `flower-supernode --auth-supernode-private-key KEY` read
  (what `ssh-keygen -t ecdsa -b 384` writes).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsim.runtime.deploy.errors import DeployError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


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
