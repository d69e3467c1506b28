"""The whole demo as a user sees it: real server, real page, headless Chromium.

Starts ``perspective_server.py --embedded`` (chDB and the producer inside the
server process), opens index.html in Debian's Chromium with the CDN assets
served from ``tests/node_modules`` (``npm ci --prefix tests``), and checks
what a person would: the badge says live, the grid fills and keeps growing,
a chart draws, nothing is logged as an error, and a restarted server is
picked up again without a reload. It saves screenshots of the grid and a
chart; with UPDATE_SCREENSHOTS=1 it writes them over the README's, in docs/.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import browser

DOCS = Path(__file__).resolve().parent.parent / "docs"

# The preset grid in index.html, switched to a chart and back in the test.
CHART_PLUGIN = "Y Bar"


@pytest.fixture
def browser_context():
    # Wide enough for the preset's four client groups beside the settings panel.
    with browser.launch_chromium(viewport=(1480, 760)) as context:
        yield context


def open_page(context, url):
    router = browser.CdnRouter().install(context)
    page = context.new_page()
    console = browser.ConsoleErrors(page)
    page.goto(url)
    return page, router, console


def wait_live(page, router, console, timeout_ms: int = 30_000):
    """Wait for the badge to say live; if it never does, say why."""
    try:
        browser.wait_for_status(page, "live", timeout_ms)
    except Exception:
        router.assert_ok()  # a pin mismatch or missing asset explains a stuck page
        pytest.fail(f"page never went live (status {browser.status(page)}); console: {console.errors}")


def wait_for_chart(page, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    drawn = browser.chart_drawn(page)
    while not (drawn["shapes"] or drawn["canvases"]) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        drawn = browser.chart_drawn(page)
    return drawn


def assert_grid_has_cells(page):
    page.locator("perspective-viewer-datagrid regular-table tbody td").first.wait_for(timeout=10_000)
    cells = page.locator("perspective-viewer-datagrid regular-table tbody td")
    assert cells.count() > 0
    assert any(text.strip() for text in cells.all_inner_texts()), "grid cells are all empty"


@pytest.fixture
def screenshots(tmp_path) -> Path:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        return DOCS
    return tmp_path


def test_live_grid_and_chart(start_server, browser_context, screenshots):
    server = start_server()
    page, router, console = open_page(browser_context, server.url)

    wait_live(page, router, console)
    assert browser.status(page) == ("live", "live")

    # The preset: pivoted by ticker and client, on the datagrid.
    preset = browser.viewer_config(page)
    assert preset["plugin"] == "Datagrid"
    assert preset["group_by"] == ["ticker"] and preset["split_by"] == ["client"]
    assert "id" not in preset["columns"] and "inserted_at" not in preset["columns"]

    first = browser.row_count(page)
    assert first > 0
    assert_grid_has_cells(page)

    # The producer inserts every 500 ms; the server tails those rows in.
    grown = browser.wait_for_row_count_above(page, first, timeout_s=15)
    assert grown > first, f"row count stayed at {first} for 15 s:\n{server.log()}"

    # A chart plugin draws: traded volume per ticker, stacked by client.
    # Flat rollup is what d3fc charts ask for; passing it avoids viewer 4.3.0
    # logging its own switch to flat as a console.error.
    browser.restore(page, {"plugin": CHART_PLUGIN, "columns": ["volume"], "group_rollup_mode": "flat"})
    drawn = wait_for_chart(page)
    assert drawn["plugin"] == "perspective-viewer-d3fc-ybar", drawn
    assert drawn["shapes"] or drawn["canvases"], f"{CHART_PLUGIN} drew nothing: {drawn}"
    page.screenshot(path=screenshots / "screenshot-chart.png")

    # Back to the preset grid: the README's screenshot.
    browser.restore(page, preset)
    assert_grid_has_cells(page)
    page.screenshot(path=screenshots / "screenshot.png")

    router.assert_ok()
    assert console.errors == []


def test_reconnects_after_server_restart(start_server, browser_context):
    server = start_server()
    page, router, console = open_page(browser_context, server.url)
    wait_live(page, router, console)

    # A user's own pivot, which must survive the restart.
    browser.restore(page, {"group_by": ["client"], "split_by": []})

    assert server.stop() == 0, server.log()
    browser.wait_for_status(page, "reconnecting", timeout_ms=10_000)

    start_server(port=server.port)  # same port, same chDB folder
    # The server is answering HTTP again; the page must notice by itself
    # (its retry backoff is capped at 1 s), well within the 5 s we promise.
    back = time.monotonic()
    wait_live(page, router, console, timeout_ms=5_000)
    print(f"\npage live again {time.monotonic() - back:.2f} s after the restarted server answered")

    config = browser.viewer_config(page)
    assert config["group_by"] == ["client"] and config["split_by"] == []
    assert config["aggregates"]["close"] == "last"
    assert browser.row_count(page) > 0
    assert_grid_has_cells(page)

    router.assert_ok()
    # While the server is down each retry logs a refused connection; that is
    # Chromium reporting the outage, not the page failing.
    refused = "net::ERR_CONNECTION_REFUSED"
    assert [e for e in console.errors if refused not in e] == []


def test_the_page_cannot_change_the_data(start_server, browser_context):
    """A curious colleague with devtools open: every write is refused."""
    server = start_server()
    page, router, console = open_page(browser_context, server.url)
    wait_live(page, router, console)
    before = browser.row_count(page)

    outcomes = page.evaluate(
        """async () => {
            const table = await document.querySelector("perspective-viewer").getTable();
            const attempts = {
                update: () => table.update([{ticker: "EVIL", close: 0}]),
                clear: () => table.clear(),
                replace: () => table.replace([{ticker: "EVIL", close: 0}]),
                delete: () => table.delete(),
            };
            const outcomes = {};
            for (const [name, attempt] of Object.entries(attempts)) {
                try {
                    await attempt();
                    outcomes[name] = "accepted";
                } catch (error) {
                    outcomes[name] = String(error && error.message || error);
                }
            }
            return outcomes;
        }"""
    )
    assert set(outcomes) == {"update", "clear", "replace", "delete"}
    for name, outcome in outcomes.items():
        assert "read-only" in outcome, f"{name}: {outcome}"
    # Nothing was cleared, and the producer's rows keep arriving.
    assert browser.wait_for_row_count_above(page, before, timeout_s=15) > before
    assert "EVIL" not in str(page.evaluate(
        """async () => {
            const table = await document.querySelector("perspective-viewer").getTable();
            const view = await table.view({columns: ["ticker"], group_by: ["ticker"]});
            const columns = await view.to_columns();
            await view.delete();
            return columns;
        }"""))
    assert server.stop() == 0


def test_sort_filter_and_expressions_pass_the_read_only_gate(start_server, browser_context):
    """The gate checks every view request field by field; the viewer's
    everyday features must still get through."""
    server = start_server()
    page, router, console = open_page(browser_context, server.url)
    wait_live(page, router, console)
    browser.restore(page, {
        "group_by": ["ticker"],
        "split_by": [],
        "columns": ["close", "spread"],
        "expressions": {"spread": '"high" - "low"'},
        "aggregates": {"close": "last", "spread": "avg"},
        "sort": [["close", "desc"]],
        "filter": [["ticker", "in", ["AAPL", "MSFT", "NVDA"]], ["volume", ">", 10]],
    })
    assert_grid_has_cells(page)
    config = browser.viewer_config(page)
    assert config["expressions"] == {"spread": '"high" - "low"'}
    assert config["sort"] == [["close", "desc"]]
    tickers = page.evaluate(
        """async () => {
            const viewer = document.querySelector("perspective-viewer");
            const view = await (await viewer.getTable()).view({
                group_by: ["ticker"], columns: ["close"],
                filter: [["ticker", "in", ["AAPL", "MSFT", "NVDA"]]]});
            const columns = await view.to_columns();
            await view.delete();
            return columns.__ROW_PATH__.filter((path) => path.length).map((path) => path[0]);
        }""")
    assert set(tickers) <= {"AAPL", "MSFT", "NVDA"} and tickers
    router.assert_ok()
    assert console.errors == []
    assert "refused a request" not in server.log()
