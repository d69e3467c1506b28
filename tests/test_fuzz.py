"""Hostile input on the websocket: the server stays up, bounded, and serving.

A real perspective_server.py (embedded, producer running) gets more than
10,000 malformed frames on one socket while a well-behaved viewer on another
socket keeps a view with on_update open.
"""

from __future__ import annotations

import asyncio
import random
import urllib.request

import tornado.httpclient
import tornado.websocket

import read_only
from servers import open_viewer, rss_bytes

FRAMES = int(__import__("os").environ.get("FUZZ_FRAMES", 10_000))
OVERSIZED = 12  # each one makes Tornado close that socket (message too big)


# What perspective-python 4.3.0's own client sent for: open_table, size,
# schema, view(group_by, columns, filter), to_columns, to_arrow, schema,
# dimensions, update, view.delete. Captured once and kept as bytes, because a
# Perspective server in the test process itself could take pytest down with it.
REAL_REQUESTS = [bytes.fromhex(request) for request in (
    "08b1b5e7b4012200",
    "0888acb9a109120c73746f636b5f76616c7565734200",
    "089cd8bd8b07120c73746f636b5f76616c7565733a00",
    "088b8383a006120c73746f636b5f76616c75657332420a155764756a4b43797449534f69456f637a6e7466427a12290a0674"
    "69636b65721a0912070a05636c6f736522140a067469636b657212023d3d1a0632044141504c",
    "08a8d7a64c12155764756a4b43797449534f69456f637a6e7466427ac201020a00",
    "08d7c1e5d50f12155764756a4b43797449534f69456f637a6e7466427a8201020a00",
    "08b5f6dddd0d12155764756a4b43797449534f69456f637a6e7466427a7a00",
    "08aa88848d0d12155764756a4b43797449534f69456f637a6e7466427a6200",
    "08e8fca8d809120c73746f636b5f76616c7565738a02230a21221f5b7b227469636b6572223a202241222c2022636c6f7365"
    "223a20312e307d5d",
    "089096b6b20112155764756a4b43797449534f69456f637a6e7466427a5a00",
)]


def malformed_frames(count: int, seed: int = 11) -> list[bytes]:
    rng = random.Random(seed)
    samples = REAL_REQUESTS
    frames = []
    while len(frames) < count:
        sample = rng.choice(samples)
        kind = len(frames) % 4
        if kind == 0:  # random bytes
            frames.append(rng.randbytes(rng.randint(1, 300)))
        elif kind == 1:  # a real request cut short
            frames.append(sample[:rng.randint(0, max(0, len(sample) - 1))])
        elif kind == 2:  # a real request with flipped bits
            corrupt = bytearray(sample)
            for _ in range(rng.randint(1, 4)):
                corrupt[rng.randrange(len(corrupt))] ^= 1 << rng.randrange(8)
            frames.append(bytes(corrupt))
        else:  # lengths and varints that lie
            frames.append(rng.choice([b"\xff" * rng.randint(1, 40), b"\x12\xff\xff\xff\xff\x0f",
                                      b"\x42\x7f" + rng.randbytes(3), b"\x08" * rng.randint(1, 9)]))
    return frames


async def fuzzer(port: int):
    """A raw websocket; returns it and a future that resolves when the server closes it."""
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/websocket",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    closed = asyncio.get_running_loop().create_future()

    def on_message(message):
        # Replies (refusals) are thrown away, so they never back up.
        if message is None and not closed.done():
            closed.set_result(True)

    return await tornado.websocket.websocket_connect(request, on_message_callback=on_message), closed


def test_malformed_frames_leave_the_server_up_bounded_and_serving(start_server):
    server = start_server()
    frames = malformed_frames(FRAMES)
    passed_to_perspective = sum(read_only.is_allowed(frame) for frame in frames)

    async def scenario():
        client, socket, reader = await open_viewer(server.port)
        while "stock_values" not in await client.get_hosted_table_names():
            await asyncio.sleep(0.2)  # the server listens before its first backfill
        table = await client.open_table("stock_values")
        view = await table.view()
        updates = []
        await view.on_update(lambda *args: updates.append(1))

        attacker, _ = await fuzzer(server.port)
        for frame in frames[:1000]:  # warm-up: whatever the first frames allocate
            await attacker.write_message(frame, binary=True)
        await asyncio.sleep(1)
        rss_before = rss_bytes(server.proc.pid)
        updates_before = len(updates)
        for frame in frames[1000:]:
            await attacker.write_message(frame, binary=True)
        closed_by_server = 0
        for _ in range(OVERSIZED):
            attacker, closed = await fuzzer(server.port)
            try:
                await attacker.write_message(b"\x00" * (2 << 20), binary=True)
            except tornado.websocket.WebSocketClosedError:
                pass  # the server may hang up before the whole frame is written
            await asyncio.wait_for(closed, timeout=10)  # the server hangs up on it
            closed_by_server += 1
        await asyncio.sleep(1)
        rss_after = rss_bytes(server.proc.pid)
        updates_during = len(updates) - updates_before

        # The well-behaved viewer is still served, after all of it.
        mark = len(updates)
        for _ in range(100):
            if len(updates) > mark:
                break
            await asyncio.sleep(0.1)
        size = await table.size()
        attacker.close()
        socket.close()
        reader.cancel()
        return rss_before, rss_after, updates_during, len(updates) - mark, size, closed_by_server

    rss_before, rss_after, updates_during, updates_after, size, closed = asyncio.run(scenario())
    print(f"\nfuzzed {FRAMES + OVERSIZED:,} frames; server RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB; viewer updates during fuzz {updates_during}, after {updates_after}; "
          f"{closed} oversized frames closed by the server; {passed_to_perspective:,} frames parsed as "
          f"viewer requests and reached Perspective, the rest were refused at the gate")
    assert server.proc.poll() is None, server.log()
    with urllib.request.urlopen(server.url, timeout=5) as response:
        assert response.status == 200
    assert closed == OVERSIZED
    assert updates_during > 0 and updates_after > 0, "the viewer stopped receiving updates"
    assert size > 0
    # 9,000 frames of up to 300 bytes: a leak of even 5 KiB a frame would show.
    assert rss_after - rss_before < 40 * 2**20, (rss_before, rss_after)
    assert "Traceback" not in server.log()
