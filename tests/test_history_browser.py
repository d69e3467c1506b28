"""/history in real Chromium: a <perspective-viewer> pivots the whole table.

The page served by perspective_server.py loads Perspective's JS; its first
viewer is then pointed at /history as a Live/History switch would do it
(`perspective.websocket(".../history")`, then `viewer.load(client)` and
`restore({table, ...})`). It must draw a grouped, split grid and a sorted,
filtered one, with no errors in the console.
"""

from __future__ import annotations

import pytest

import browser

OPEN_HISTORY = """
async (config) => {
    const { default: perspective } = await import(
        "https://cdn.jsdelivr.net/npm/@perspective-dev/client@4.3.0/dist/cdn/perspective.js");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const client = await perspective.websocket(`${scheme}://${location.host}/history`);
    // The page's first viewer switches to history, as a Live/History switch would.
    const viewer = document.querySelector("perspective-viewer");
    viewer.id = "history-viewer";
    await viewer.load(client);
    await viewer.restore({table: "stock_values", ...config});
    await viewer.flush();
    const view = await viewer.getView();
    return {rows: await view.num_rows(), columns: await view.column_paths()};
}
"""


@pytest.fixture
def browser_context():
    with browser.launch_chromium(viewport=(1280, 720)) as context:
        yield context


def test_a_viewer_pivots_the_whole_table_through_history(start_server, browser_context):
    server = start_server()
    router = browser.CdnRouter().install(browser_context)
    page = browser_context.new_page()
    console = browser.ConsoleErrors(page)
    page.goto(server.url)
    browser.wait_for_status(page, "live")

    pivot = page.evaluate(OPEN_HISTORY, {"plugin": "Datagrid", "group_by": ["ticker"], "split_by": ["client"],
                                         "columns": ["close", "volume"], "aggregates": {"close": "avg"}})
    assert pivot["rows"] >= 2, pivot  # the total and at least one ticker
    assert any(path.endswith("_close") for path in pivot["columns"]), pivot  # VirtualServer: view schema names
    cells = page.locator("#history-viewer perspective-viewer-datagrid regular-table tbody td")
    cells.first.wait_for(timeout=20_000)
    assert cells.count() > 0, console.errors

    page.evaluate(OPEN_HISTORY, {"plugin": "Datagrid", "columns": ["ticker", "close"],
                                 "filter": [["ticker", "==", "AAPL"]], "sort": [["close", "desc"]]})
    tickers = page.locator("#history-viewer perspective-viewer-datagrid regular-table tbody td").all_inner_texts()
    assert tickers and set(text for text in tickers if text.isalpha()) <= {"AAPL"}
    router.assert_ok()
    assert not console.errors, console.errors
