"""`fedsim dashboard`: a web dashboard over a folder of run directories, on the standard library's
threading HTTP server (no web framework to install, nothing to build, no JavaScript).

Routes (every `<name>` is one run directory directly under the root; anything else is a 404):

    /                               every run, most recently changed first; tick runs to compare
    /run/<name>                     one run: plots, per-round table, last round's clients, events, scenario
    /run/<name>/plot/<which>.png    a plot of that run: accuracy, loss, sim_time (if the run records it)
    /compare?runs=a,b               several runs' accuracy on one plot, final metrics side by side
                                    (also ?run=a&run=b, which the index's form sends)
    /compare/accuracy.png?runs=a,b  that plot
    /api/runs, /api/run/<name>      the same data as JSON, for scripts

Every request reads the run directories afresh (they are small), so a run in progress shows its
latest round; HTML pages reload themselves every 10 s (`?refresh=0` pauses that). There is no
authentication: it listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pandas as pd

from dashboards import pages
from dashboards.runs import RunNotFoundError, last_round_clients, list_runs, load_run, read_events, summary
from fedsim.results.plots import RUN_PLOTS, available_plots, compare_accuracy_png

logger = logging.getLogger(__name__)

Query = dict[str, list[str]]


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


def _html(text: str, status: int = HTTPStatus.OK) -> Response:
    return Response(status, "text/html; charset=utf-8", text.encode())


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json(data: Any, status: int = HTTPStatus.OK) -> Response:
    body = json.dumps(_finite(data), default=str, allow_nan=False, indent=1)
    return Response(status, "application/json", body.encode())


def _records(frame: pd.DataFrame, *, index: bool) -> list[dict[str, Any]]:
    """A DataFrame as JSON records (pandas writes NaN and NA as null)."""
    frame = frame.reset_index() if index else frame
    return json.loads(frame.to_json(orient="records"))


def _refresh(query: Query) -> tuple[int, str]:
    """The page's reload interval (`?refresh=SECONDS`, default 10) and a query that toggles it."""
    try:
        seconds = max(0, int(query.get("refresh", [""])[0]))
    except ValueError:
        seconds = pages.REFRESH_S
    pairs = [(k, v) for k, values in query.items() if k != "refresh" for v in values]
    pairs += [("refresh", "0")] if seconds > 0 else []
    return seconds, "?" + urlencode(pairs)


def _compared_names(query: Query) -> list[str]:
    """Runs to compare: `runs=a,b` (comma-separated) and/or `run=a&run=b`, first mention first."""
    names = [n for value in query.get("runs", []) for n in value.split(",")] + query.get("run", [])
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def index_response(root: Path, query: Query) -> Response:
    seconds, toggle = _refresh(query)
    return _html(pages.index_page(list_runs(root), root, refresh_s=seconds, toggle_url="/" + toggle))


def run_response(root: Path, name: str, query: Query) -> Response:
    run = load_run(root, name)
    plots = available_plots(run.table) if run.table is not None else []
    seconds, toggle = _refresh(query)
    page = pages.run_page(
        run,
        plots,
        last_round_clients(run),
        read_events(run),
        refresh_s=seconds,
        toggle_url=pages.run_url(name) + toggle,
    )
    return _html(page)


def run_plot_response(root: Path, name: str, filename: str) -> Response:
    run = load_run(root, name)
    which = filename.removesuffix(".png")
    if not filename.endswith(".png") or which not in RUN_PLOTS:
        return not_found(f"no plot {filename!r}; plots are {', '.join(f'{p}.png' for p in RUN_PLOTS)}")
    if run.table is None or which not in available_plots(run.table):
        return not_found(f"run {name!r} has no data for the {which} plot: {'; '.join(run.errors) or 'missing columns'}")
    return Response(HTTPStatus.OK, "image/png", RUN_PLOTS[which].render(run.table))


def compare_response(root: Path, query: Query) -> Response:
    names = _compared_names(query)
    if not names:
        message = "choose runs to compare: tick them on the index page, or /compare?runs=a,b"
        return _html(pages.error_page("nothing to compare", message), HTTPStatus.BAD_REQUEST)
    runs = [load_run(root, name) for name in names]
    seconds, toggle = _refresh(query)
    plot_url = "/compare/accuracy.png?" + urlencode([("run", name) for name in names])
    return _html(pages.compare_page(runs, plot_url, refresh_s=seconds, toggle_url="/compare" + toggle))


def compare_plot_response(root: Path, query: Query) -> Response:
    runs = [load_run(root, name) for name in _compared_names(query)]
    tables = {run.name: run.table for run in runs if run.table is not None}
    return Response(HTTPStatus.OK, "image/png", compare_accuracy_png(tables))


def api_run(root: Path, name: str) -> Response:
    run = load_run(root, name)
    data = {
        "summary": summary(run),
        "scenario": run.scenario,
        "rounds": _records(run.table, index=True) if run.table is not None else [],
        "clients_last_round": _records(last_round_clients(run), index=False),
        "events": read_events(run),
    }
    return _json(data)


def not_found(message: str, *, api: bool = False) -> Response:
    if api:
        return _json({"error": message}, HTTPStatus.NOT_FOUND)
    return _html(pages.error_page("not found", message), HTTPStatus.NOT_FOUND)


def route(root: Path, target: str) -> Response:
    """The response to `GET target` (a request path with its query) for runs under `root`."""
    url = urlsplit(target)
    parts = [unquote(part) for part in url.path.split("/") if part]
    query = parse_qs(url.query)
    try:
        match parts:
            case []:
                return index_response(root, query)
            case ["run", name]:
                return run_response(root, name, query)
            case ["run", name, "plot", filename]:
                return run_plot_response(root, name, filename)
            case ["compare"]:
                return compare_response(root, query)
            case ["compare", "accuracy.png"]:
                return compare_plot_response(root, query)
            case ["api", "runs"]:
                return _json([summary(run) for run in list_runs(root)])
            case ["api", "run", name]:
                return api_run(root, name)
    except RunNotFoundError as exc:
        return not_found(str(exc), api=parts[:1] == ["api"])
    return not_found(f"no page at {url.path}", api=parts[:1] == ["api"])


class DashboardServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the folder of runs it shows."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], runs_root: Path) -> None:
        self.runs_root = Path(runs_root)
        super().__init__(address, DashboardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"


class DashboardHandler(BaseHTTPRequestHandler):
    """GET only; routing and pages live in `route`, this class only speaks HTTP."""

    server: DashboardServer

    def do_GET(self) -> None:
        try:
            response = route(self.server.runs_root, self.path)
        except Exception as exc:  # a bug must cost one request its page, never the server
            logger.exception("dashboard: GET %s failed", self.path)
            page = pages.error_page("server error", f"{type(exc).__name__}: {exc}")
            response = _html(page, HTTPStatus.INTERNAL_SERVER_ERROR)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def serve(runs_root: Path, host: str = "127.0.0.1", port: int = 8050) -> DashboardServer:
    """A dashboard server bound to `host:port` (0: any free port), not yet serving: call
    `serve_forever()` (in a thread, for tests) or `run_forever`; `shutdown()` stops it."""
    return DashboardServer((host, port), Path(runs_root))


def run_forever(server: DashboardServer) -> None:
    """Serve until Ctrl-C, then release the port."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim dashboard", description="Web dashboard over fedsim run directories.")
    parser.add_argument(
        "runs_root",
        metavar="RUNS_ROOT",
        type=Path,
        nargs="?",
        default=Path("runs"),
        help="folder holding run directories (default: runs)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8050, help="port to listen on; 0 picks a free one (default: 8050)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        server = serve(args.runs_root, args.host, args.port)
    except OSError as exc:
        print(
            f"fedsim dashboard: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
            f"choose another with --port PORT (0: any free port)",
            file=sys.stderr,
        )
        return 1
    print(f"fedsim dashboard: {server.url}  (runs under {args.runs_root.resolve()}; Ctrl-C stops it)", flush=True)
    if args.host not in {"127.0.0.1", "localhost", "::1"}:
        print(f"note: no authentication; anyone who can reach {args.host}:{args.port} can read these runs", flush=True)
    run_forever(server)
    return 0
