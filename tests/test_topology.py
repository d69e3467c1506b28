"""The README's three programs, each its own process, watched in a browser.

ClickHouse, `python producer.py` and `python perspective_server.py --port P`
run as separate OS processes with their real command lines, pointed at
ClickHouse through CLICKHOUSE_* variables as a user would. ClickHouse is the
chDB test harness (tests/chdb_http.py: a real engine behind part of the HTTP
interface; there is no ClickHouse server on the build machines), or the
server named by CLICKHOUSE_URL when that is set. Headless Chromium opens the
page and watches rows arrive; then each program gets Ctrl-C (SIGINT) and must
exit 0 within 5 seconds, and the rows the page showed must all be rows
ClickHouse stored.
"""

from __future__ import annotations

import os
import signal
import uuid
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pytest

import browser
import chdb_http
from servers import Program, free_port, wait_for_page

EXIT_TIMEOUT_S = 5  # Ctrl-C to exit, for every program


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


def test_three_programs_fill_the_page_and_stop_cleanly(clickhouse, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    producer = Program("producer.py", [], clickhouse.env, tmp_path / "producer.log")
    server = Program("perspective_server.py", ["--port", str(port)], clickhouse.env, tmp_path / "server.log")
    programs = [server, producer]
    try:
        wait_for_page(url, server, [producer])
        with browser.launch_chromium() as context:
            router = browser.CdnRouter().install(context)
            page = context.new_page()
            console = browser.ConsoleErrors(page)
            page.goto(url)
            try:
                browser.wait_for_status(page, "live", timeout_ms=30_000)
            except Exception:
                router.assert_ok()  # a missing asset explains a stuck page
                pytest.fail(f"page never went live ({browser.status(page)}); console: {console.errors}\n"
                            + "\n".join(p.log() for p in programs))

            # Rows keep arriving: producer -> ClickHouse -> server -> page.
            first = browser.row_count(page)
            grown = browser.wait_for_row_count_above(page, first, timeout_s=30)
            assert grown > first, f"row count stayed at {first}:\n" + "\n".join(p.log() for p in programs)
            shown = browser.row_count(page)

            assert server.interrupt(EXIT_TIMEOUT_S) == 0, server.log()
        assert producer.interrupt(EXIT_TIMEOUT_S) == 0, producer.log()

        # Every row the page showed is a row ClickHouse stored, once.
        stored = clickhouse.count()
        assert stored > 0
        assert shown <= stored, f"the page showed {shown} rows, ClickHouse has {stored}"
    finally:
        for program in programs:
            program.kill()

    if clickhouse.harness is not None:
        assert clickhouse.harness.stop(signal.SIGINT, timeout=EXIT_TIMEOUT_S) == 0, clickhouse.harness.log()
