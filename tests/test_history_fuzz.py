"""tests/test_fuzz.py's idea against /history: malformed frames and random,
often nonsensical view configs on the history websocket; the process stays
up and a well-behaved history viewer is still answered afterwards."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import perspective
import tornado.httpclient
import tornado.websocket

from test_fuzz import malformed_frames
from test_history_server import open_history

FRAMES = 3_000
CONFIGS = 300
VALID = ["close", "ticker", "client", "volume", "timestamp", "date", "inserted_at"]
NAMES = VALID * 4 + ["b"] * 4 + ["id", "nope", "", "close`", 'close" --', None, 7]
OPS = ["==", "!=", "<", ">=", "contains", "in", "not in", "is null", "begins with", "LIKE", ";", None]
VALUES = [1, -1.5, 1e308, "AAPL", "", "' OR 1 --", ["a", "b"], [], None, True, "2024-01-01"]
AGGREGATES = ["sum", "count", "avg", "first", "last", "distinct count"] * 3 + ["median", "sum(1)", "", None]
EXPRESSIONS = ['bucket("timestamp", \'1m\')', 'bucket("date", \'1W\')', 'bucket("timestamp", \'7m\')',
               '"close" * "volume"', '"close" / 0', 'bucket("close", \'1m\')', "1 +", "bucket(", "'1m'", 7, None]


def random_config(rng: random.Random) -> dict:
    pick = lambda options, most=3: [rng.choice(options) for _ in range(rng.randint(0, most))]  # noqa: E731
    return {
        "columns": pick(NAMES, 4), "group_by": pick(NAMES, 2), "split_by": pick(NAMES, 1),
        "sort": [[rng.choice(NAMES), rng.choice(["asc", "desc", "col asc", "none"])] for _ in range(rng.randint(0, 2))],
        "filter": [[rng.choice(NAMES), rng.choice(OPS), rng.choice(VALUES)] for _ in range(rng.randint(0, 3))],
        "aggregates": {rng.choice(VALID): rng.choice(AGGREGATES) for _ in range(rng.randint(0, 2))},
        "group_rollup_mode": rng.choice(["rollup", "flat", "total"]),
        "expressions": {rng.choice(NAMES + ["b"] * 8): rng.choice(EXPRESSIONS) for _ in range(rng.randint(0, 2))},
    }


def test_history_survives_malformed_frames_and_random_configs(start_server):
    server = start_server()

    async def scenario():
        request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{server.port}/history",
                                                 headers={"Origin": f"http://127.0.0.1:{server.port}"})
        attacker = await tornado.websocket.websocket_connect(request, on_message_callback=lambda message: None)
        for frame in malformed_frames(FRAMES, seed=23):
            await attacker.write_message(frame, binary=True)

        client, socket, reader, _ = await open_history(server.port)
        while True:  # the producer creates the table shortly after start
            try:
                table = await client.open_table("stock_values")
                await table.size()
                break
            except perspective.PerspectiveError:
                await asyncio.sleep(0.2)
        rng = random.Random(5)
        answered = refused = 0
        for _ in range(CONFIGS):
            config = random_config(rng)
            try:
                view = await asyncio.wait_for(table.view(**config), timeout=30)
                await asyncio.wait_for(view.to_columns(start_row=0, end_row=20), timeout=30)
                await view.delete()
                answered += 1
            except Exception:  # noqa: BLE001 - the client library may refuse a config before sending it
                refused += 1  # refused by the client library or by the server: both fine
        # A well-behaved viewer is still served.
        view = await table.view(columns=["close"], group_by=["ticker"], aggregates={"close": "avg"})
        cells = await view.to_columns()
        attacker.close()
        socket.close()
        reader.cancel()
        return answered, refused, cells

    answered, refused, cells = asyncio.run(scenario())
    print(f"\n/history: {FRAMES:,} malformed frames, {CONFIGS} random configs "
          f"({answered} answered, {refused} refused)")
    assert server.proc.poll() is None, server.log()
    with urllib.request.urlopen(server.url, timeout=5) as response:
        assert response.status == 200
    assert cells["__ROW_PATH__"][0] == [] and len(cells["close"]) >= 2
    assert answered > 0 and refused > 0
    assert "Traceback" not in server.log()
