"""The page's History switch, on the README's three programs, in Chromium.

History pivots every row inside ClickHouse (history.py, served at
/history), where Live holds only the newest --limit rows. The server runs
with --limit 300 so that ClickHouse soon holds more rows than Live can.
What a user must see:

* History's row count is ClickHouse's count(), larger than --limit;
* its default view, grouped by ticker and split by client, draws;
* after more inserts, the next refresh (every 5 s) shows the larger count;
* Live keeps its --limit rows, and nothing logs an error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import browser
from servers import Program, free_port, wait_for_page
from test_topology import clickhouse  # noqa: F401  (a fixture)

LIMIT = 300
# UPDATE_SCREENSHOTS=1 writes the History screenshot over the README's.
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot-history.png"


def badge(page, which: str) -> str:
    return page.locator(f"#{which}-count").text_content().strip()


def wait_for_badge(page, which: str, text: str, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while badge(page, which) != text and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    return badge(page, which)


def history_cells(page) -> int:
    return page.locator("#history perspective-viewer-datagrid regular-table tbody td").count()


def test_history_shows_every_row_and_follows_new_ones(clickhouse, tmp_path):  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = Program("perspective_server.py", ["--port", str(port), "--limit", str(LIMIT)], clickhouse.env,
                     tmp_path / "server.log")
    producer = Program("producer.py", [], clickhouse.env, tmp_path / "producer.log")
    programs = [server, producer]
    try:
        wait_for_page(url, server, [producer])
        deadline = time.monotonic() + 60
        while clickhouse.count() <= 2 * LIMIT and time.monotonic() < deadline:
            time.sleep(0.5)
        with browser.launch_chromium() as context:
            router = browser.CdnRouter().install(context)
            page = context.new_page()
            console = browser.ConsoleErrors(page)
            page.goto(url)
            browser.wait_for_status(page, "live")
            page.click("#mode-history")
            deadline = time.monotonic() + 30
            while history_cells(page) == 0 and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            assert history_cells(page) > 0, f"History never drew; console: {console.errors}\n{server.log()}"

            config = page.evaluate("async () => await document.querySelector('#history perspective-viewer').save()")
            assert config["group_by"] == ["ticker"] and config["split_by"] == ["client"]
            headers = page.locator("#history perspective-viewer-datagrid regular-table thead").text_content()
            assert "Alpha Capital" in headers, "the split by client drew no client column"
            assert history_cells(page) > 10
            page.screenshot(path=str(SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") == "1"
                                     else tmp_path / "history.png"))

            assert producer.interrupt() == 0, producer.log()
            stored = clickhouse.count()
            assert stored > LIMIT
            assert wait_for_badge(page, "history", f"{stored:,} rows") == f"{stored:,} rows"

            # More rows: the next refresh shows them, without a reload.
            more = Program("producer.py", [], clickhouse.env, tmp_path / "producer-2.log")
            programs.append(more)
            while clickhouse.count() == stored:
                time.sleep(0.2)
            assert more.interrupt() == 0, more.log()
            grown = clickhouse.count()
            assert grown > stored
            assert wait_for_badge(page, "history", f"{grown:,} rows") == f"{grown:,} rows"

            page.click("#mode-live")
            assert wait_for_badge(page, "live", f"{LIMIT:,} rows") == f"{LIMIT:,} rows"
            router.assert_ok()
            assert console.errors == []
        assert server.interrupt() == 0, server.log()
    finally:
        for program in programs:
            program.kill()


def test_the_page_hides_history_when_the_server_has_none():
    """--no-history: the server tells the page (its meta tag), so the
    History switch is not offered at all."""
    import asyncio

    import tornado.httpclient
    import tornado.httpserver

    from perspective_server import make_app

    async def page_of(app) -> str:
        port = free_port()
        server = tornado.httpserver.HTTPServer(app)
        server.listen(port, "127.0.0.1")
        try:
            response = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/")
            return response.body.decode()
        finally:
            server.stop()

    without = asyncio.run(page_of(make_app(None, history_server=None)))
    assert '<meta name="history" content="off">' in without
    assert '<meta name="history" content="on">' not in without
