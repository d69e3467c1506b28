"""The page's History switch, on the README's three programs, in Chromium.

History pivots every row inside ClickHouse (history.py, served at
/history), where Live holds only the newest --limit rows. The server runs
with --limit 300 so that ClickHouse soon holds more rows than Live can.
Before the page opens, three hours of older rows are added to ClickHouse.
What a user must see:

* History's row count is ClickHouse's count(), larger than --limit;
* its candles: AAPL's 1-minute candles over all three hours, drawn on a time
  axis (a bucket computed by ClickHouse), where Live holds a minute or so;
* its pivot, grouped by ticker and split by client, draws;
* after more inserts, the next refresh (every 5 s) shows the larger count;
* Live keeps its --limit rows, and nothing logs an error.
"""

from __future__ import annotations

import os
import re
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


def viewer_table_rows(page, view: str) -> int | None:
    """The table's row count a viewer shows in its status bar: "11 (31,400) x 8 (10)" is 31,400."""
    text = page.evaluate("""(view) => document.querySelector(`perspective-viewer[data-view="${view}"]`)
                                ?.shadowRoot?.querySelector("#status_bar")?.textContent ?? ''""", view)
    found = re.search(r"\(([\d,]+)\)", text)
    return int(found.group(1).replace(",", "")) if found else None


def wait_for_viewer_rows(page, view: str, rows: int, timeout_s: float = 20) -> int | None:
    deadline = time.monotonic() + timeout_s
    while viewer_table_rows(page, view) != rows and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    return viewer_table_rows(page, view)


def wait_for_badge(page, which: str, text: str, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while badge(page, which) != text and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    return badge(page, which)


# Three hours of rows, one every 0.36 s, ten tickers in turn, inserted by
# ClickHouse itself into the table the producer created. Each ticker's price
# wanders and ends where the producer's first trade of it began, so the
# chart joins the two.
OLDER_ROWS = 30_000
INSERT_OLDER = f"""
INSERT INTO stock_values (id, timestamp, ticker, client, open, high, low, close, volume, date)
SELECT generateUUIDv4(number), now64(3) - toIntervalMillisecond(360 * (number + 1000)), ticker,
       'Alpha Capital', open, greatest(open, close) * 1.001, least(open, close) * 0.999, close, 100, today()
FROM (SELECT number, first.1 AS ticker,
             first.2 * (1 + 0.02 * sin(number / 700) + 0.006 * sin(number / 53)) AS close,
             first.2 * (1 + 0.02 * sin((number + 10) / 700) + 0.006 * sin((number + 10) / 53)) AS open
      FROM numbers({OLDER_ROWS}) AS n
      CROSS JOIN (SELECT groupArray((ticker, open)) AS starts
                  FROM (SELECT ticker, argMin(open, inserted_at) AS open FROM stock_values GROUP BY ticker)) AS s
      ARRAY JOIN [starts[1 + number % length(starts)]] AS first)
"""


def history_cells(page) -> int:
    return page.locator("#history perspective-viewer-datagrid regular-table tbody td").count()


def test_history_shows_every_row_and_follows_new_ones(local_assets, clickhouse, tmp_path):  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = Program("perspective_server.py",
                     ["--port", str(port), "--limit", str(LIMIT), "--history-max-rows", "500"], clickhouse.env,
                     tmp_path / "server.log")
    producer = Program("producer.py", [], clickhouse.env, tmp_path / "producer.log")
    programs = [server, producer]
    try:
        wait_for_page(url, server, [producer])
        deadline = time.monotonic() + 60
        while clickhouse.count() <= 2 * LIMIT and time.monotonic() < deadline:
            time.sleep(0.5)
        client = clickhouse.client()
        client.database = clickhouse.env["CLICKHOUSE_DB"]
        client.command(INSERT_OLDER)
        client.close()
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

            config = browser.viewer_config(page, "volume_pivot")
            assert config["group_by"] == ["ticker"] and config["split_by"] == ["client"]
            assert config["columns"] == ["trades", "volume"]

            # The candles: one ticker, one per minute, over every row.
            candles = browser.viewer_config(page, "minute_candles")
            assert candles["filter"] == [["ticker", "==", "AAPL"]] and candles["plugin"] == "Candlestick"
            assert browser.group_by_types(page, "minute_candles") == ["datetime"]
            drawn = browser.view_columns(page, "minute_candles")
            minutes = [path[0] for path in drawn["__ROW_PATH__"]]
            assert len(minutes) >= 170 and max(minutes) - min(minutes) >= 170 * 60_000, len(minutes)
            assert all(later - earlier >= 60_000 and later % 60_000 == 0
                       for earlier, later in zip(minutes, minutes[1:]))
            chart = browser.chart_drawn(page, "minute_candles")
            assert chart["plugin"] == "perspective-viewer-d3fc-candlestick" and chart["shapes"] + chart["canvases"] > 0
            # A time axis: its ticks are times of day (a date where it passes
            # midnight), not row numbers or prices.
            ticks = chart["x_ticks"]
            assert ticks and all(browser.TIME_TICK.fullmatch(tick) for tick in ticks), chart
            assert any(":" in tick for tick in ticks), chart
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
            # The pivot, as Live's: trades and volume per client; its total
            # row's trades are every row in ClickHouse.
            # (A refresh re-runs the views, then counts: wait for the one
            # whose views ran after the last insert, too.)
            def total_trades() -> list:
                pivot = browser.view_columns(page, "volume_pivot")
                return [values[0] for name, values in pivot.items() if name.endswith("|trades")]
            deadline = time.monotonic() + 20
            while sum(total_trades()) != grown and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            trades = total_trades()
            assert len(trades) >= 4 and sum(trades) == grown, trades

            page.click("#mode-live")
            assert wait_for_badge(page, "live", f"{LIMIT:,} rows") == f"{LIMIT:,} rows"
            router.assert_ok()
            router.assert_offline()  # Live and History, with nothing from outside this server
            assert console.errors == []

            # A chart reads up to 4,000 cells (1,000 candles) at first: more
            # than --history-max-rows (500 here) is one line in the viewer's
            # error box, in our words, not a blank chart. The too-fine
            # candles come from a saved layout (as a user might save one),
            # opened after a reload: a restore() while History is open would
            # race the page's own refresh, which restores the view as it was.
            # After the reload the switch has History's count before History
            # is opened, and the pivot beside the failed chart is drawn.
            page.evaluate("""async () => {
                const v = document.querySelector('perspective-viewer[data-view="minute_candles"]');
                const config = {...await v.save(), expressions: {minute: `bucket("timestamp", '1s')`}};
                localStorage.setItem("perspective-dashboard:history:stock_values",
                                     JSON.stringify({minute_candles: config}));
            }""")
            page.reload()
            browser.wait_for_status(page, "live")
            assert wait_for_badge(page, "history", f"{grown:,} rows") == f"{grown:,} rows"
            page.click("#mode-history")
            error = page.locator('perspective-viewer[data-view="minute_candles"] .error-dialog-message')
            error.wait_for(state="attached", timeout=15_000)
            assert "this view has more than 500 rows (--history-max-rows): choose a larger bucket, or filter" \
                in error.text_content().splitlines()[0]
            assert wait_for_viewer_rows(page, "volume_pivot", grown) == grown  # drawn, on every row
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
