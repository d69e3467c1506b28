"""The whole demo as a user sees it: real server, real page, headless Chromium.

Starts ``perspective_server.py --embedded`` (chDB and the producer inside the
server process), opens index.html in Debian's Chromium with the CDN assets
served from ``tests/node_modules`` (``npm ci --prefix tests``), and checks
what a person would: the badge says live; every view of the dashboard draws
(candles per time bucket and price lines on a time axis, the pivot grid, the
blotter) and keeps moving; a changed view survives a reload until "reset
layout"; a table of your own gets a plain grid; nothing is logged as an
error; and a restarted server is picked up again without a reload, with no
row twice. (tests/test_topology.py checks that pages hold exactly the
server's rows.) It saves screenshots
of the dashboard and of a chart; with UPDATE_SCREENSHOTS=1 it writes them
over the README's, in docs/ (after letting 25 s of trades accumulate, so the
charts look like a market).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tornado.httpserver
import tornado.testing

import browser
import chdb_http
import perspective_server
from servers import Program, free_port, wait_for_page

DOCS = Path(__file__).resolve().parent.parent / "docs"
UPDATE_SCREENSHOTS = os.environ.get("UPDATE_SCREENSHOTS") == "1"

CHARTS = {"candles": "perspective-viewer-d3fc-candlestick", "lines": "perspective-viewer-d3fc-yline"}


@pytest.fixture
def browser_context():
    # Wide enough for two views side by side, each with four client groups.
    with browser.launch_chromium(viewport=(1480, 860)) as context:
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


def wait_for_chart(page, view: str, timeout_s: float = 20.0) -> dict:
    """The chart once it has drawn marks on a time axis of the last seconds
    or minutes. A chart redraws on every update, and a busy machine can show
    a frame of the redraw whose axis is not laid out yet (once: 2000, 2005,
    2010...): such a frame is waited out, not judged."""
    deadline = time.monotonic() + timeout_s
    drawn = browser.chart_drawn(page, view)
    while not ((drawn["shapes"] or drawn["canvases"]) and any(":" in tick for tick in drawn["x_ticks"])) \
            and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        drawn = browser.chart_drawn(page, view)
    return drawn


def assert_grid_has_cells(page, view: str | None = None):
    cells = browser.datagrid_cells(page, view)
    cells.first.wait_for(timeout=10_000)
    assert cells.count() > 0
    assert any(text.strip() for text in cells.all_inner_texts()), f"{view} grid cells are all empty"


def assert_default_candles(page):
    """The candles view as DASHBOARD defines it: AAPL, one candle per 5 s bucket."""
    candles = browser.viewer_config(page, "candles")
    assert candles["filter"] == [["ticker", "==", "AAPL"]]
    assert candles["expressions"] == {"timestamp per 5s": "bucket(\"timestamp\", '5s')"}
    assert candles["group_by"] == ["timestamp per 5s"]
    buckets = [path[0] for path in browser.view_columns(page, "candles")["__ROW_PATH__"] if path]
    assert buckets and all(bucket % 5_000 == 0 for bucket in buckets), buckets
    assert len(set(buckets)) == len(buckets)  # one candle per bucket


def newest_bucket(page, view: str) -> int:
    """The latest time a chart view has a row for (ms since the epoch)."""
    paths = browser.view_columns(page, view)["__ROW_PATH__"]
    return max(path[0] for path in paths if path)


def wait_for_newer_bucket(page, view: str, than: int, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    newest = newest_bucket(page, view)
    while newest <= than and time.monotonic() < deadline:
        page.wait_for_timeout(250)
        newest = newest_bucket(page, view)
    return newest


def newest_timestamp_in_table(page) -> int:
    return page.evaluate(
        """async () => {
            const table = await document.querySelector("perspective-viewer").getTable();
            const view = await table.view({columns: ["timestamp"], sort: [["timestamp", "desc"]]});
            const columns = await view.to_columns({start_row: 0, end_row: 1});
            await view.delete();
            return columns.timestamp[0];
        }""")


@pytest.fixture
def screenshots(tmp_path) -> Path:
    if UPDATE_SCREENSHOTS:
        DOCS.mkdir(exist_ok=True)
        return DOCS
    return tmp_path


def test_every_view_of_the_dashboard_is_live(local_assets, start_server, browser_context, screenshots):
    # With assets.py's download in place the page needs nothing but this
    # server: every request elsewhere (the CDN included) would be recorded.
    server = start_server()
    page, router, console = open_page(browser_context, server.url)

    wait_live(page, router, console)
    assert browser.status(page) == ("live", "live")
    assert browser.view_names(page) == list(browser.DASHBOARD_VIEWS)
    assert browser.row_count(page) > 0

    # A server started a moment ago has one candle; a time axis needs two.
    wait_for_newer_bucket(page, "candles", newest_bucket(page, "candles"))

    # Both charts draw marks, over a time axis: each groups by one datetime
    # column (two group-by columns, or a string one, give a category axis);
    # for the candles it is a 5 s bucket() of the timestamp.
    for view, plugin in CHARTS.items():
        drawn = wait_for_chart(page, view)
        assert drawn["plugin"] == plugin, drawn
        assert drawn["shapes"] or drawn["canvases"], f"{view} drew nothing: {drawn}"
        assert browser.group_by_types(page, view) == ["datetime"]
        ticks = drawn["x_ticks"]
        assert ticks and all(browser.TIME_TICK.fullmatch(tick) for tick in ticks), ticks
        assert any(":" in tick for tick in ticks), ticks  # a minute of data has second or minute ticks
    assert_default_candles(page)
    assert browser.viewer_config(page, "lines")["split_by"] == ["ticker"]

    # The pivot grid: ticker rows, client columns, and only totals that add up.
    pivot = browser.viewer_config(page, "pivot")
    assert pivot["group_by"] == ["ticker"] and pivot["split_by"] == ["client"]
    assert set(pivot["aggregates"].values()) <= {"count", "sum"}, pivot["aggregates"]
    assert_grid_has_cells(page, "pivot")
    assert "id" not in pivot["columns"] and "inserted_at" not in pivot["columns"]

    # The blotter: newest trade first, at least as new as the table's newest
    # trade a moment ago.
    assert_grid_has_cells(page, "blotter")
    newest_before = newest_timestamp_in_table(page)
    blotter = browser.view_columns(page, "blotter")["timestamp"]
    assert blotter[0] == max(blotter) and blotter[0] >= newest_before

    # The producer inserts every 500 ms: the charts' newest tick moves on.
    for view in CHARTS:
        first = newest_bucket(page, view)
        assert wait_for_newer_bucket(page, view, first) > first, f"{view} stuck at {first}:\n{server.log()}"

    if UPDATE_SCREENSHOTS:
        page.wait_for_timeout(25_000)  # enough candles to look like a market
        for view in CHARTS:
            wait_for_chart(page, view)
    page.locator('perspective-viewer[data-view="candles"]').screenshot(path=screenshots / "screenshot-chart.png")
    page.screenshot(path=screenshots / "screenshot.png")

    router.assert_ok()
    router.assert_offline()
    assert console.errors == []


def test_a_changed_view_survives_a_reload_until_reset(start_server, browser_context):
    server = start_server()
    page, router, console = open_page(browser_context, server.url)
    wait_live(page, router, console)
    # Nothing is remembered until the user changes something.
    assert page.evaluate("() => localStorage.length") == 0

    browser.restore(page, {"filter": [["ticker", "==", "MSFT"]], "title": "MSFT candles"}, "candles")
    browser.restore(page, {"group_by": ["client"], "split_by": []}, "pivot")

    page.reload()
    wait_live(page, router, console)
    candles = browser.viewer_config(page, "candles")
    assert candles["filter"] == [["ticker", "==", "MSFT"]] and candles["title"] == "MSFT candles"
    assert candles["plugin"] == "Candlestick"
    pivot = browser.viewer_config(page, "pivot")
    assert pivot["group_by"] == ["client"] and pivot["split_by"] == []
    assert browser.viewer_config(page, "lines")["split_by"] == ["ticker"]  # untouched: the default

    with page.expect_navigation():
        page.click("#reset-layout")
    wait_live(page, router, console)
    assert_default_candles(page)
    pivot = browser.viewer_config(page, "pivot")
    assert pivot["group_by"] == ["ticker"] and pivot["split_by"] == ["client"]
    assert page.evaluate("() => localStorage.length") == 0

    router.assert_ok()
    assert console.errors == []


def test_a_table_of_your_own_gets_a_plain_grid(browser_context, tmp_path):
    """--table with a table that is not the demo's: one grid of all its columns."""
    with chdb_http.running(tmp_path / "chdb-data") as harness:
        admin = harness.client(autogenerate_session_id=False)
        admin.command("CREATE DATABASE own")
        admin.command("""
            CREATE TABLE own.my_trades (
                inserted_at DateTime64(6, 'UTC') DEFAULT now64(6, 'UTC'),
                trade_id    UInt64,
                symbol      String,
                price       Float64
            ) ENGINE = MergeTree ORDER BY inserted_at""")
        admin.command("INSERT INTO own.my_trades (trade_id, symbol, price) "
                      "SELECT number, 'ACME', 100 + number FROM numbers(40)")
        admin.command("INSERT INTO own.my_trades (trade_id, symbol, price) "
                      "SELECT number, 'ACME', 100 + number FROM numbers(40, 10)")  # a later inserted_at
        admin.close()
        port = free_port()
        server = Program("perspective_server.py",
                         ["--port", str(port), "--table", "my_trades", "--key", "trade_id"],
                         {**harness.env(), "CLICKHOUSE_DB": "own"}, tmp_path / "server.log")
        try:
            wait_for_page(f"http://127.0.0.1:{port}/", server)
            page, router, console = open_page(browser_context, f"http://127.0.0.1:{port}/")
            wait_live(page, router, console)
            assert browser.view_names(page) == ["table"]
            config = browser.viewer_config(page)
            assert config["plugin"] == "Datagrid" and config["title"] == "my_trades"
            assert config["group_by"] == [] and config["split_by"] == []
            assert page.locator("h1").text_content() == "my_trades, live from ClickHouse"
            # Newest rows first, by its only time column.
            assert config["sort"] == [["inserted_at", "desc"]]
            assert set(browser.view_columns(page)["price"][:10]) == {140.0 + n for n in range(10)}
            assert {"symbol", "price"} <= set(config["columns"])  # the key column stays on the server
            assert browser.row_count(page) == 50
            assert_grid_has_cells(page)
            router.assert_ok()
            assert console.errors == []
            assert server.interrupt(30) == 0, server.log()
        finally:
            server.kill()


def test_reconnects_after_server_restart(start_server, browser_context):
    server = start_server()
    page, router, console = open_page(browser_context, server.url)
    wait_live(page, router, console)

    # The user's own changes, which must survive the restart.
    browser.restore(page, {"group_by": ["client"], "split_by": []}, "pivot")
    browser.restore(page, {"filter": [["ticker", "==", "NVDA"]]}, "candles")

    assert server.stop() == 0, server.log()
    browser.wait_for_status(page, "reconnecting", timeout_ms=10_000)

    start_server(port=server.port)  # same port, same chDB folder
    # The server is answering HTTP again; the page must notice by itself
    # (its retry backoff is capped at 1 s), well within the 5 s we promise.
    back = time.monotonic()
    wait_live(page, router, console, timeout_ms=5_000)
    print(f"\npage live again {time.monotonic() - back:.2f} s after the restarted server answered")

    # Every view is back on the new server's table, with the user's configs,
    # and the page's table holds no row twice: it was rebuilt from the new
    # server's snapshot, not added to the old one.
    pivot = browser.viewer_config(page, "pivot")
    assert pivot["group_by"] == ["client"] and pivot["split_by"] == []
    assert pivot["aggregates"] == {"trades": "count", "volume": "sum"}
    assert browser.viewer_config(page, "candles")["filter"] == [["ticker", "==", "NVDA"]]
    assert browser.viewer_config(page, "lines")["split_by"] == ["ticker"]
    rows = browser.table_rows(page)
    assert rows and len(set(rows)) == len(rows), f"{len(rows) - len(set(rows))} rows twice"
    for view in ("pivot", "blotter"):
        assert_grid_has_cells(page, view)
    for view in CHARTS:
        drawn = wait_for_chart(page, view)
        assert drawn["shapes"] or drawn["canvases"], f"{view} drew nothing after the restart: {drawn}"
        assert browser.view_columns(page, view)["__ROW_PATH__"], f"{view} has no rows after the restart"

    router.assert_ok()
    # While the server is down each retry logs a refused connection; that is
    # Chromium reporting the outage, not the page failing.
    refused = "net::ERR_CONNECTION_REFUSED"
    assert [e for e in console.errors if refused not in e] == []


@contextlib.contextmanager
def serving(app):
    """`app` on a free local port, on a thread of its own; yields the URL."""
    sock, port = tornado.testing.bind_unused_port()
    loop = asyncio.new_event_loop()

    def run():
        asyncio.set_event_loop(loop)
        tornado.httpserver.HTTPServer(app).add_sockets([sock])
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_the_page_says_when_perspectives_scripts_cannot_load(browser_context):
    # No assets/ on this server, and a network that refuses the CDN: the page
    # names the cause and the fix, instead of "connecting" forever.
    app = perspective_server.make_app(None, assets_folder=None)
    refused = []

    def outside_refused(route):
        if urlsplit(route.request.url).hostname in browser.LOCAL_HOSTS:
            return route.continue_()
        refused.append(route.request.url)
        route.abort("internetdisconnected")

    browser_context.route("**/*", outside_refused)
    with serving(app) as url:
        page = browser_context.new_page()
        page.goto(url)
        page.wait_for_selector("#load-error", state="visible", timeout=20_000)
        message = page.locator("#load-error").text_content()
        assert browser.status(page) == ("no Perspective", "failed")
    assert "did not load from cdn.jsdelivr.net" in message and ".venv/bin/python assets.py" in message, message
    assert any(url.startswith(browser.CDN_PREFIX) for url in refused), refused
