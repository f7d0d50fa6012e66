"""The dashboard served over real HTTP on an ephemeral port: what the server itself answers (the
page shell, its local assets, HEAD, the JSON API, the router's callback), bad input (traversal,
injection, corrupt files) and a browser that goes away. tests/dashboards/test_browser.py drives the
pages in Chromium."""

from __future__ import annotations

import json
import re
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from dashboard_runs import EVIL, Served, make_root, served

from dashboards import app as dashboard_app
from dashboards.app import main, page


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def request(base: str, path: str, method: str = "GET", data: bytes | None = None) -> Reply:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return Reply(response.status, response.headers["Content-Type"] or "", response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers["Content-Type"] or "", error.read())


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = make_root(tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("outside"))
    with served(root) as s:
        yield s


def routed(s: Served, pathname: str, search: str = "") -> Reply:
    """What the router's callback answers for an address, through Dash's own endpoint (as the
    browser asks it)."""
    payload = {
        "output": "page.children",
        "outputs": {"id": "page", "property": "children"},
        "inputs": [
            {"id": "url", "property": "pathname", "value": pathname},
            {"id": "url", "property": "search", "value": search},
        ],
        "changedPropIds": ["url.pathname"],
        "state": [],
    }
    return request(s.base, "/_dash-update-component", "POST", json.dumps(payload).encode())


def test_the_page_shell_loads_only_local_scripts_and_styles(dashboard: Served) -> None:
    reply = request(dashboard.base, "/")

    assert reply.status == 200 and reply.content_type.startswith("text/html")
    sources = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', reply.text)
    assert sources and all(s.startswith("/") and not s.startswith("//") for s in sources), sources
    assert "/assets/style.css" in " ".join(sources) and "dashAgGridFunctions.js" in " ".join(sources)
    for source in sources:
        assert request(dashboard.base, source).status == 200, source
    config = json.loads(
        re.search(r'<script id="_dash-config" type="application/json">(.*?)</script>', reply.text, re.S)[1]
    )  # type: ignore[index]
    assert config["serve_locally"] is True


def test_plotly_js_comes_from_the_installed_package(dashboard: Served) -> None:
    import plotly

    reply = request(dashboard.base, "/_dash-component-suites/plotly/package_data/plotly.min.js")  # what dcc.Graph loads

    local = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert reply.status == 200 and reply.body == local.read_bytes()


@pytest.mark.parametrize("path", ["/", "/api/runs", "/api/run/alpha", "/assets/style.css"])
def test_head_is_answered_like_get_without_a_body(dashboard: Served, path: str) -> None:
    reply = request(dashboard.base, path, "HEAD")

    assert reply.status == 200 and reply.body == b""


def test_api_runs_lists_runs_at_any_depth_with_status(dashboard: Served) -> None:
    runs = {r["name"]: r for r in request(dashboard.base, "/api/runs").json()}

    assert {"alpha", "beta", "live", "fedspine-tiny", "tiny-compare/fedit-seed0", "tiny-compare/flexlora-seed1"} <= set(
        runs
    )
    assert "escape" not in runs and not any(name.startswith("escape/") for name in runs)
    assert runs["alpha"]["status"] == "finished" and runs["live"]["status"] == "running"
    assert runs["alpha"]["final_accuracy"] == 0.625 and runs["alpha"]["best_accuracy"] == 0.75
    assert runs["tiny-compare/flexlora-seed1"]["folder"] == "tiny-compare"
    assert runs["broken"]["final_accuracy"] is None and "cannot read metrics.parquet" in runs["broken"]["errors"][0]


def test_api_run_has_rounds_clients_events_and_scenario(dashboard: Served) -> None:
    data = request(dashboard.base, "/api/run/tiny-compare/fedit-seed1").json()

    assert [r["central_accuracy"] for r in data["rounds"]] == [0.25, 0.375, 0.75]
    assert data["rounds"][0]["train_loss"] is None  # NaN in the table, null in JSON
    assert data["scenario"]["strategy"]["name"] == "fedit" and data["summary"]["seed"] == 1
    assert sorted({c["client_id"] for c in data["clients_last_round"]}) == [0, 2, 3, 4, 5]
    assert data["events"][-1]["event"] == "run_end"


@pytest.mark.parametrize(
    "path",
    ["nope", "..", "%2e%2e", "..%2F..%2Fetc", "%2Fetc", "../alpha", "escape", "escape/..", "alpha/..", "tiny-compare"],
)
def test_unknown_or_escaping_runs_are_404_in_the_api(dashboard: Served, path: str) -> None:
    reply = request(dashboard.base, "/api/run/" + path)

    assert reply.status == 404 and "no run named" in reply.json()["error"]


@pytest.mark.parametrize(
    "pathname",
    ["/run/nope", "/run/..", "/run/%2e%2e/etc", "/run/..%2F..%2Fetc", "/run/escape", "/run/a%00b", "/nowhere"],
)
def test_unknown_or_escaping_addresses_route_to_not_found(dashboard: Served, pathname: str) -> None:
    reply = routed(dashboard, pathname)

    assert reply.status == 200 and '"not-found"' in reply.text and "TOPSECRET" not in reply.text


def test_a_compare_folder_routes_to_its_comparison(dashboard: Served) -> None:
    text = routed(dashboard, "/run/tiny-compare").text

    assert "Compare 4 runs of tiny-compare" in text and "cmp-graph" in text
    assert "Compare 2 runs" in routed(dashboard, "/compare", "?run=alpha&run=tiny-compare%2Ffedit-seed0").text
    assert '"not-found"' in routed(dashboard, "/compare", "?run=alpha&run=..").text
    assert "Nothing to compare" in routed(dashboard, "/compare").text


def test_symlinked_files_are_not_read(dashboard: Served) -> None:
    leaky = routed(dashboard, "/run/leaky").text

    assert "TOPSECRET" not in leaky and "no scenario.toml" in leaky
    assert "TOPSECRET" not in request(dashboard.base, "/api/run/leaky").text


def test_corrupt_metrics_are_an_error_on_the_run_page_not_a_failure(dashboard: Served) -> None:
    reply = routed(dashboard, "/run/broken")

    assert reply.status == 200 and "cannot read metrics.parquet" in reply.text
    assert request(dashboard.base, "/api/runs").status == 200


def test_names_and_scenarios_from_files_never_reach_the_page_as_markup(dashboard: Served) -> None:
    """React renders strings as text; the server must not put them into HTML itself."""
    shell = request(dashboard.base, "/run/" + quote(EVIL, safe="")).text
    run = routed(dashboard, "/run/" + quote(EVIL, safe=""))

    assert EVIL not in shell and "alert(1)" not in shell
    data = run.json()["response"]["page"]["children"]
    assert EVIL in json.dumps(data)  # as a JSON string, for React to render as text
    assert '"dangerouslySetInnerHTML"' not in run.text and '"type": "Markdown"' not in run.text


def test_the_router_says_when_there_are_no_runs(tmp_path: Path) -> None:
    layout = page(tmp_path / "not-yet", "/", "", 5.0)

    assert "No runs under" in json.dumps(layout.to_plotly_json(), default=str)


def test_a_browser_going_away_leaves_no_traceback(dashboard: Served, capfd: pytest.CaptureFixture[str]) -> None:
    host, port = dashboard.base.removeprefix("http://").split(":")
    for partial in (
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET /_dash-component-suites/dash/dcc/async-plotlyjs.js HTTP/1.1\r\n\r\n",
    ):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(partial)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset

    assert request(dashboard.base, "/api/runs").status == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err


def test_a_failing_request_is_a_500_and_the_server_keeps_serving(
    dashboard: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(root: Path) -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(dashboard_app, "list_runs", broken)
    failed = request(dashboard.base, "/api/runs")
    monkeypatch.undo()

    assert failed.status == 500 and request(dashboard.base, "/api/runs").status == 200


def test_main_reports_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        code = main([str(tmp_path), "--port", str(port)])

    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_main_warns_when_listening_beyond_this_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, host: str, warned: bool
) -> None:
    monkeypatch.setattr(dashboard_app, "run_forever", lambda server: server.server_close())

    code = main([str(tmp_path), "--host", host, "--port", "0"])

    out = capsys.readouterr()
    assert code == 0 and "fedsim dashboard: http://" in out.out
    assert ("without authentication" in out.err) is warned
