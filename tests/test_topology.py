"""The README's three programs, each its own process, watched in a browser.

ClickHouse, `python producer.py` and `python perspective_server.py --port P`
run as separate OS processes with their real command lines, pointed at
ClickHouse through CLICKHOUSE_* variables as a user would. ClickHouse is the
chDB test harness (tests/chdb_http.py: a real engine behind part of the HTTP
interface; there is no ClickHouse server on the build machines), or the
server named by CLICKHOUSE_URL when that is set. Headless Chromium opens
pages before, during and after a burst of inserts, and each page's own
table must end equal to the server's; then each program gets Ctrl-C
(SIGINT) and must exit 0 within 5 seconds, and the rows the pages hold must
all be rows ClickHouse stored.
"""

from __future__ import annotations

import collections
import os
import signal
import time
import uuid
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pytest

import browser
import chdb_http
from servers import Program, free_port, wait_for_page

EXIT_TIMEOUT_S = 5  # Ctrl-C to exit, for every program
LIMIT = 2_000


@dataclass
class ClickHouse:
    env: dict[str, str]  # CLICKHOUSE_* for the programs
    harness: chdb_http.Harness | None  # None: the server of CLICKHOUSE_URL

    def client(self):
        return clickhouse_connect.get_client(
            host=self.env["CLICKHOUSE_HOST"], port=int(self.env["CLICKHOUSE_PORT"]),
            username=self.env["CLICKHOUSE_USER"], password=self.env["CLICKHOUSE_PASSWORD"],
            secure=self.env.get("CLICKHOUSE_SECURE") == "1", autogenerate_session_id=False)

    def count(self, table: str = "stock_values") -> int:
        client = self.client()
        try:
            return client.command(f"SELECT count() FROM `{self.env['CLICKHOUSE_DB']}`.`{table}`")
        finally:
            client.close()


@pytest.fixture
def clickhouse(tmp_path):
    database = f"topology_{uuid.uuid4().hex[:12]}"
    url = os.environ.get("CLICKHOUSE_URL")
    if not url:
        with chdb_http.running(tmp_path / "chdb-data") as harness:
            yield ClickHouse({**harness.env(), "CLICKHOUSE_DB": database}, harness)
        return
    parts = urlsplit(url)
    server = ClickHouse({"CLICKHOUSE_HOST": parts.hostname, "CLICKHOUSE_PORT": str(parts.port or 8123),
                         "CLICKHOUSE_USER": unquote(parts.username or "default"),
                         "CLICKHOUSE_PASSWORD": unquote(parts.password or ""), "CLICKHOUSE_DB": database,
                         "CLICKHOUSE_SECURE": "1" if parts.scheme == "https" else ""}, None)
    yield server
    client = server.client()
    client.command(f"DROP DATABASE IF EXISTS `{database}`")
    client.close()


def test_three_programs_fill_every_page_with_exactly_the_server_rows_and_stop_cleanly(clickhouse, tmp_path):
    """Pages that join before a burst, during it and once --limit evicts all
    end with the server's rows: no row missing, none twice."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    producer = Program("producer.py", [], clickhouse.env, tmp_path / "producer.log")
    server = Program("perspective_server.py", ["--port", str(port), "--limit", str(LIMIT), "--show-key"],
                     clickhouse.env, tmp_path / "server.log")
    # A second producer, 20 times the demo rate: 4,000 rows/s.
    burst = Program("producer.py", ["--interval", "0.05", "--batch-size", "200"], clickhouse.env,
                    tmp_path / "burst.log", start=False)
    programs = [server, producer, burst]
    try:
        wait_for_page(url, server, [producer])
        with browser.launch_chromium() as context:
            router = browser.CdnRouter().install(context)
            consoles = []

            def open_page():
                page = context.new_page()
                consoles.append(browser.ConsoleErrors(page))
                page.goto(url)
                try:
                    browser.wait_for_status(page, "live", timeout_ms=30_000)
                except Exception:
                    router.assert_ok()  # a missing asset explains a stuck page
                    pytest.fail(f"page never went live ({browser.status(page)}); console: {consoles[-1].errors}\n"
                                + "\n".join(p.log() for p in programs))
                return page

            before = open_page()
            # Rows keep arriving: producer -> ClickHouse -> server -> page.
            first = browser.row_count(before)
            assert first < LIMIT, "the table filled before the burst: start the burst sooner"
            grown = browser.wait_for_row_count_above(before, first, timeout_s=30)
            assert grown > first, f"row count stayed at {first}:\n" + "\n".join(p.log() for p in programs)

            burst.start()
            during = open_page()
            assert burst.proc.poll() is None, burst.log()
            stored = clickhouse.count()
            deadline = time.monotonic() + 60
            while clickhouse.count() < stored + 2 * LIMIT and time.monotonic() < deadline:
                time.sleep(0.2)
            evicting = open_page()  # joins with the table full, the burst evicting rows
            for program in (burst, producer):
                assert program.interrupt(EXIT_TIMEOUT_S) == 0, program.log()
            after = open_page()  # joins once nothing new is inserted: its snapshot is the server's table

            pages = {"before": before, "during": during, "evicting": evicting, "after": after}
            tables = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # pages apply the last batches a moment apart
                tables = {name: collections.Counter(browser.table_rows(page)) for name, page in pages.items()}
                if all(rows == tables["after"] for rows in tables.values()):
                    break
                time.sleep(0.5)
            assert server.interrupt(EXIT_TIMEOUT_S) == 0, server.log()
            router.assert_ok()
            assert [error for console in consoles for error in console.errors] == []

        truth = tables["after"]
        assert sum(truth.values()) == LIMIT and max(truth.values()) == 1
        for name, rows in tables.items():
            assert rows == truth, (f"the page opened {name} differs from the server's table: "
                                   f"{len(rows - truth)} extra, {len(truth - rows)} missing")
        # Every row the pages show is a row ClickHouse stored, once.
        assert ids_in_clickhouse(clickhouse, [dict(row)["id"] for row in truth]) == LIMIT
    finally:
        for program in programs:
            program.kill()

    if clickhouse.harness is not None:
        assert clickhouse.harness.stop(signal.SIGINT, timeout=EXIT_TIMEOUT_S) == 0, clickhouse.harness.log()


def ids_in_clickhouse(clickhouse: ClickHouse, ids: list[str]) -> int:
    """How many of `ids` ClickHouse stored, each counted once per row that has it."""
    client = clickhouse.client()
    try:
        stored = collections.Counter(row[0] for row in client.query(
            f"SELECT toString(id) FROM `{clickhouse.env['CLICKHOUSE_DB']}`.stock_values").result_rows)
    finally:
        client.close()
    return sum(stored[i] for i in ids)
