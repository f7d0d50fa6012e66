"""The dashboard served over real HTTP on an ephemeral port, against fake run directories."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image
from tests_support.fake_runs import write_run

from dashboards.app import main, route, serve
from fedsim.results.plots import SIZE_PX

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)"


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass(frozen=True)
class Dashboard:
    base: str
    root: Path

    def get(self, path: str) -> Reply:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return Reply(response.status, response.headers["Content-Type"], response.read())
        except urllib.error.HTTPError as error:
            return Reply(error.code, error.headers["Content-Type"], error.read())


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    root = tmp_path_factory.mktemp("runs")
    outside = tmp_path_factory.mktemp("outside")
    write_run(
        root, "alpha", [0.25, 0.5, 0.75, 0.625], events=[{"event": "run_start"}, {"event": "round_end", "round": 3}]
    )
    write_run(root, "beta", [0.125, 0.375, 0.5], strategy="flexlora")
    write_run(root, "gamma", [0.0, 0.5], sim_time=True)
    write_run(root, "broken", [0.5]).joinpath("metrics.parquet").write_bytes(b"this is not parquet")
    write_run(root, EVIL, [0.5, 0.5], scenario='# </script><script>alert(2)</script>\nname = "<script>alert(3)"\n')
    # A run outside the root, reachable only through a symlink; a run whose scenario links out.
    write_run(outside, "elsewhere", [0.5, 0.5])
    (root / "escape").symlink_to(outside / "elsewhere", target_is_directory=True)
    (outside / "secret.txt").write_text("TOPSECRET")
    leaky = write_run(root, "leaky", [0.5, 0.5])
    (leaky / "scenario.toml").unlink()
    (leaky / "scenario.toml").symlink_to(outside / "secret.txt")
    # alpha changed last, beta just before it: the index lists alpha, then beta, then the rest.
    for age, name in enumerate(["alpha", "beta"]):
        for path in [root / name, root / name / "metrics.parquet", root / name / "events.jsonl"]:
            os.utime(path, (4_000_000_000 - age, 4_000_000_000 - age))

    server = serve(root, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Dashboard(f"http://127.0.0.1:{server.server_address[1]}", root)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _row(page: str, name: str) -> str:
    """The index table row of run `name`."""
    rows = [row for row in re.findall(r"<tr>.*?</tr>", page, re.S) if f">{name}</a>" in row]
    assert len(rows) == 1, f"expected one row for {name}, found {len(rows)}"
    return rows[0]


def _cells(row: str) -> list[str]:
    return re.findall(r"<td>(.*?)</td>", row)


def test_index_lists_runs_with_final_and_best_accuracy(dashboard: Dashboard) -> None:
    reply = dashboard.get("/")

    assert reply.status == 200 and reply.content_type.startswith("text/html")
    alpha, beta = _row(reply.text, "alpha"), _row(reply.text, "beta")
    # numeric cells: rounds, final accuracy, best accuracy, wall time, updated
    assert _cells(alpha)[:4] == ["3 / 3", "0.625", "0.75", "31.5"]
    assert _cells(beta)[:4] == ["2 / 2", "0.5", "0.5", "21.5"]
    assert "flexlora" in beta and "tiny-llama" in alpha and "sentiment" in alpha
    assert 'href="/run/alpha"' in alpha and 'name="run" value="alpha"' in alpha


def test_index_lists_most_recently_changed_first(dashboard: Dashboard) -> None:
    page = dashboard.get("/").text

    names = re.findall(r'<input type="checkbox" name="run" value="([^"]*)">', page)

    assert names[:2] == ["alpha", "beta"]
    assert {"gamma", "broken", "leaky"} <= set(names)


def test_pages_reload_every_10_s_unless_paused(dashboard: Dashboard) -> None:
    assert '<meta http-equiv="refresh" content="10">' in dashboard.get("/").text
    assert '<meta http-equiv="refresh" content="10">' in dashboard.get("/run/alpha").text
    assert 'http-equiv="refresh"' not in dashboard.get("/run/alpha?refresh=0").text


def test_run_page_shows_round_table_clients_events_and_scenario(dashboard: Dashboard) -> None:
    reply = dashboard.get("/run/alpha")

    assert reply.status == 200
    page = reply.text
    for value in ["0.625", "0.75", "1.25", "2.75", "1.75", "31.5"]:  # accuracies, losses, wall time
        assert f"<td>{value}</td>" in page
    assert "Clients in round 3" in page and "eval_client" in page
    assert "run_start" in page and "round_end" in page
    assert "<pre>name = &quot;alpha&quot;" in page and "[strategy]" in page


def test_run_page_images_are_pngs(dashboard: Dashboard) -> None:
    sources = re.findall(r'<img src="([^"]+)"', dashboard.get("/run/alpha").text)

    assert sources == ["/run/alpha/plot/accuracy.png", "/run/alpha/plot/loss.png"]
    for source in sources:
        reply = dashboard.get(source)
        assert reply.status == 200 and reply.content_type == "image/png"
        assert reply.body.startswith(PNG_SIGNATURE) and len(reply.body) > 5_000
        assert Image.open(io.BytesIO(reply.body)).size == SIZE_PX


def test_sim_time_plot_appears_only_when_the_metrics_have_sim_time(dashboard: Dashboard) -> None:
    page = dashboard.get("/run/gamma").text

    assert '<img src="/run/gamma/plot/sim_time.png"' in page
    assert dashboard.get("/run/gamma/plot/sim_time.png").body.startswith(PNG_SIGNATURE)
    assert dashboard.get("/run/alpha/plot/sim_time.png").status == 404


def test_api_run_has_rounds_accuracy_and_clients(dashboard: Dashboard) -> None:
    reply = dashboard.get("/api/run/alpha")

    assert reply.status == 200 and reply.content_type == "application/json"
    data = json.loads(reply.body)
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2, 3]
    assert [r["central_accuracy"] for r in data["rounds"]] == [0.25, 0.5, 0.75, 0.625]
    assert data["rounds"][0]["train_loss"] is None  # NaN in the table, null in JSON
    assert data["summary"]["final_accuracy"] == 0.625 and data["summary"]["best_accuracy"] == 0.75
    assert sorted(r["client_id"] for r in data["clients_last_round"]) == [0, 1, 2]
    assert data["scenario"]["strategy"]["name"] == "fedit"


def test_api_runs_lists_every_run(dashboard: Dashboard) -> None:
    data = json.loads(dashboard.get("/api/runs").body)

    by_name = {run["name"]: run for run in data}
    assert by_name["beta"]["final_accuracy"] == 0.5 and by_name["beta"]["strategy"] == "flexlora"
    assert by_name["broken"]["final_accuracy"] is None and by_name["broken"]["errors"]
    assert "escape" not in by_name


@pytest.mark.parametrize(
    "path",
    [
        "/run/nope",
        "/run/..",
        "/run/%2e%2e",
        "/run/..%2F..%2Fetc",
        "/run/%2Fetc",
        "/run/../alpha",
        "/run/escape",  # a symlink out of the root
        "/run/alpha/plot/nope.png",
        "/api/run/..",
        "/api/run/nope",
        "/nowhere",
    ],
)
def test_unknown_or_escaping_paths_are_404(dashboard: Dashboard, path: str) -> None:
    assert dashboard.get(path).status == 404


def test_unknown_run_page_says_so(dashboard: Dashboard) -> None:
    reply = dashboard.get("/run/nope")

    assert "no run named &#x27;nope&#x27;" in reply.text
    assert json.loads(dashboard.get("/api/run/nope").body) == {"error": f"no run named 'nope' under {dashboard.root}"}


def test_symlinks_out_of_the_root_are_not_followed(dashboard: Dashboard) -> None:
    assert "escape" not in dashboard.get("/").text
    leaky = dashboard.get("/run/leaky")
    assert leaky.status == 200 and "TOPSECRET" not in leaky.text and "no scenario.toml" in leaky.text


def test_corrupt_metrics_show_an_error_on_the_run_page_and_index_still_works(dashboard: Dashboard) -> None:
    page = dashboard.get("/run/broken")
    index = dashboard.get("/")

    assert page.status == 200 and "cannot read metrics.parquet" in page.text and "<img" not in page.text
    assert index.status == 200 and "cannot read metrics.parquet" in _row(index.text, "broken")
    assert dashboard.get("/run/broken/plot/accuracy.png").status == 404


def test_names_and_scenario_from_files_are_escaped(dashboard: Dashboard) -> None:
    index = dashboard.get("/").text
    page = dashboard.get("/run/" + quote(EVIL, safe="")).text

    assert "<script" not in index and "<script" not in page
    assert "&lt;script&gt;alert(1)" in index
    assert "&lt;/script&gt;&lt;script&gt;alert(2)" in page


@pytest.mark.parametrize("query", ["runs=alpha,beta", "run=alpha&run=beta"])
def test_compare_plots_and_tabulates_the_chosen_runs(dashboard: Dashboard, query: str) -> None:
    reply = dashboard.get("/compare?" + query)

    assert reply.status == 200
    final = re.search(r"final central accuracy</th>(.*?)</tr>", reply.text)
    assert final is not None and re.findall(r"<td>(.*?)</td>", final.group(1)) == ["0.625", "0.5"]
    (source,) = re.findall(r'<img src="([^"]+)"', reply.text)
    plot = dashboard.get(source.replace("&amp;", "&"))
    assert plot.status == 200 and Image.open(io.BytesIO(plot.body)).size == SIZE_PX


def test_compare_rejects_unknown_runs_and_empty_choices(dashboard: Dashboard) -> None:
    assert dashboard.get("/compare?runs=alpha,nope").status == 404
    assert dashboard.get("/compare").status == 400


def test_empty_root_says_there_are_no_runs(tmp_path: Path) -> None:
    response = route(tmp_path / "not-yet", "/")

    assert response.status == 200 and b"No runs under" in response.body


def test_main_reports_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        code = main([str(tmp_path), "--port", str(port)])

    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_failing_page_is_a_500_and_the_server_keeps_serving(
    dashboard: Dashboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(root: Path) -> list[object]:
        raise RuntimeError("boom <b>")

    monkeypatch.setattr("dashboards.app.list_runs", broken)
    failed = dashboard.get("/")
    monkeypatch.undo()

    assert failed.status == 500 and "RuntimeError: boom &lt;b&gt;" in failed.text
    assert dashboard.get("/").status == 200
