"""/history on a running perspective_server.py: hostile requests, limits, and
live updates that keep flowing while a heavy history query runs.

One real server (embedded chDB, producer running) for the module, started on
a chDB folder prepared beforehand with a few million rows of history and a
canary table holding a secret. Every request travels over a real websocket.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request

import perspective
import pytest
import tornado.httpclient
import tornado.websocket

from servers import REPO, Program, follow_feed, free_port

SECRET = "canary-7f3a9c"
HISTORY_ROWS = 3_000_000

PREPARE = f"""
import clickhouse_connect, sys
sys.path.insert(0, {str(REPO)!r})
import producer
client = clickhouse_connect.get_client(dsn="chdb:///" + sys.argv[1])
client.command("CREATE DATABASE IF NOT EXISTS demo")
client.database = "demo"
client.command("CREATE TABLE canary (secret String) ENGINE = MergeTree ORDER BY secret")
client.command("INSERT INTO canary VALUES ('{SECRET}')")
producer.create_table(client, "stock_values")
client.command(
    "INSERT INTO stock_values (inserted_at, id, timestamp, ticker, client, open, high, low, close, volume, date) "
    "SELECT now64(6) - toIntervalSecond(3600 * 24) + toIntervalMicrosecond(number), generateUUIDv4(number), "
    "now64(3) - toIntervalSecond(number % 86400), ['AAPL','MSFT','GOOG'][1 + number % 3], "
    "['alice','bob'][1 + number % 2], 100, 101, 99, 100 + number % 7, number % 1000, today() "
    "FROM numbers({HISTORY_ROWS})")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("history-server")
    data = folder / "chdb-data"
    subprocess.run([sys.executable, "-c", PREPARE, str(data)], check=True, cwd=REPO, timeout=300)
    port = free_port()
    program = Program("perspective_server.py",
                      ["--embedded", "--chdb-path", str(data), "--port", str(port),
                       "--history-max-rows", "5000", "--history-timeout", "20"], {}, folder / "server.log")
    for _ in range(300):
        if program.proc.poll() is not None:
            pytest.fail(program.log())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                break
        except OSError:
            import time
            time.sleep(0.2)
    program.port = port
    yield program
    assert program.interrupt(timeout=30) == 0, program.log()
    assert "Traceback" not in program.text(), program.log()


async def open_history(port: int):
    """A Perspective client on /history over a real websocket; every byte the
    server sends is also kept, to search it for the canary."""
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/history",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    socket = await tornado.websocket.websocket_connect(request)
    received = []

    async def send(message):
        await socket.write_message(message, binary=True)

    client = perspective.AsyncClient(send)

    async def pump():
        while (message := await socket.read_message()) is not None:
            received.append(message)
            await client.handle_response(message)

    return client, socket, asyncio.ensure_future(pump()), received


async def refused(coroutine) -> str:
    """The error text of a request that must fail."""
    try:
        await asyncio.wait_for(coroutine, timeout=30)
    except perspective.PerspectiveError as error:
        return str(error)
    raise AssertionError("the request was answered, not refused")


HOSTILE_NAMES = ['close" FROM system.users --', "close` FROM canary --", "canary.secret", "`secret`",
                 "sum(close)", "1", "", "close\x00"]


# A subquery, statement separators, a quote inside the unit, unknown
# functions, loops and assignment, and columns of another table.
HOSTILE_EXPRESSIONS = [
    '"close" + (SELECT secret FROM canary)', '"close"; DROP TABLE canary', 'bucket("timestamp", \'1m\'); 1',
    'bucket("timestamp", \'1m\\\') UNION ALL SELECT secret FROM canary --\')', "bucket(\"timestamp\", '1m'')",
    'sleep(3)', 'file(\'/etc/passwd\')', 'bucket(secret, \'1m\')', "for (var i := 0; i < 1e9; i += 1) { 1 }",
    "while (true) { 1 }", "repeat 1 until false", 'var x := "close"', '"secret"', '"canary.secret"',
    '"canary"."secret"', 'bucket("canary.secret", \'1D\')', '"close` FROM canary --"',
]


def test_hostile_requests_are_refused_or_harmless_and_the_canary_never_leaks(server):
    async def scenario():
        client, socket, reader, received = await open_history(server.port)
        assert await client.get_hosted_table_names() == ["stock_values"]
        table = await client.open_table("stock_values")
        assert "secret" not in await table.schema()
        errors = []
        for name in HOSTILE_NAMES:
            errors.append(await refused(table.view(columns=[name])))
            errors.append(await refused(table.view(columns=["close"], group_by=[name])))
            errors.append(await refused(table.view(columns=["close"], split_by=[name])))
            errors.append(await refused(table.view(columns=["close"], sort=[[name, "desc"]])))
            errors.append(await refused(table.view(columns=["close"], filter=[[name, "==", 1]])))
            errors.append(await refused(table.view(columns=["close"], aggregates={name: "sum"})))
        for aggregate in ["sum(1)) FROM canary --", "argMax", "any", "weighted mean"]:
            errors.append(await refused(table.view(columns=["close"], group_by=["ticker"],
                                                   aggregates={"close": aggregate})))
        for expression in HOSTILE_EXPRESSIONS:
            errors.append(await refused(table.view(columns=["close", "x"], expressions={"x": expression})))
            # The editor's check: refused by the gate, or answered with an error.
            try:
                checked = await table.validate_expressions({"x": expression})
            except perspective.PerspectiveError:
                continue
            assert checked["errors"] and not checked["expression_schema"], (expression, checked)
        errors.append(await refused(table.view(columns=["close"], filter=[["close", "; DROP", 1]])))
        assert all(errors), errors
        # Hostile values are bound parameters: they match nothing, and break nothing.
        for value in ["x' OR 1=1 --", "') UNION ALL SELECT secret FROM canary --", "{p0:String}", "\\'"]:
            view = await table.view(columns=["ticker"], filter=[["ticker", "==", value]])
            assert await view.num_rows() == 0
            await view.delete()
            view = await table.view(columns=["ticker"], group_by=["ticker"],
                                    filter=[["ticker", "in", [value, "AAPL"]], ["client", "contains", value[:3]]])
            assert (await view.to_columns()).get("__ROW_PATH__", []) in ([], [[]], [[], ["AAPL"]])
            await view.delete()
        # A hostile expression *name* is only ever quoted: the view works.
        name = "x` FROM canary --"
        view = await table.view(columns=[name], group_by=[name], expressions={name: 'bucket("timestamp", \'1D\')'})
        assert len((await view.to_columns())["__ROW_PATH__"]) >= 2
        await view.delete()
        for name in ["canary", "stock_values` UNION ALL SELECT * FROM canary --", "system.users"]:
            await refused(_size(client, name))
        # Still serving, and the table is still there.
        view = await table.view(columns=["close"], group_by=["ticker"])
        assert ["AAPL"] in (await view.to_columns())["__ROW_PATH__"]
        socket.close()
        reader.cancel()
        return received

    received = asyncio.run(scenario())
    assert not any(SECRET.encode() in message for message in received)
    assert not any(b"Traceback" in message for message in received)


async def _size(client, name):
    table = await client.open_table(name)
    return await table.size()


def test_a_query_over_a_limit_gets_an_error_and_the_server_keeps_working(server):
    async def scenario():
        client, socket, reader, _ = await open_history(server.port)
        table = await client.open_table("stock_values")
        view = await table.view(columns=["close", "ticker"])
        rows = await view.num_rows()
        assert rows >= 3_000_000
        # --history-max-rows 5000: all rows at once is over the limit ...
        error = await refused(view.to_columns())
        assert "more than 5,000 rows (--history-max-rows): choose a larger bucket" in error, error
        # A chart reads all of its rows: a day of 1-second buckets is too many,
        # with the same one-line hint; hourly buckets draw.
        by_second = await table.view(columns=["close"], group_by=["b"], group_rollup_mode="flat",
                                     expressions={"b": 'bucket("timestamp", \'1s\')'})
        assert "choose a larger bucket" in await refused(by_second.to_columns())
        hourly = await table.view(columns=["close"], group_by=["b"], group_rollup_mode="flat",
                                  expressions={"b": 'bucket("timestamp", \'1h\')'})
        assert 24 <= len((await hourly.to_columns())["close"]) <= 25
        # ... but a viewport, as the grid asks for, is fine; so is a pivot.
        page = await view.to_columns(start_row=0, end_row=50)
        assert len(page["close"]) == 50
        grouped = await table.view(columns=["close"], group_by=["ticker"], split_by=["client"])
        cells = await grouped.to_columns()
        assert set(cells) >= {"alice|close", "bob|close"}
        socket.close()
        reader.cancel()
        return error

    error = asyncio.run(scenario())
    assert "SELECT" not in error  # ClickHouse's reason, not our query text


def test_live_updates_keep_flowing_while_a_heavy_history_query_runs(server):
    async def scenario():
        live, follower = await follow_feed(server.port)
        start = live.sequence
        for _ in range(300):  # the producer is running: updates arrive
            if live.sequence - start >= 2:
                break
            await asyncio.sleep(0.1)
        assert live.sequence - start >= 2, "no live updates even before any history query"

        client, socket, reader, _ = await open_history(server.port)
        table = await client.open_table("stock_values")
        during, heavy_queries = 0, 0
        # A group-by over 3M distinct cursor values, sorted by an aggregate:
        # seconds of work in ClickHouse.
        while during < 3 and heavy_queries < 40:
            before = live.sequence
            view = await table.view(columns=["close", "volume"], group_by=["inserted_at"],
                                    aggregates={"close": "distinct count"}, sort=[["volume", "desc"]])
            try:
                await asyncio.wait_for(view.num_rows(), timeout=60)
            except perspective.PerspectiveError:
                pass  # over a limit is fine too: it still ran in ClickHouse first
            await view.delete()  # a connection holds at most --max-views
            during += live.sequence - before
            heavy_queries += 1
        socket.close()
        reader.cancel()
        live.close()
        follower.cancel()
        return during, heavy_queries

    during, heavy_queries = asyncio.run(scenario())
    print(f"\n{during} live updates arrived during {heavy_queries} heavy history queries")
    assert during >= 3, server.text()[-3000:]
