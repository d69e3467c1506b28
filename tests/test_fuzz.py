"""Hostile input on the live feed: the server stays up, bounded, and serving.

The page sends nothing on /feed, so anything a client sends there closes
that client's connection. A real perspective_server.py (embedded, producer
running) gets thousands of malformed frames, text and binary, each on a
fresh socket or several on one, plus frames larger than any request may be,
while a well-behaved page follows the feed on another socket. (History's
Perspective protocol has its own fuzz test, tests/test_history_fuzz.py.)
"""

from __future__ import annotations

import asyncio
import os
import random
import urllib.request

import tornado.httpclient
import tornado.websocket

from servers import follow_feed, rss_bytes

FRAMES = int(os.environ.get("FUZZ_FRAMES", 3_000))
OVERSIZED = 12  # each one makes Tornado close that socket (message too big)


def malformed_frames(count: int, seed: int = 11) -> list[bytes | str]:
    rng = random.Random(seed)
    frames: list[bytes | str] = []
    while len(frames) < count:
        kind = len(frames) % 4
        if kind == 0:  # random bytes
            frames.append(rng.randbytes(rng.randint(1, 300)))
        elif kind == 1:  # what a Perspective client would send, had it the old protocol
            frames.append(b"\x08" + rng.randbytes(rng.randint(0, 40)))
        elif kind == 2:  # text: JSON, or anything
            frames.append(rng.choice(['{"sequence": 0}', "resend", "", "\x00" * rng.randint(1, 50)]))
        else:  # lengths and varints that lie
            frames.append(rng.choice([b"\xff" * rng.randint(1, 40), b"\x12\xff\xff\xff\xff\x0f",
                                      b"\x42\x7f" + rng.randbytes(3)]))
    return frames


async def fuzzer(port: int):
    """A raw websocket on /feed; returns it and a future that resolves when the server closes it."""
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/feed",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    closed = asyncio.get_running_loop().create_future()

    def on_message(message):
        # The hello and snapshot are thrown away.
        if message is None and not closed.done():
            closed.set_result(True)

    return await tornado.websocket.websocket_connect(request, on_message_callback=on_message), closed


async def send_and_wait_closed(port: int, frames) -> None:
    attacker, closed = await fuzzer(port)
    for frame in frames:
        try:
            await attacker.write_message(frame, binary=isinstance(frame, bytes))
        except tornado.websocket.WebSocketClosedError:
            break  # the server hung up after the first frame, as it should
    await asyncio.wait_for(closed, timeout=10)


def test_malformed_frames_leave_the_server_up_bounded_and_serving(start_server):
    server = start_server()
    frames = malformed_frames(FRAMES)

    async def scenario():
        page, follower = await follow_feed(server.port)
        for start in range(0, 200, 4):  # warm-up: whatever the first connections allocate
            await send_and_wait_closed(server.port, frames[start:start + 4])
        await asyncio.sleep(1)
        rss_before = rss_bytes(server.proc.pid)
        batches_before = page.sequence
        closed_by_server = 0
        for start in range(200, len(frames), 4):  # four frames a socket: the first one closes it
            await send_and_wait_closed(server.port, frames[start:start + 4])
            closed_by_server += 1
        for _ in range(OVERSIZED):
            await send_and_wait_closed(server.port, [b"\x00" * (2 << 20)])
            closed_by_server += 1
        await asyncio.sleep(1)
        rss_after = rss_bytes(server.proc.pid)
        batches_during = page.sequence - batches_before

        mark = page.sequence  # the page is still served, after all of it
        for _ in range(100):
            if page.sequence > mark:
                break
            await asyncio.sleep(0.1)
        size = page.table.size()
        page.close()
        follower.cancel()
        return rss_before, rss_after, batches_during, page.sequence - mark, size, closed_by_server

    rss_before, rss_after, during, after, size, closed = asyncio.run(scenario())
    print(f"\nfuzzed {FRAMES + OVERSIZED:,} frames on {closed:,} sockets; server RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB; page batches during fuzz {during}, after {after}")
    assert server.proc.poll() is None, server.log()
    with urllib.request.urlopen(server.url, timeout=5) as response:
        assert response.status == 200
    assert during > 0 and after > 0, "the page stopped receiving batches"
    assert size > 0
    # 700 connections, each with its snapshot: a leak per connection would show.
    assert rss_after - rss_before < 40 * 2**20, (rss_before, rss_after)
    log = server.log()
    assert "Traceback" not in log
    assert "Task exception was never retrieved" not in log
