"""Pieces the dashboard's pages share: addresses of pages, small tables, the status badge, grid
column formats. Every string from a run directory reaches the page as a text node (Dash's
components escape it); none is ever parsed as HTML or Markdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote, urlencode

from dash import dcc, html

from dashboards.runs import Status

POLL_S = 5.0  # how often a page asks whether its runs changed


def run_url(name: str) -> str:
    """The page of run `name` ("." is the root itself)."""
    return "/run" if name == "." else "/run/" + "/".join(quote(part, safe="") for part in name.split("/"))


def run_name(pathname: str) -> str:
    """The run name in a /run/... address (the inverse of `run_url`)."""
    parts = [unquote(p) for p in pathname.split("/")[2:] if p]
    return "/".join(parts) if parts else "."


def compare_url(names: Sequence[str] = (), folder: str | None = None) -> str:
    """The comparison page of runs `names`, or of every run in a `fedsim compare` folder."""
    pairs = [("folder", folder)] if folder is not None else [("run", name) for name in names]
    return "/compare?" + urlencode(pairs)


def badge(status: Status) -> html.Span:
    return html.Span(status, className=f"badge badge-{status}")


def table(rows: Sequence[Sequence[Any]], head: Sequence[str], *, id: str | None = None) -> html.Table:
    """A small table of text cells (first column as row headers)."""
    body = [
        html.Tr([html.Th(str(r[0]))] + [html.Td(c if isinstance(c, html.Base) else str(c)) for c in r[1:]])
        for r in rows
    ]
    children = [html.Thead(html.Tr([html.Th(h) for h in head])), html.Tbody(body)]
    return html.Table(children, className="small", id=id) if id else html.Table(children, className="small")


def section(title: str, *children: Any, id: str | None = None) -> html.Section:
    return html.Section([html.H2(title), *children], id=id or f"section-{title.lower().replace(' ', '-')}")


def radio(id: str, options: dict[str, str], value: str) -> dcc.RadioItems:
    return dcc.RadioItems(
        id=id,
        options=[{"label": v, "value": k} for k, v in options.items()],
        value=value,
        inline=True,
        className="control",
    )


def smoothing(id: str) -> html.Div:
    return html.Div(
        [
            html.Label("smoothing", htmlFor=id),
            dcc.Slider(id=id, min=0, max=0.95, step=0.05, value=0.0, marks=None, tooltip={"placement": "bottom"}),
        ],
        className="control slider",
    )


def note(text: str, kind: str = "muted") -> html.P:
    return html.P(text, className=kind)


# AG Grid value formatters (dashboards/assets/dashAgGridFunctions.js), by kind of column
_FORMATTERS = {
    "bytes": "humanBytes(params.value)",
    "flops": "humanSI(params.value, 'FLOP')",
    "seconds": "humanSeconds(params.value)",
    "number": "num(params.value)",
}


def column(field: str, header: str, kind: str = "text", **extra: Any) -> dict[str, Any]:
    """An AG Grid column: numbers filter as numbers and show in human units."""
    spec: dict[str, Any] = {"field": field, "headerName": header}
    if kind == "text":
        spec["filter"] = "agTextColumnFilter"
    else:
        spec |= {"filter": "agNumberColumnFilter", "type": "numericColumn"}
        spec["valueFormatter"] = {"function": _FORMATTERS[kind]}
    return spec | extra
