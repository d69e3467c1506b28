"""The live feed: every page's copy of the table holds exactly the server's rows.

The server (a real Perspective table with a `limit`, updated through Sync.push
as perspective_server.py does) serves /feed from make_app on a real port;
the pages are feed.Replica copies in perspective-python, which is the same
engine the browser runs as WebAssembly. index.html follows the feed the same
way; tests/test_topology.py checks it in Chromium.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import perspective
import pyarrow as pa
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.websocket

from feed import Feed, Replica, to_ipc
from perspective_server import Sync, make_app
from servers import free_port
from tailer import CURSOR
from viewers import ViewerLimits, Viewers

LIMIT = 500


class Rows:
    """Batches of market-like rows with unique ids, plus the cursor column Sync reads."""

    def __init__(self, seed: int = 7):
        self.rng = np.random.default_rng(seed)
        self.next_id = 0

    def batch(self, size: int) -> pa.Table:
        ids = np.arange(self.next_id, self.next_id + size, dtype=np.int64)
        self.next_id += size
        return pa.table({
            "id": ids,
            "ticker": pa.array([f"T{i % 7}" for i in ids]),
            "close": self.rng.random(size) * 100,
            CURSOR: np.full(size, 1_700_000_000_000_000, dtype=np.int64),  # as the Tail gives it: microseconds
        })


def contents(table: perspective.Table) -> collections.Counter:
    """The table's rows as a multiset of tuples."""
    view = table.view()
    try:
        columns = view.to_columns()
    finally:
        view.delete()
    names = sorted(columns)
    return collections.Counter(zip(*(columns[name] for name in names)))


def test_a_limit_table_rebuilt_from_its_snapshot_evicts_the_same_rows_as_the_original():
    """Perspective's `limit` is a ring that overwrites the oldest rows. A copy
    made from a snapshot of a ring that has wrapped, then fed the same
    batches, must drop the same rows: the feed relies on it."""
    client = perspective.Server().new_local_client()
    rows, rng = Rows(), random.Random(3)
    server = client.table(to_ipc(rows.batch(0).drop_columns([CURSOR])), limit=LIMIT)
    copies = []
    for step in range(120):
        batch = to_ipc(rows.batch(rng.choice([1, 7, 99, LIMIT - 1, LIMIT, LIMIT + 3, 2 * LIMIT])).drop_columns([CURSOR]))
        server.update(batch)
        for copy in copies:
            copy.update(batch)
        if step % 17 == 5:  # a new copy now and then, from wherever the ring stands
            view = server.view()
            copies.append(client.table(view.to_arrow(), limit=LIMIT))
            view.delete()
    expected = contents(server)
    assert sorted(row[1] for row in expected) == list(range(rows.next_id - LIMIT, rows.next_id))  # (close, id, ticker)
    for copy in copies:
        assert contents(copy) == expected


class LiveServer:
    """make_app's /feed on a real port, over a limit table fed by Sync.push on one worker thread."""

    def __init__(self, limits: ViewerLimits = ViewerLimits(), attach: bool = True):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="clickhouse")
        loop = asyncio.get_running_loop()
        self.run = lambda function, *args: loop.run_in_executor(self.executor, function, *args)
        self.rows = Rows()
        self.client = perspective.Server().new_local_client()
        self.table = self.client.table(to_ipc(self.rows.batch(0).drop_columns([CURSOR])), limit=LIMIT,
                                       name="stock_values")
        self.feed = Feed(self.run, LIMIT)
        self.sync = Sync(None, self.table, self.feed.attach(self.table) if attach else None)
        self.port = free_port()
        self.http = tornado.httpserver.HTTPServer(make_app(self.feed, limits=limits))
        self.http.listen(self.port, "127.0.0.1")
        self.url = f"ws://127.0.0.1:{self.port}/feed"
        self.origin = f"http://127.0.0.1:{self.port}"

    async def push(self, size: int) -> None:
        await self.run(self.sync.push, self.rows.batch(size))

    async def join(self) -> tuple[Replica, asyncio.Future]:
        replica = await Replica.connect(self.url, perspective.Server().new_local_client(), self.origin)
        return replica, asyncio.ensure_future(replica.follow())

    async def caught_up(self, replicas, timeout: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while any(r.sequence < self.feed.sequence for r in replicas):
            assert asyncio.get_running_loop().time() < deadline, \
                f"replicas at {[r.sequence for r in replicas]}, feed at {self.feed.sequence}"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.http.stop()
        Viewers.close_all()
        self.executor.shutdown()


def test_pages_that_join_before_during_and_after_eviction_hold_exactly_the_server_rows():
    async def scenario():
        server = LiveServer()
        rng = random.Random(5)
        for _ in range(3):
            await server.push(40)
        before = await server.join()
        during, evicting = [], []

        async def burst():
            for step in range(300):
                await server.push(rng.randint(1, 120))
                if step % 10 == 0:
                    await asyncio.sleep(0)  # let joins interleave with the batches

        async def join_while(group, until):
            while not until():
                group.append(await server.join())
                await asyncio.sleep(rng.random() * 0.01)

        burst_task = asyncio.ensure_future(burst())
        # Pages join while batches are applied, some while a snapshot is being
        # taken: each must start exactly where its snapshot ends.
        await join_while(during, lambda: server.rows.next_id > LIMIT or burst_task.done())
        await join_while(evicting, lambda: len(evicting) >= 5 or burst_task.done())
        await burst_task
        evicting.append(await server.join())  # after the burst, well into eviction
        replicas = [before[0]] + [r for r, _ in during + evicting]
        await server.caught_up(replicas)
        expected = contents(server.table)
        results = [contents(r.table) for r in replicas]
        sequences = [r.sequence for r in replicas]
        for replica, follower in [before, *during, *evicting]:
            replica.close()
            follower.cancel()
        server.stop()
        return expected, results, sequences, len(during), server.rows.next_id

    expected, results, sequences, joined_during, total = asyncio.run(scenario())
    assert total > 10 * LIMIT and joined_during >= 1
    assert sorted(row[1] for row in expected) == list(range(total - LIMIT, total))  # (close, id, ticker)
    assert all(result == expected for result in results), \
        [i for i, result in enumerate(results) if result != expected]
    assert len(set(sequences)) == 1


class Mute:
    """A websocket client that completes the handshake and then never reads: a stuck page."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.sendall((f"GET /feed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           f"Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{port}\r\n\r\n").encode())


def test_a_page_that_stops_reading_is_dropped_in_one_line_and_the_others_keep_up(caplog):
    async def scenario():
        server = LiveServer(ViewerLimits(send_buffer=1 << 20))
        await server.push(10)
        follower = await server.join()
        mute = Mute(server.port)
        while len(server.feed.pages) < 2:
            await asyncio.sleep(0.01)
        for _ in range(400):  # about 100 KB each: 40 MB in all, far past the mute page's buffers
            await server.push(2_000)
        await server.caught_up([follower[0]])
        pages_left = len(server.feed.pages)
        equal = contents(follower[0].table) == contents(server.table)
        follower[0].close()
        follower[1].cancel()
        mute.sock.close()
        server.stop()
        return pages_left, equal

    with caplog.at_level(logging.WARNING, logger="server"):
        pages_left, equal = asyncio.run(scenario())
    dropped = [r.getMessage() for r in caplog.records if "behind the feed" in r.getMessage()]
    assert len(dropped) == 1, dropped
    assert pages_left == 1 and equal


def test_the_feed_is_listen_only_same_origin_and_capped():
    async def scenario():
        server = LiveServer(ViewerLimits(connections_per_address=3))
        await server.push(5)
        outcomes = {}

        talker = await tornado.websocket.websocket_connect(
            tornado.httpclient.HTTPRequest(server.url, headers={"Origin": server.origin}))
        await talker.read_message(), await talker.read_message()  # hello, snapshot
        await talker.write_message(b"\x08\x01", binary=True)
        while await talker.read_message() is not None:
            pass
        outcomes["message"] = talker.close_code

        for name, origin in (("other site", "https://evil.example"), ("no origin", None)):
            try:
                sock = await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
                    server.url, headers={"Origin": origin} if origin else {}))
                outcomes[name] = "accepted"
                sock.close()
            except tornado.httpclient.HTTPClientError as error:
                outcomes[name] = error.code

        pages = [await server.join() for _ in range(3)]
        try:
            await server.join()
            outcomes["fourth"] = "accepted"
        except tornado.httpclient.HTTPClientError as error:
            outcomes["fourth"] = error.code
        for replica, follower in pages:
            replica.close()
            follower.cancel()
        server.stop()

        early = LiveServer(attach=False)  # listening, no table yet: come back later
        sock = await tornado.websocket.websocket_connect(
            tornado.httpclient.HTTPRequest(early.url, headers={"Origin": early.origin}))
        assert await sock.read_message() is None
        outcomes["no table yet"] = sock.close_code
        early.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes == {"message": 1003, "other site": 403, "no origin": "accepted", "fourth": 503,
                        "no table yet": 1013}
