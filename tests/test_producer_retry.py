"""A batch retried after a lost reply is stored once; two batches, twice.

The worst failure for an at-least-once producer is not "ClickHouse is down"
but "ClickHouse stored the batch and the reply never arrived": the producer
cannot tell the two apart, so it sends the batch again, and ClickHouse must
drop the second copy.

Here that failure really happens: the producer talks to the chDB harness
(tests/chdb_http.py, a real engine) through a small TCP relay that passes
the first INSERT on, waits until the harness answers (so the insert has
committed), then hangs up instead of passing the answer back.

Two things drop a repeated block in a MergeTree with a deduplication
window: the block's content hash, and, when given, the producer's
insert_deduplication_token, which replaces the hash. An identical retry is
dropped either way, so the first test holds even without the token. The
token is what makes "the same batch" mean the producer's batch, not equal
content: the second test sends two batches whose rows happen to be equal
and needs both stored; without the token, the hash drops the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

import clickhouse_connect
import pytest

import chdb_http
import connection
import producer

TABLE = "retried"
ROWS = 50


class ReplyCutter:
    """A TCP relay to `upstream` that drops the reply to the first INSERT
    it sees, closing the client's connection after the upstream answered."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.cut = threading.Event()
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ReplyCutter":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._thread.join(10)

    async def _shutdown(self):
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        self._loop.call_soon(self._loop.stop)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _relay(self, client_reader, client_writer):
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        insert_sent = asyncio.Event()

        async def requests():
            while data := await client_reader.read(65536):
                if not self.cut.is_set() and b"INSERT" in data:
                    insert_sent.set()
                upstream_writer.write(data)
                await upstream_writer.drain()

        async def replies():
            while data := await upstream_reader.read(65536):
                if insert_sent.is_set() and not self.cut.is_set():
                    # The harness answers only after the insert committed.
                    self.cut.set()
                    break
                client_writer.write(data)
                await client_writer.drain()

        forward = asyncio.ensure_future(requests())
        try:
            await replies()
        finally:
            forward.cancel()
            for writer in (client_writer, upstream_writer):
                with contextlib.suppress(Exception):
                    writer.close()


@pytest.fixture
def harness(tmp_path):
    with chdb_http.running(tmp_path / "chdb") as running:
        yield running


def test_a_batch_whose_reply_was_lost_is_stored_once(harness):
    admin = harness.client(autogenerate_session_id=False)
    producer.create_table(admin, TABLE)
    with ReplyCutter(harness.port) as cutter:
        client = clickhouse_connect.get_client(host="127.0.0.1", port=cutter.port, username=harness.user,
                                               password=harness.password, autogenerate_session_id=False)
        worker = producer.Producer(client, producer.ProducerSettings(batch_size=ROWS, table=TABLE))
        worker.make_batch()
        with pytest.raises(Exception) as failure:
            worker.flush()
        assert connection.is_transient(failure.value), failure.value
        assert cutter.cut.is_set()
        # The reply was lost after the insert committed: ClickHouse has the batch,
        # and the producer still holds it, as it must.
        assert admin.command(f"SELECT count() FROM {TABLE}") == ROWS
        assert worker.pending_rows == ROWS

        worker.flush()  # the retry: the same batch, the same token

        assert worker.pending_rows == 0
        client.close()
    assert admin.command(f"SELECT count() FROM {TABLE}") == ROWS, "the retried batch was stored twice"
    assert admin.command(f"SELECT uniqExact(id) FROM {TABLE}") == ROWS


def test_two_batches_with_equal_rows_are_both_stored(harness):
    admin = harness.client(autogenerate_session_id=False)
    producer.create_table(admin, TABLE)
    client = harness.client(autogenerate_session_id=False)
    worker = producer.Producer(client, producer.ProducerSettings(batch_size=ROWS, table=TABLE))
    rows = producer.Market(seed=3).batch(ROWS, now_ms=1_700_000_000_000)
    worker.pending.extend([producer.Batch(rows, uuid.uuid4().hex), producer.Batch(rows, uuid.uuid4().hex)])

    worker.flush()

    assert worker.inserted_batches == 2
    assert admin.command(f"SELECT count() FROM {TABLE}") == 2 * ROWS, \
        "a batch was dropped as a duplicate of another batch with equal rows"
