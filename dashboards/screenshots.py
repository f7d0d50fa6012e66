"""Screenshots of the dashboard's pages for the docs (docs/images/dashboard-*.png):

    .venv/bin/python -m dashboards.screenshots [--runs DIR] [--out docs/images]

Without `--runs` it first makes real runs in /tmp/fedsim-screenshot-runs (about three minutes on
two cores, kept for the next time): a `fedsim compare` of fedit and flexlora over two seeds on
scenarios/tiny-mixed-rank.toml, and a bandit-controlled, pruned FedSpine fleet on the tiny model.
Then it serves the dashboard over them on a free port and photographs each page in headless
Chromium (Debian's `chromium`, or $FEDSIM_CHROMIUM) through Playwright (`pip install -e .[test]`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashboards.app import serve

RUNS = Path("/tmp/fedsim-screenshot-runs")
FLEET = (
    'fleet.groups=[{profile="jetson-tx2",count=4},{profile="jetson-xavier-nx",count=5},'
    '{profile="jetson-agx-orin",count=3}]'
)
COMMANDS = [  # what makes the runs shown, from the repository's root
    ["fedsim", "compare", "scenarios/tiny-mixed-rank.toml", "--strategies", "fedit,flexlora", "--seeds", "2"],
    ["fedsim", "run", "scenarios/fedspine-jetson-80.toml", "--set", "model.name=tiny-llama", "--set", "rounds=6",
     "--set", "clients.num_clients=12", "--set", FLEET, "--set", "name=fedspine-tiny"],
]  # fmt: skip


@dataclass(frozen=True)
class Shot:
    """A page to photograph: its address, what to do there first, and the element to frame (the
    whole page when None)."""

    path: str
    ready: str
    prepare: Callable[[Any], None] | None = None
    element: str | None = None


def _loss_on_sim_time(tab: Any) -> None:
    tab.click("#cmp-metric")
    tab.click(".dash-dropdown-options >> text=central_loss")
    tab.click("#cmp-x >> text=simulated time (s)")


def _fleet_arms(tab: Any) -> None:
    tab.click("#fleet-quantity")
    tab.click(".dash-dropdown-options >> text=arm (rank / ratio)")


PAGES: dict[str, Shot] = {
    "runs": Shot("/runs", ".ag-row"),
    "run": Shot("/run/fedspine-tiny", "#run-loss .js-plotly-plot"),
    "fleet": Shot("/run/fedspine-tiny", "#fleet-heatmap .js-plotly-plot", _fleet_arms, "#section-fleet"),
    "compare": Shot("/run/tiny-mixed-rank-compare", "#cmp-graph .js-plotly-plot", _loss_on_sim_time),
}


def capture(browser: Any, base: str, out: Path, pages: Mapping[str, Shot] = PAGES) -> list[Path]:
    """Photograph each page of the dashboard at `base` into `out`/<name>.png; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, shot in pages.items():
        context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
        tab = context.new_page()
        tab.goto(base + shot.path)
        tab.wait_for_selector(shot.ready)
        if shot.prepare is not None:
            shot.prepare(tab)
        tab.wait_for_timeout(1500)  # let Plotly finish drawing
        path = out / f"{name}.png"
        if shot.element:
            tab.locator(shot.element).screenshot(path=str(path))
        else:
            tab.screenshot(path=str(path), full_page=True)
        written.append(path)
        context.close()
    return written


def make_runs(runs: Path) -> None:
    """The runs the screenshots show, made by `COMMANDS` unless they are there already."""
    fedsim = str(Path(sys.executable).with_name("fedsim"))
    for command in COMMANDS:
        target = runs / ("tiny-mixed-rank-compare" if command[1] == "compare" else "fedspine-tiny")
        if not target.exists():
            subprocess.run([fedsim, *command[1:], "--out", str(runs)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the dashboard's pages for the docs.")
    parser.add_argument("--runs", type=Path, help=f"runs to show (default: made in {RUNS})")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="folder of the PNGs")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    runs = args.runs or RUNS
    if args.runs is None:
        make_runs(runs)
    chromium = os.environ.get("FEDSIM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    server = serve(runs, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            pages = {f"dashboard-{name}": shot for name, shot in PAGES.items()}
            for path in capture(browser, server.url.rstrip("/"), args.out, pages):
                print(path)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
