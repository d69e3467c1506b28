"""Viewers may look, not touch; and only pages from this server may connect.

The websocket tests run the server's real Tornado app, with a real
Perspective server behind the handler that guards /history (ViewerHandler:
it does not care which Perspective server it fronts), and connect with
perspective-python's own client over a real websocket, as a second browser
or a script on the network would. The live feed takes no requests at all
(tests/test_feed.py).
"""

from __future__ import annotations

import asyncio
import os
import random

import perspective
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.websocket

import read_only
from perspective_server import make_app
from viewers import Viewers
from servers import open_viewer

ROWS = [{"ticker": "AAPL", "close": 1.0}, {"ticker": "MSFT", "close": 2.0}]


def capture_requests(actions) -> list[bytes]:
    """The bytes a real Perspective client sends for `actions`, in order."""
    server = perspective.Server()
    server.new_local_client().table({"ticker": "string", "close": "float"}, name="stock_values",
                                    index="ticker")
    sent: list[bytes] = []
    client = None
    session = server.new_session(lambda response: client.handle_response(response))

    def send(request):
        sent.append(request)
        session.handle_request(request)

    client = perspective.Client(send)
    actions(client)
    session.close()  # before the server goes: a session collected after it aborts the process
    return sent


def test_the_requests_a_viewer_makes_are_allowed():
    def look(client):
        table = client.open_table("stock_values")
        table.size()
        table.schema()
        view = table.view(group_by=["ticker"])
        view.to_columns()
        view.delete()

    requests = capture_requests(look)
    assert len(requests) >= 6 and all(read_only.is_allowed(request) for request in requests)


WRITES = {
    "update": lambda client, table: table.update([{"ticker": "X", "close": 9.0}]),
    "replace": lambda client, table: table.replace([{"ticker": "X", "close": 9.0}]),
    "clear": lambda client, table: table.clear(),
    "remove": lambda client, table: table.remove(["AAPL"]),
    "delete": lambda client, table: table.delete(),
    "new table": lambda client, table: client.table({"x": "integer"}, name="intruder"),
}


@pytest.mark.parametrize("write", WRITES)
def test_every_kind_of_write_is_refused(write):
    requests = capture_requests(lambda client: WRITES[write](client, client.open_table("stock_values")))
    opened, *written = requests
    assert read_only.is_allowed(opened)
    assert written and not any(read_only.is_allowed(request) for request in written), \
        [read_only.parse_request(request) for request in written]


def test_malformed_frames_are_refused_without_an_exception():
    generator = random.Random(5)
    frames = [b"", b"\xff", b"\x08", b"\x12\x05ab", os.urandom(64)]
    frames += [bytes(generator.getrandbits(8) for _ in range(generator.randint(1, 200))) for _ in range(2000)]
    for frame in frames:
        allowed = read_only.is_allowed(frame)
        if allowed:  # random bytes that happen to parse as a viewer request
            assert read_only.parse_request(frame)[2] in read_only.VIEWER_REQUESTS


async def serve_demo_table(allowed_origins=()):
    server = perspective.Server()
    table = server.new_local_client().table(ROWS, name="stock_values")
    sock, port = tornado.testing.bind_unused_port()
    http = tornado.httpserver.HTTPServer(make_app(None, allowed_origins, history_server=server))
    http.add_sockets([sock])
    return http, port, table


def test_a_websocket_client_can_read_but_every_write_is_refused():
    async def scenario():
        http, port, table = await serve_demo_table()
        client, socket, reader = await open_viewer(port, f"http://127.0.0.1:{port}")
        remote = await client.open_table("stock_values")
        assert await remote.size() == 2
        view = await remote.view(group_by=["ticker"], columns=["close"])
        assert (await view.to_columns())["close"] == [3.0, 1.0, 2.0]
        refused_before = Viewers.refused
        attempts = {
            "update": lambda: remote.update([{"ticker": "EVIL", "close": 0.0}]),
            "clear": lambda: remote.clear(),
            "replace": lambda: remote.replace([{"ticker": "EVIL", "close": 0.0}]),
            "delete": lambda: remote.delete(),
            "new table": lambda: client.table({"x": "integer"}, name="intruder"),
        }
        for name, attempt in attempts.items():
            with pytest.raises(perspective.PerspectiveError, match="read-only"):
                await asyncio.wait_for(attempt(), timeout=10)
        assert Viewers.refused - refused_before == len(attempts)
        # The server's own table is untouched, and no table was added.
        assert table.size() == 2
        assert sorted(table.view().to_columns()["ticker"]) == ["AAPL", "MSFT"]
        assert await client.get_hosted_table_names() == ["stock_values"]
        socket.close()
        reader.cancel()
        http.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("origin, allowed, accepted", [
    ("same", (), True),
    ("https://evil.example", (), False),
    ("https://intranet.example", ("https://intranet.example",), True),
])
def test_only_the_page_own_origin_or_an_allowed_one_may_connect(origin, allowed, accepted):
    async def scenario():
        http, port, _ = await serve_demo_table(allowed)
        try:
            await open_viewer(port, f"http://127.0.0.1:{port}" if origin == "same" else origin)
            return 101
        except tornado.httpclient.HTTPClientError as error:
            return error.code
        finally:
            http.stop()

    assert asyncio.run(scenario()) == (101 if accepted else 403)


async def recording_viewer(port: int):
    """A Perspective client over a websocket that also keeps the requests it sends."""
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/history",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    socket = await tornado.websocket.websocket_connect(request)
    sent: list[bytes] = []

    async def send(message):
        sent.append(message)
        await socket.write_message(message, binary=True)

    client = perspective.AsyncClient(send)

    async def pump():
        while (message := await socket.read_message()) is not None:
            await client.handle_response(message)

    return client, socket, asyncio.ensure_future(pump()), sent


def raw_request(msg_id: int, entity_id: bytes, kind: int, body: bytes = b"") -> bytes:
    return read_only.encode_message([(1, 0, msg_id), (2, 2, entity_id), (kind, 2, body)])


def error_of(response: bytes) -> str | None:
    """The ServerError message of a Response, None if it is not an error."""
    for number, _, value in read_only.message_fields(response):
        if number == 50:
            return next(v.decode() for n, _, v in read_only.message_fields(value) if n == 1)
    return None


def test_a_connection_cannot_touch_another_connection_view_or_an_unlisted_table():
    async def scenario():
        server = perspective.Server()
        local = server.new_local_client()
        local.table(ROWS, name="stock_values")
        # Hosted by the same Perspective server, but not offered to viewers.
        local.table({"secret": ["s3cret"]}, name="internal")
        sock, port = tornado.testing.bind_unused_port()
        http = tornado.httpserver.HTTPServer(make_app(None, history_server=server, tables=["stock_values"]))
        http.add_sockets([sock])
        owner, owner_socket, owner_reader, sent = await recording_viewer(port)
        view = await (await owner.open_table("stock_values")).view(columns=["close"])
        make_view_body = next(body for _, _, kind, body in map(read_only.parse_request, sent) if kind == 6)
        view_id = next(value for number, _, value in read_only.message_fields(make_view_body) if number == 1)

        intruder = await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
            f"ws://127.0.0.1:{port}/history", headers={"Origin": f"http://127.0.0.1:{port}"}))
        answers = {}
        for name, request in {
            "read the other view": raw_request(7, view_id, 24, b"\n\x00"),
            "delete the other view": raw_request(8, view_id, 11),
            "size of an unlisted table": raw_request(9, b"internal", 8),
            "view of an unlisted table": raw_request(10, b"internal", 6, b"\n\x05spyid\x12\x00"),
        }.items():
            await intruder.write_message(request, binary=True)
            answers[name] = error_of(await asyncio.wait_for(intruder.read_message(), 10))
        # The owner's view is still there and still answers.
        columns = await view.to_columns()
        intruder.close()
        owner_socket.close()
        owner_reader.cancel()
        http.stop()
        return answers, columns

    answers, columns = asyncio.run(scenario())
    assert answers["read the other view"] == "this dashboard is read-only: not a view of this connection"
    assert answers["delete the other view"] == "this dashboard is read-only: not a view of this connection"
    assert answers["size of an unlisted table"] == "this dashboard is read-only: not a hosted table"
    assert answers["view of an unlisted table"] == "this dashboard is read-only: not a hosted table"
    assert columns["close"] == [1.0, 2.0]
