"""`fedsim dashboard`: a Plotly Dash app over a folder of run directories.

Pages (rendered in the browser, updated by callbacks without reloading):

    /                       every run under the root at any depth (`runs_page`); when the root is a
                            `fedsim compare` folder, its comparison
    /runs                   every run, always
    /run/<name>             one run (`run_page`); <name> is its path under the root, e.g.
                            tiny-compare/fedit-seed0; a `fedsim compare` folder opens its comparison
    /compare?run=a&run=b    several runs side by side (`compare_page`); ?folder=F: every run of F
    /api/runs, /api/run/<name>   the same data as JSON, for scripts (404 for an unknown run)

Everything the browser loads is served from the installed packages (Dash, Plotly, AG Grid) and
`dashboards/assets/`: no CDN, no external script or stylesheet. The server is werkzeug's threaded
WSGI server; a browser that goes away mid-request costs nothing but that request (no traceback on
the terminal), HEAD is answered like GET. There is no authentication: it listens on 127.0.0.1
unless `--host` says otherwise, and then says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import flask
from dash import Dash, Input, Output, dcc, html
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from dashboards import compare_page, run_page, runs_page
from dashboards.runs import (
    RunNotFoundError,
    is_comparison,
    last_round_clients,
    list_runs,
    load_run,
    read_events,
    resolve,
    runs_in,
    summary,
)
from dashboards.widgets import POLL_S, note, run_name

logger = logging.getLogger(__name__)
ASSETS = Path(__file__).with_name("assets")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json(data: Any, status: int = 200) -> flask.Response:
    body = json.dumps(_finite(data), default=str, allow_nan=False, indent=1)
    return flask.Response(body, status=status, mimetype="application/json")


def _records(frame: Any) -> list[dict[str, Any]]:
    return list(json.loads(frame.to_json(orient="records")))


def api_run(root: Path, name: str) -> flask.Response:
    """/api/run/<name>: the run's summary, scenario, per-round table, last round's clients, events."""
    try:
        run = load_run(root, name)
    except RunNotFoundError as exc:
        return _json({"error": str(exc)}, 404)
    data = {
        "summary": summary(run),
        "scenario": run.scenario,
        "rounds": _records(run.table.reset_index()) if run.table is not None else [],
        "clients_last_round": _records(last_round_clients(run)),
        "events": read_events(run),
    }
    return _json(data)


def _api_not_found(rest: str) -> flask.Response:
    """Any other /api/... address (e.g. /api/run/%2Fetc, which arrives as /api/run//etc)."""
    what = f"no run named {rest.removeprefix('run/')!r}" if rest.startswith("run/") else f"nothing at /api/{rest}"
    return _json({"error": what}, 404)


def not_found(message: str) -> html.Div:
    return html.Div([html.H1("Not found"), note(message, "error"), dcc.Link("all runs", href="/runs")], id="not-found")


def page(root: Path, pathname: str | None, search: str | None, poll_s: float) -> Any:
    """The page at `pathname` + `search` (the router's work, a pure function of the address)."""
    path = pathname or "/"
    query = parse_qs((search or "").lstrip("?"))
    try:
        if path in ("/", "") and is_comparison(Path(root)):
            return compare_page.layout(root, runs_in(root, "."), poll_s, folder=".")
        if path in ("/", "", "/runs"):
            return runs_page.layout(root, poll_s)
        if path == "/run" or path.startswith("/run/"):
            name = run_name(path)
            if is_comparison(resolve(root, name)):
                return compare_page.layout(root, runs_in(root, name), poll_s, folder=name)
            return run_page.layout(root, name, poll_s)
        if path == "/compare":
            folder = query.get("folder", [None])[0]
            names = runs_in(root, folder) if folder is not None else _compared(query)
            if not names:
                return not_found("Nothing to compare: tick runs on the runs page, or open /compare?run=A&run=B.")
            return compare_page.layout(root, names, poll_s, folder=folder)
    except RunNotFoundError as exc:
        return not_found(str(exc))
    return not_found(f"No page at {path}.")


def _compared(query: dict[str, list[str]]) -> list[str]:
    """Runs to compare: `run=a&run=b` and/or `runs=a,b`, first mention first."""
    names = query.get("run", []) + [n for value in query.get("runs", []) for n in value.split(",")]
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def create_app(runs_root: Path, poll_s: float = POLL_S) -> Dash:
    """The dashboard over the runs under `runs_root`; pages that show a run in progress ask for
    changes every `poll_s` seconds."""
    root = Path(runs_root)
    app = Dash(
        __name__,
        assets_folder=str(ASSETS),
        serve_locally=True,
        external_scripts=[],
        external_stylesheets=[],
        title="fedsim dashboard",
        update_title="",
        suppress_callback_exceptions=True,  # each page's components exist only while it is shown
    )
    app.layout = html.Div(
        [
            dcc.Location(id="url", refresh="callback-nav"),
            html.Header(
                [dcc.Link("fedsim", href="/"), dcc.Link("runs", href="/runs"), html.Span(str(root), className="muted")],
                className="top",
            ),
            html.Main(id="page"),
        ]
    )

    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None) -> Any:
        return page(root, pathname, search, poll_s)

    runs_page.register(app, root)
    run_page.register(app, root)
    compare_page.register(app, root)
    server = app.server
    server.add_url_rule("/api/runs", "api_runs", lambda: _json([summary(run) for run in list_runs(root)]))
    server.add_url_rule("/api/run/<path:name>", "api_run", lambda name: api_run(root, name))
    server.add_url_rule("/api/<path:rest>", "api_other", _api_not_found)
    return app


class _QuietHandler(WSGIRequestHandler):
    """werkzeug's handler, logging each request at DEBUG on this module's logger."""

    def log(self, type: str, message: str, *args: Any) -> None:
        (logger.warning if type == "error" else logger.debug)("%s " + message, self.address_string(), *args)


class DashboardServer(ThreadedWSGIServer):
    """The dashboard app on werkzeug's threading WSGI server, bound but not yet serving."""

    def __init__(self, host: str, port: int, app: Dash, runs_root: Path) -> None:
        self.runs_root = Path(runs_root)
        self.dash_app = app
        # Bound here, so that a port in use is an OSError (werkzeug would print and exit).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family)
        try:
            super().__init__(host, port, app.server, handler=_QuietHandler, fd=listener.fileno())
        finally:
            listener.close()  # the server holds its own duplicate

    @property
    def url(self) -> str:
        host, port = str(self.host), self.port
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away is no error worth a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("dashboard: client %s went away", client_address)
            return
        super().handle_error(request, client_address)


def serve(runs_root: Path, host: str = "127.0.0.1", port: int = 8050, poll_s: float = POLL_S) -> DashboardServer:
    """A dashboard server bound to `host:port` (0: any free port), not yet serving: call
    `serve_forever()` (in a thread, for tests) or `run_forever`; `shutdown()` stops it."""
    return DashboardServer(host, port, create_app(runs_root, poll_s), runs_root)


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
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dashboard's arguments (shared with `fedsim dashboard`)."""
    parser.add_argument(
        "runs_root",
        metavar="RUNS_ROOT",
        type=Path,
        nargs="?",
        default=Path("runs"),
        help="folder holding run directories, at any depth, or one `fedsim compare` folder (default: runs)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; there is no authentication)",
    )
    parser.add_argument("--port", type=int, default=8050, help="port to listen on; 0 picks a free one (default: 8050)")
    parser.add_argument(
        "--poll",
        type=float,
        default=POLL_S,
        metavar="SECONDS",
        help=f"how often a page showing a run in progress checks for new rounds (default: {POLL_S:g})",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.poll > 0:
        print(f"fedsim dashboard: --poll must be > 0 seconds, got {args.poll}", file=sys.stderr)
        return 2
    try:
        server = serve(args.runs_root, args.host, args.port, args.poll)
    except OSError as exc:
        print(
            f"fedsim dashboard: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
            f"choose another with --port PORT (0: any free port)",
            file=sys.stderr,
        )
        return 1
    print(f"fedsim dashboard: {server.url}  (runs under {args.runs_root.resolve()}; Ctrl-C stops it)", flush=True)
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: listening on {args.host}:{server.server_address[1]} without authentication: anyone who can "
            "reach it can read these runs",
            file=sys.stderr,
            flush=True,
        )
    run_forever(server)
    return 0
