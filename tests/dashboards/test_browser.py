"""The dashboard in a real browser: headless Chromium (Debian's, through Playwright) against the
dashboard served over fake and real runs. One browser and one server for the module; every page
must load without a console error and without asking for anything outside the server."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from dashboard_runs import EVIL, Served, make_root, served
from tests_support.fake_runs import append_round

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("FEDSIM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium; install.sh does)")
POLL_S = 0.5
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = make_root(tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("outside"))
    with served(root, poll_s=POLL_S) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Page:
    """A browser tab on the dashboard that records console errors, page errors, dialogs and every
    request that leaves the server."""

    def __init__(self, tab: Any, base: str) -> None:
        self.tab, self.base = tab, base
        self.problems: list[str] = []
        tab.set_default_timeout(TIMEOUT_MS)
        tab.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        tab.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        tab.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        tab.on("request", lambda r: None if r.url.startswith(base) else self.problems.append(f"external: {r.url}"))

    def goto(self, path: str) -> None:
        self.tab.goto(self.base + path)
        self.tab.wait_for_selector("#page > *")

    def text(self, selector: str) -> str:
        return str(self.tab.inner_text(selector))

    def traces(self, graph: str) -> list[dict[str, Any]]:
        """The Plotly traces of a dcc.Graph: name, legend group, visibility."""
        return list(
            self.tab.evaluate(
                "g => document.querySelector(`#${g} .js-plotly-plot`).data.map("
                "t => ({name: t.name, group: t.legendgroup, visible: t.visible === undefined ? true : t.visible}))",
                graph,
            )
        )

    def wait_for_traces(self, graph: str) -> None:
        self.tab.wait_for_function(
            "g => { const p = document.querySelector(`#${g} .js-plotly-plot`); return p && p.data && p.data.length }",
            arg=graph,
        )


@pytest.fixture
def page(browser: Any, dashboard: Served) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = Page(context.new_page(), dashboard.base)
    yield tab
    context.close()
    assert tab.problems == []


def test_runs_table_lists_runs_at_any_depth_and_a_click_opens_one(page: Page) -> None:
    page.goto("/")
    page.tab.wait_for_selector(".ag-row >> text=tiny-compare/flexlora-seed1")

    names = page.tab.locator(".ag-row [col-id='name']").all_inner_texts()
    assert {"alpha", "fedspine-tiny", "tiny-compare/fedit-seed0", "live", EVIL} <= set(names)
    assert "escape" not in names
    page.tab.click(".ag-row [col-id='name'] >> text=alpha")

    page.tab.wait_for_url(page.base + "/run/alpha")
    page.tab.wait_for_selector("#fact-rounds")
    assert page.text("#fact-rounds") == "rounds: 3 / 3" and page.text("#fact-status") == "status: finished"
    assert re.fullmatch(r"sent: [\d.]+ KiB up, [\d.]+ KiB down", page.text("#fact-sent"))
    page.wait_for_traces("fleet-heatmap")
    assert "round end" in page.text("#run-events") and "round 3 of 3" in page.text("#run-events")
    assert "finished: not polling" in page.text("#run-header")


def test_ticked_runs_open_side_by_side(page: Page) -> None:
    page.goto("/runs")
    for name in ("alpha", "beta"):  # each row's id is its run's name
        page.tab.locator(f".ag-row[row-id='{name}'] input[type=checkbox]").click()
    page.tab.wait_for_function("() => document.querySelector('#runs-selected').innerText === '2 selected'")
    page.tab.click("#compare-button")

    page.tab.wait_for_url(re.compile(r".*/compare\?run=alpha&run=beta$"))
    page.wait_for_traces("cmp-graph")
    names = [t["name"] for t in page.traces("cmp-graph")]
    assert {"alpha", "beta"} <= set(names)
    assert "strategy.name" in page.text("#cmp-diff")


def test_a_compare_folder_groups_seeds_and_a_legend_entry_hides_its_line_and_band(page: Page) -> None:
    page.goto("/run/tiny-compare")
    page.wait_for_traces("cmp-graph")

    assert "Compare 4 runs of tiny-compare" in page.text("h1")
    groups = {(t["name"], t["group"]) for t in page.traces("cmp-graph")}
    assert {("fedit (n=2)", "fedit"), ("flexlora (n=2)", "flexlora")} <= groups
    page.tab.locator("#cmp-graph .legend .traces", has_text="flexlora (n=2)").locator(".legendtoggle").click()
    page.tab.wait_for_function(
        "() => document.querySelector('#cmp-graph .js-plotly-plot').data"
        ".filter(t => t.legendgroup === 'flexlora').every(t => t.visible === 'legendonly')"
    )
    visible = {t["group"]: t["visible"] for t in page.traces("cmp-graph")}
    assert visible == {"fedit": True, "flexlora": "legendonly"}
    final = page.text("#cmp-final-table")
    assert "fedit" in final and "flexlora" in final and "central accuracy" in final


def test_a_run_in_progress_gains_a_round_without_a_reload(page: Page, dashboard: Served) -> None:
    page.goto("/run/live")
    page.tab.wait_for_selector("#fact-rounds")
    assert page.text("#fact-rounds") == "rounds: 2 / 4" and page.text("#fact-status") == "status: running"
    page.wait_for_traces("run-accuracy")
    page.tab.evaluate("() => { window.notReloaded = true }")

    append_round(dashboard.root / "live", 0.75)

    page.tab.wait_for_function("() => document.querySelector('#fact-rounds').innerText === 'rounds: 3 / 4'")
    page.tab.wait_for_function("() => document.querySelector('#run-accuracy .js-plotly-plot').data[0].y.length === 4")
    assert page.tab.evaluate("() => window.notReloaded") is True
    with open(dashboard.root / "live" / "events.jsonl", "a") as fh:
        fh.write('{"event": "run_end"}\n')
    page.tab.wait_for_function("() => document.querySelector('#run-header').innerText.includes('not polling')")
    assert page.text("#fact-status") == "status: finished"


def test_names_and_scenarios_from_files_are_shown_as_text(page: Page) -> None:
    page.goto("/run/" + quote(EVIL, safe=""))
    page.tab.wait_for_selector("#run-scenario")

    assert page.text("#run-title") == EVIL
    assert "</script><script>alert(2)</script>" in page.text("#run-scenario")
    assert page.tab.locator("script", has_text="alert(").count() == 0  # the dialog handler would record one


@pytest.mark.parametrize("path", ["/run/..%2F..%2Fetc", "/run/escape", "/run/nope", "/compare?run=alpha&run=.."])
def test_unknown_or_escaping_addresses_say_not_found(page: Page, path: str) -> None:
    page.goto(path)

    assert "Not found" in page.text("#page") and "TOPSECRET" not in page.text("body")


def test_corrupt_metrics_show_on_their_page_and_the_others_still_work(page: Page) -> None:
    page.goto("/run/broken")
    page.tab.wait_for_selector("#run-header .error")

    assert "cannot read metrics.parquet" in page.text("#run-header")


def test_pruned_runs_show_deployed_models_and_private_runs_their_budget(page: Page) -> None:
    page.goto("/run/fedspine-tiny")
    page.tab.wait_for_selector("#deployed-table")
    assert "0.20" in page.text("#deployed-table")
    page.tab.click("#fleet-quantity")  # the fleet dropdown: show the bandit's arms
    page.tab.click("text=arm (rank / ratio)")
    page.tab.wait_for_function("() => document.querySelector('#fleet-heatmap .gtitle').textContent.includes('arm')")

    page.goto("/run/private")
    page.wait_for_traces("run-privacy")
    assert page.traces("run-privacy")[0]["name"] == "dp_epsilon"


def test_the_pages_screenshots_script_writes_one_image_per_page(
    tmp_path: Path, dashboard: Served, browser: Any
) -> None:
    from dashboards.screenshots import PAGES, capture

    written = capture(browser, dashboard.base, tmp_path, pages={"runs": PAGES["runs"]})

    assert [p.name for p in written] == ["runs.png"] and written[0].stat().st_size > 20_000
