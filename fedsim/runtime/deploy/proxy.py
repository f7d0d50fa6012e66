"""The SuperLink's public face: nginx terminates TLS on the public port and forwards only the Fleet
API (`POST /v1/fleet/...`, every route a SuperNode calls) to a SuperLink bound to 127.0.0.1.

Flower 1.41 serves its Fleet, Control and Runtime APIs on one port, and the open-source SuperLink
authenticates none of the Control routes (`flwr supernode register`, `flwr ls`, `flwr run`; its
account-auth plugins are enterprise-only): whoever reaches that port controls the federation. So
the SuperLink listens on loopback only, operators run `flwr` on the server (or through an SSH
tunnel), and devices reach this proxy, which answers 404 to everything but the Fleet routes
without passing it on.

Why nginx: a well-kept reverse proxy from the distribution's packages (Debian: `nginx-light`) does
TLS termination and path routing in a few lines of configuration. fedsim writes that configuration
and runs nginx in the foreground as a child process (`daemon off`), its pid file, logs and
temporary files in the deployment's work folder: no system service and no root needed.

Client certificates (mTLS) on the public port were considered and left out: Flower's SuperNode
HTTP client (`flwr.supercore.protobuf.client.ProtobufClient`, an `httpx.Client` given `verify=`
only) cannot present one, so they would need a sidecar on every device; node authentication (each
Fleet request signed with the node's registered key) already identifies every device on these
routes, and the SuperLink refuses a key that is not registered.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fedsim.runtime.deploy.certs import Certificates

FLEET_PREFIX = "/v1/fleet/"  # the Fleet API's routes (flwr/superlink/routers/fleet/router.py), all POST
MAX_BODY = "1g"  # the largest request a SuperNode may send (an update, a pushed object)
NGINX_MISSING = (
    "nginx is not installed; the SuperLink is exposed to devices only through it (Fleet API only, the "
    "Control API stays on 127.0.0.1): install it (Debian/Ubuntu: apt-get install nginx-light), or run "
    "with --insecure on a trusted network (no TLS, no authentication, every API exposed)"
)


def nginx_binary() -> str | None:
    """The nginx executable on PATH (or Debian's /usr/sbin/nginx), None if there is none."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    return found


@cache
def _temp_kinds(nginx: str) -> tuple[str, ...]:
    """The temporary-file kinds this nginx build has (`--http-<kind>-temp-path` in `nginx -V`):
    each gets a folder in the work folder, so nginx never needs its system folders."""
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=True).stderr
    return tuple(k.replace("-", "_") for k in re.findall(r"--http-([a-z-]+)-temp-path=", built))


@dataclass(frozen=True)
class Proxy:
    """nginx on `host:port` (TLS with the SuperLink's certificate) in front of the SuperLink at
    127.0.0.1:`upstream_port`; its files live in `workdir`."""

    host: str
    port: int
    upstream_port: int
    certs: Certificates
    workdir: Path

    @property
    def config_path(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.workdir / "proxy-access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "proxy-error.log"

    def config(self, nginx: str) -> str:
        """nginx's configuration: Fleet routes (POST) forwarded over TLS, everything else 404."""
        w = self.workdir
        listen = f"[{self.host}]" if ":" in self.host else self.host
        temps = "".join(f"    {kind}_temp_path {w}/tmp/{kind};\n" for kind in _temp_kinds(nginx))
        return f"""# written by fedsim (fedsim/runtime/deploy/proxy.py); regenerated at every start
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {self.access_log};
{temps}    server_tokens off;
    server {{
        listen {listen}:{self.port} ssl;
        ssl_certificate {self.certs.cert};
        ssl_certificate_key {self.certs.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {MAX_BODY};
        location {FLEET_PREFIX} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://127.0.0.1:{self.upstream_port};
            proxy_ssl_trusted_certificate {self.certs.ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        location / {{ return 404; }}
    }}
}}
"""

    def command(self) -> list[str]:
        """Write the configuration and its folders; the nginx command line that serves it."""
        nginx = nginx_binary()
        if nginx is None:
            raise FileNotFoundError(NGINX_MISSING)
        for kind in _temp_kinds(nginx):
            (self.workdir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config(nginx))
        return [nginx, "-c", str(self.config_path), "-p", str(self.workdir), "-e", str(self.error_log)]
