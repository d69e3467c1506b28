"""One viewer must not stall everyone: each attack is refused or contained.

Live pages compute their views in the browser and send the server nothing
(feed.py), so what a viewer can still ask of the server is History's
Perspective protocol (/history, behind viewers.ViewerHandler) and
connections. Three layers of tests:

* the read clamp, as a pure function;
* the handler's limits over a real websocket, in-process, with small limits
  so each one is reached in a few requests, in front of a plain Perspective
  server (the handler does not care which server it fronts);
* attacks against a real `perspective_server.py --embedded` with its
  default limits, while a well-behaved victim page follows the live feed:
  the attack is refused or contained, the victim gets batches every few
  seconds throughout, the server's RSS stays within ATTACK_RSS_BOUND of where
  it started, and at the end the server still stops on SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import perspective
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.websocket

import read_only
import servers
from perspective_server import make_app
from servers import follow_feed, open_viewer, rss_bytes
from test_feed import Mute
from viewers import ViewerLimits, Viewers

TABLE = "stock_values"
ATTACK_SECONDS = 8  # each attack keeps going this long while the victim watches
ATTACK_RSS_BOUND = 300 * 2**20
UPDATE_GAP_S = 10  # generous: the demo producer inserts every 0.5 s

# ---- the rules on their own ---------------------------------------------------

@pytest.mark.parametrize("viewport, columns, expected", [
    ({}, 10, {1: 0, 2: 0, 3: 100, 4: 10}),                         # no ends: the first page
    ({1: 5, 3: 20}, 10, {1: 5, 2: 0, 3: 20, 4: 10}),               # within the budget: unchanged
    ({1: 0, 2: 0, 3: 10_000, 4: 2}, 10, {1: 0, 2: 0, 3: 500, 4: 2}),  # too many rows: cut
    ({}, 5_000, {1: 0, 2: 0, 3: 1, 4: 1_000}),                     # one row too wide: columns cut
])
def test_reads_are_clamped_to_the_cell_budget(viewport, columns, expected):
    assert read_only.clamp_viewport(viewport, columns, max_cells=1_000) == expected


# ---- the limits over a real websocket, in-process --------------------------------

async def serve(limits: ViewerLimits, rows: int = 100, distinct_prices: bool = True):
    """A Perspective server with one table behind make_app's ViewerHandler (the /history route)."""
    server = perspective.Server()
    table = server.new_local_client().table(
        [{"ticker": f"T{i % 5}", "close": float(i if distinct_prices else i % 3)} for i in range(rows)], name=TABLE)
    sock, port = tornado.testing.bind_unused_port()
    http = tornado.httpserver.HTTPServer(make_app(None, limits=limits, history_server=server))
    http.add_sockets([sock])
    return http, port, table


async def sturdy_viewer(port: int):
    """Like open_viewer, but an error reply that matches no pending request
    (a refused on_update) is kept in `errors` instead of ending the reader."""
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/history",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    socket = await tornado.websocket.websocket_connect(request)
    client = perspective.AsyncClient(lambda message: socket.write_message(message, binary=True))
    errors: list[str] = []

    async def pump():
        while (message := await socket.read_message()) is not None:
            try:
                await client.handle_response(message)
            except perspective.PerspectiveError as error:
                errors.append(str(error))

    return client, socket, asyncio.ensure_future(pump()), errors


def refused(match: str):
    return pytest.raises(perspective.PerspectiveError, match=match)


def test_a_read_without_an_end_gets_the_first_page():
    async def scenario():
        http, port, _ = await serve(ViewerLimits(read_cells=20))
        client, socket, reader = await open_viewer(port)
        view = await (await client.open_table(TABLE)).view(columns=["ticker", "close"])
        whole = await view.to_columns()
        window = await view.to_columns(start_row=50, end_row=60)
        socket.close(), reader.cancel(), http.stop()
        return whole, window

    whole, window = asyncio.run(scenario())
    assert whole["close"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]  # 20 cells / 2 columns
    assert window["close"] == [float(i) for i in range(50, 60)]


def test_a_view_with_too_many_columns_or_cells_is_refused_and_deleted():
    async def scenario():
        http, port, _ = await serve(ViewerLimits(view_columns=20, view_cells=150))
        client, socket, reader = await open_viewer(port)
        table = await client.open_table(TABLE)
        with refused("view too large: 101 rows x 200 columns"):  # 100 prices x 2 columns, and a total row
            await asyncio.wait_for(table.view(group_by=["close"], split_by=["close"]), 10)
        # Within --max-view-columns, over --max-view-cells: 101 rows x 2 columns.
        with refused("view too large: 101 rows x 2 columns"):
            await asyncio.wait_for(table.view(group_by=["close"], columns=["ticker", "close"]), 10)
        one_column = await table.view(group_by=["close"], columns=["close"])  # 101 cells: fine
        narrow = await table.view(group_by=["ticker"], split_by=["ticker"])  # 6 rows x 10 columns: fine
        sizes = await one_column.num_rows(), await narrow.num_rows()
        socket.close(), reader.cancel(), http.stop()
        return sizes

    assert asyncio.run(scenario()) == (101, 6)  # the total row, and 100 prices or 5 tickers


def test_views_per_connection_and_subscriptions_per_view_are_capped():
    async def scenario():
        http, port, hosted = await serve(ViewerLimits(views=3, subscriptions=2))
        client, socket, reader, errors = await sturdy_viewer(port)
        table = await client.open_table(TABLE)
        views = [await table.view(group_by=["ticker"]) for _ in range(3)]
        with refused("too many views on one connection"):
            await asyncio.wait_for(table.view(), 10)
        await views.pop().delete()
        views.append(await table.view())  # a deleted view frees its place

        # perspective-python's on_update does not wait for an answer (the
        # refusal arrives as an error nobody awaits), so count which
        # subscriptions the server actually serves.
        fired = set()
        for number in range(5):
            await views[0].on_update(lambda *_, number=number: fired.add(number))
        await views[0].num_rows()  # every subscription request has been handled
        hosted.update([{"ticker": "T9", "close": -1.0}])
        for _ in range(100):
            if fired:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # time for a third callback, if there were one
        socket.close(), reader.cancel(), http.stop()
        return fired, errors

    fired, errors = asyncio.run(scenario())
    assert fired == {0, 1}
    assert len(errors) == 3 and all("too many update subscriptions" in error for error in errors), errors


def test_delete_subscriptions_are_capped_too():
    async def scenario():
        http, port, _ = await serve(ViewerLimits(subscriptions=2))
        client, socket, reader, errors = await sturdy_viewer(port)
        table = await client.open_table(TABLE)
        for _ in range(3):
            await table.on_delete(lambda: None)
        await table.size()  # every subscription request has been handled
        socket.close(), reader.cancel(), http.stop()
        return errors

    errors = asyncio.run(scenario())
    assert len(errors) == 1 and "too many delete subscriptions" in errors[0], errors


def test_a_viewer_that_stops_reading_is_closed_at_the_send_buffer(caplog):
    async def scenario():
        http, port, _ = await serve(ViewerLimits(send_buffer=1 << 20), rows=20_000)
        client, socket, reader = await open_viewer(port)
        view = await (await client.open_table(TABLE)).view()
        reader.cancel()  # never read again: the replies pile up on the server
        requests = [asyncio.ensure_future(view.to_arrow()) for _ in range(60)]  # about 300 KB each
        closed = False
        for _ in range(100):
            await asyncio.sleep(0.1)
            if not Viewers.open:
                closed = True
                break
        for request in requests:
            request.cancel()
        socket.close(), http.stop()
        return closed

    with caplog.at_level(logging.WARNING, logger="server"):
        closed = asyncio.run(scenario())
    assert closed
    assert [r for r in caplog.records if "--max-send-buffer" in r.getMessage()]


def test_connections_per_address_are_capped_and_freed_on_close():
    async def scenario():
        http, port, _ = await serve(ViewerLimits(connections_per_address=2))
        first, second = await open_viewer(port), await open_viewer(port)
        with pytest.raises(tornado.httpclient.HTTPClientError) as third:
            await open_viewer(port)
        first[1].close(), first[2].cancel()
        for _ in range(100):  # the server sees the close a moment later
            try:
                again = await open_viewer(port)
                break
            except tornado.httpclient.HTTPClientError:
                await asyncio.sleep(0.1)
        else:
            again = None
        for connection in (second, again):
            if connection:
                connection[1].close(), connection[2].cancel()
        http.stop()
        return third.value.code, again is not None

    assert asyncio.run(scenario()) == (503, True)


# ---- each attack against the real server, with a victim watching ----------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    running = servers.Server(servers.free_port(), folder / "chdb", folder / "server.log")
    running.wait_ready()
    yield running
    running.stop()


class Victim:
    """A well-behaved page: a copy of the live table, and the time each batch arrived."""

    def __init__(self, port: int):
        self.port = port
        self.updates: list[float] = []

    async def __aenter__(self):
        self.replica, follower = await follow_feed(self.port)
        follower.cancel()  # this victim applies batches itself, noting when each came
        self.follower = asyncio.ensure_future(self.follow())
        return self

    async def follow(self):
        while (message := await self.replica.socket.read_message()) is not None:
            self.replica.apply(message)
            self.updates.append(time.monotonic())

    async def __aexit__(self, *exc):
        self.replica.close()
        self.follower.cancel()

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without an update between `start` and `end`."""
        times = [start, *(t for t in self.updates if start <= t <= end), end]
        return max(later - earlier for earlier, later in zip(times, times[1:]))


def under_attack(server, attack) -> dict:
    """Runs `attack(port, until)` with a victim watching; returns what happened."""
    async def scenario():
        async with Victim(server.port) as victim:
            await asyncio.sleep(1)
            rss_before = rss_bytes(server.proc.pid)
            rss_max = rss_before
            start = time.monotonic()
            until = start + ATTACK_SECONDS
            attacking = asyncio.ensure_future(attack(server.port, until))
            while time.monotonic() < until + 1:
                rss_max = max(rss_max, rss_bytes(server.proc.pid))
                await asyncio.sleep(0.25)
            outcome = await asyncio.wait_for(attacking, 30)
            end = time.monotonic()
            return {"outcome": outcome, "gap": victim.longest_gap(start, end), "rss_growth": rss_max - rss_before,
                    "updates": len([t for t in victim.updates if start <= t <= end])}

    result = asyncio.run(scenario())
    print(f"\n{attack.__name__}: {str(result)[:400]}")
    assert server.proc.poll() is None, server.log()
    assert result["updates"] > 0 and result["gap"] < UPDATE_GAP_S, ("the victim stalled", result)
    assert result["rss_growth"] < ATTACK_RSS_BOUND, result
    return result["outcome"]


async def answer(awaitable, timeout: float = 10) -> str:
    try:
        await asyncio.wait_for(awaitable, timeout)
        return "ok"
    except asyncio.TimeoutError:
        return "no answer"
    except perspective.PerspectiveError as error:
        return str(error)


def test_pages_that_never_read_or_keep_rejoining_cost_the_victim_nothing(server):
    """Every join costs a snapshot of the whole table: pages that join again
    and again share one per poll, and pages that never read are closed at
    --max-send-buffer (tests/test_feed.py shows it with a small buffer)."""
    async def stuck_and_rejoining(port, until):
        stuck = [Mute(port) for _ in range(3)]
        joins = 0
        while time.monotonic() < until:
            replica, follower = await follow_feed(port, patience=0)
            replica.close(), follower.cancel()
            joins += 1
        for page in stuck:
            page.sock.close()
        return joins

    log_start = len(server.log())
    joins = under_attack(server, stuck_and_rejoining)
    assert joins > 10
    assert "Traceback" not in server.log()[log_start:]


def test_many_history_views_on_one_connection_stop_at_the_limit(server):
    async def views(port, until):
        client, socket, reader = await open_viewer(port)
        table = await client.open_table(TABLE)
        made, last = 0, "ok"
        while time.monotonic() < until and made < 64:
            last = await answer(table.view(group_by=["ticker"], columns=["volume"]))
            if last != "ok":
                break
            made += 1
        socket.close(), reader.cancel()
        return made, last

    made, last = under_attack(server, views)
    assert made == ViewerLimits().views and "too many views" in last


def test_a_flood_of_connections_is_refused_at_the_handshake(server):
    async def flood(port, until):
        sockets, refused_codes = [], []
        while time.monotonic() < until and len(sockets) + len(refused_codes) < 1000:
            try:
                if len(sockets) % 2:
                    client, socket, reader = await open_viewer(port)
                    sockets.append((socket, reader))
                else:
                    replica, follower = await follow_feed(port, patience=0)
                    sockets.append((replica, follower))
            except tornado.httpclient.HTTPClientError as error:
                refused_codes.append(error.code)
        for socket, reader in sockets:
            socket.close(), reader.cancel()
        return len(sockets), refused_codes

    opened, refused_codes = under_attack(server, flood)
    # The victim holds one of the address's places.
    assert opened == ViewerLimits().connections_per_address - 1
    assert refused_codes and set(refused_codes) == {503}


def test_after_every_attack_the_server_stops_on_sigint(server):
    assert server.proc.poll() is None
    assert server.stop() == 0  # Server.stop fails the test if SIGINT is ignored for 30 s
    log = server.log()
    assert "Task exception was never retrieved" not in log
    assert "Traceback" not in log, log[-3000:]


def test_a_limit_below_one_is_one_clear_line_and_exit_2():
    result = subprocess.run([sys.executable, "perspective_server.py", "--max-views", "0"], cwd=servers.REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--max-views must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr
