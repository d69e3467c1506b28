"""The pipeline on a real ClickHouse engine: producer -> table -> tail -> Perspective.

No mocks: the engine is chDB (or the server named by CLICKHOUSE_URL) and the
Perspective table is perspective-python's own.
"""

from __future__ import annotations

import random
import threading
import time

import perspective
import pyarrow as pa
import pytest

import producer
from perspective_server import Sync, to_ipc
from tailer import Tail

ROWS_PER_BATCH = 50


def make_producer(client, seed=None, batch_size=ROWS_PER_BATCH):
    producer.create_table(client)
    return producer.Producer(client, producer.ProducerSettings(batch_size=batch_size, seed=seed))


def perspective_table(tail: Tail, limit: int = 1_000_000):
    return perspective.Server().new_local_client().table(to_ipc(tail.empty()), limit=limit)


def make_sync(client, overlap=3.0, key="id", limit=1_000_000, check_every=0.0, clock=time.monotonic) -> Sync:
    tail = Tail(client, "stock_values", "inserted_at", key, overlap, check_every=check_every, clock=clock)
    tail.describe()
    return Sync(tail, perspective_table(tail, limit))


def ids_in_perspective(table) -> list[str]:
    return table.view(columns=["id"]).to_columns()["id"]


def ids_in_clickhouse(client) -> list[str]:
    return [str(row[0]) for row in client.query("SELECT id FROM stock_values").result_rows]


def test_producer_creates_the_table_and_inserts_batches(new_client):
    client = new_client()
    worker = make_producer(client, seed=7)
    for _ in range(3):
        worker.make_batch()
    worker.flush()

    assert client.command("SELECT count() FROM stock_values") == 3 * ROWS_PER_BATCH
    types = dict(client.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                              "AND table = 'stock_values'").result_rows)
    assert types["timestamp"] == "DateTime64(3, 'UTC')"
    assert types["inserted_at"].startswith("DateTime64(6")
    assert {"ticker", "client", "open", "high", "low", "close", "volume", "date", "id"} <= set(types)
    broken = client.command("SELECT count() FROM stock_values WHERE NOT (low <= least(open, close) "
                            "AND greatest(open, close) <= high)")
    assert broken == 0


def test_event_time_is_stored_as_utc(new_client):
    client = new_client()
    worker = make_producer(client)
    now_ms = 1_780_000_000_123  # 2026-05-28T20:26:40.123Z
    worker.pending.append(producer.Batch(worker.market.batch(3, now_ms), "t1"))
    worker.flush()
    stored = client.command("SELECT toUnixTimestamp64Milli(min(timestamp)) FROM stock_values")
    assert int(stored) == now_ms
    assert client.command("SELECT toString(any(date)) FROM stock_values") == "2026-05-28"


def test_a_retried_batch_is_stored_once(new_client):
    """The producer resends a batch after an ambiguous failure with the same token."""
    client = new_client()
    worker = make_producer(client)
    worker.make_batch()
    batch = worker.pending[0]
    worker.flush()
    worker.pending.append(batch)  # as if the first insert's reply had been lost
    worker.flush()
    assert client.command("SELECT count() FROM stock_values") == ROWS_PER_BATCH


def test_server_backfills_then_tails_new_rows(new_client):
    client = new_client()
    worker = make_producer(client)
    for _ in range(4):
        worker.make_batch()
    worker.flush()

    sync = make_sync(new_client())
    assert sync.backfill(limit=10_000) == 4 * ROWS_PER_BATCH
    assert sync.table.size() == 4 * ROWS_PER_BATCH

    worker.make_batch()
    worker.flush()
    assert sync.poll() == ROWS_PER_BATCH
    assert sync.poll() == 0, "a second poll with nothing new must deliver nothing"
    assert sorted(ids_in_perspective(sync.table)) == sorted(ids_in_clickhouse(client))


def test_backfill_takes_only_the_newest_rows(new_client):
    client = new_client()
    worker = make_producer(client)
    for _ in range(3):
        worker.make_batch()
        worker.flush()
    sync = make_sync(new_client(), limit=ROWS_PER_BATCH)
    assert sync.backfill(limit=ROWS_PER_BATCH) == ROWS_PER_BATCH
    newest = client.query(f"SELECT toString(id) FROM stock_values ORDER BY inserted_at DESC "
                          f"LIMIT {ROWS_PER_BATCH}").result_rows
    assert sorted(ids_in_perspective(sync.table)) == sorted(row[0] for row in newest)


def insert_with_cursor(client, rows: pa.Table, inserted_at_us: int) -> None:
    """Inserts rows whose cursor is set by hand: a commit that arrives late."""
    stamped = rows.append_column(
        "inserted_at", pa.array([inserted_at_us] * rows.num_rows, pa.timestamp("us", tz="UTC")))
    client.insert_arrow("stock_values", stamped)


@pytest.mark.parametrize("check_every", [0.0, 0.2], ids=["check every poll", "check every 0.2 s"])
def test_exactly_once_with_concurrent_producers_and_late_commits(new_client, check_every):
    """Two producers insert at once while the server polls; a batch commits late.

    Afterwards every ClickHouse row is in the Perspective table exactly once.
    """
    setup = new_client()
    producer.create_table(setup)
    sync = make_sync(new_client(), overlap=3.0, check_every=check_every)
    stop = threading.Event()
    polls = []

    def run_producer(seed):
        worker = producer.Producer(new_client(), producer.ProducerSettings(batch_size=37, seed=seed))
        for _ in range(40):
            worker.make_batch()
            worker.flush()
            time.sleep(0.005)

    def run_server():
        while not stop.is_set():
            polls.append(sync.poll())

    server = threading.Thread(target=run_server)
    producers = [threading.Thread(target=run_producer, args=(seed,)) for seed in (1, 2)]
    server.start()
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()

    # A batch that commits late: its cursor is a second older than rows the
    # server has already delivered, which is inside the 3 s overlap.
    while sync.tail.cursor.watermark is None:
        time.sleep(0.01)
    late = producer.Market(seed=3).batch(25, time.time_ns() // 1_000_000)
    insert_with_cursor(new_client(), late, sync.tail.cursor.watermark - 1_000_000)
    time.sleep(0.3)
    stop.set()
    server.join()
    time.sleep(check_every)  # so that the last poll checks the window
    sync.poll()

    in_clickhouse = ids_in_clickhouse(setup)
    in_perspective = ids_in_perspective(sync.table)
    assert len(in_clickhouse) == 2 * 40 * 37 + 25
    assert len(in_perspective) == len(set(in_perspective)), "a row was delivered twice"
    assert set(in_perspective) == set(in_clickhouse), "a row was lost"
    assert sum(polls) > 0 and len(polls) > 1, "the server must have polled while producers ran"


def test_between_checks_polls_fetch_new_rows_and_a_late_row_waits_for_the_next_check(new_client):
    """--check-every 1: the window is checked once a second, not every poll.
    A row that commits 2.9 s late, while the watermark moves on by 1 s before
    the next check, is still found: the window is widened by the period."""
    now = [0.0]  # the Tail's clock, moved by hand
    client = new_client()
    worker = make_producer(client)
    worker.make_batch()
    worker.flush()
    sync = make_sync(new_client(), overlap=3.0, check_every=1.0, clock=lambda: now[0])
    sync.backfill(limit=10_000)
    assert sync.poll() == 0 and sync.tail.window_checks == 1

    watermark = sync.tail.cursor.watermark
    late = producer.Market(seed=10).batch(10, time.time_ns() // 1_000_000)
    insert_with_cursor(client, late, watermark - 2_900_000)
    ahead = producer.Market(seed=11).batch(20, time.time_ns() // 1_000_000)
    insert_with_cursor(client, ahead, watermark + 1_000_000)
    now[0] = 0.5
    assert sync.poll() == 20, "rows past the watermark arrive at once, between checks too"
    assert sync.tail.window_checks == 1 and sync.tail.window_rereads == 0
    now[0] = 1.0
    assert sync.poll() == 10, "the check a second later finds the late rows"
    assert sync.tail.window_checks == 2 and sync.tail.window_rereads == 1
    now[0] = 2.0
    assert sync.poll() == 0
    shown = ids_in_perspective(sync.table)
    assert len(shown) == len(set(shown)) == ROWS_PER_BATCH + 30


class FaultyClient:
    """A real client whose queries can be made to fail, as during an outage.

    `checks_fail` fails only `query()`, which the window check uses (the rows
    come with `query_arrow()`); `down` fails both.
    """

    def __init__(self, client):
        self.client, self.checks_fail, self.down = client, False, False

    def query(self, *args, **kwargs):
        if self.checks_fail or self.down:
            raise ConnectionRefusedError("ClickHouse is down")
        return self.client.query(*args, **kwargs)

    def query_arrow(self, *args, **kwargs):
        if self.down:
            raise ConnectionRefusedError("ClickHouse is down")
        return self.client.query_arrow(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def checked_once_a_second(new_client):
    """(writer client, Sync checking every 1 s on a hand-moved clock, its FaultyClient, the clock)
    after one batch, its backfill and a first poll that checked the window."""
    now = [0.0]
    client = new_client()
    worker = make_producer(client)
    worker.make_batch()
    worker.flush()
    faulty = FaultyClient(new_client())
    tail = Tail(faulty, "stock_values", "inserted_at", "id", 3.0, check_every=1.0, clock=lambda: now[0])
    tail.describe()
    sync = Sync(tail, perspective_table(tail))
    sync.backfill(limit=10_000)
    assert sync.poll() == 0 and tail.window_checks == 1
    return client, sync, faulty, now


def late_and_ahead(client, watermark: int, ahead_by_s: float) -> None:
    """10 rows committing 2.9 s late (inside the 3 s overlap), then 20 rows
    that move the watermark on by `ahead_by_s`."""
    now_ms = time.time_ns() // 1_000_000
    insert_with_cursor(client, producer.Market(seed=12).batch(10, now_ms), watermark - 2_900_000)
    insert_with_cursor(client, producer.Market(seed=13).batch(20, now_ms), watermark + int(ahead_by_s * 1e6))


def assert_shown_once(sync: Sync, client) -> None:
    shown = ids_in_perspective(sync.table)
    assert len(shown) == len(set(shown)), "a row was delivered twice"
    assert set(shown) == set(ids_in_clickhouse(client)), "a row was lost"


def test_a_failed_check_is_not_nothing_changed_and_is_tried_again_at_the_next_poll(new_client):
    """Only the check fails (the reads would work): the poll fails, as a poll
    must not read past the watermark on an unanswered check, and the next
    poll checks again instead of waiting another second."""
    client, sync, faulty, now = checked_once_a_second(new_client)
    late_and_ahead(client, sync.tail.cursor.watermark, ahead_by_s=1.5)
    now[0] = 1.0
    faulty.checks_fail = True
    with pytest.raises(ConnectionRefusedError):
        sync.poll()
    faulty.checks_fail = False
    now[0] = 1.1
    assert sync.poll() == 30
    assert sync.tail.window_rereads == 1
    assert_shown_once(sync, client)


def test_a_check_delayed_by_a_long_poll_still_finds_a_late_row(new_client):
    """The watermark moves on by 2 s between two checks (a slow poll put the
    second one off): the late row, 2.9 s older than the first check's
    watermark, is older than the new watermark minus overlap and check period,
    but still inside the window anchored at the last good check."""
    client, sync, faulty, now = checked_once_a_second(new_client)
    watermark = sync.tail.cursor.watermark
    late_and_ahead(client, watermark, ahead_by_s=2.0)
    now[0] = 0.5
    assert sync.poll() == 20, "between checks, only rows past the watermark"
    assert sync.tail.cursor.lower_bound == watermark - 3_000_000, "the window still starts at the last check"
    now[0] = 2.5
    assert sync.poll() == 10
    assert_shown_once(sync, client)


def test_two_checks_missed_in_a_row_then_the_first_good_one_catches_up(new_client):
    """ClickHouse is down through two check periods, with late rows committed
    just before. The first check once it is back finds them, and the keys
    kept afterwards cover only the window the next check compares."""
    client, sync, faulty, now = checked_once_a_second(new_client)
    watermark = sync.tail.cursor.watermark
    late_and_ahead(client, watermark, ahead_by_s=2.5)
    faulty.down = True
    for now[0] in (1.0, 1.5, 2.0):
        with pytest.raises(ConnectionRefusedError):
            sync.poll()
    faulty.down = False
    now[0] = 2.1
    assert sync.poll() == 30
    # Every poll during the outage tried the check again (1 + 3 + 1).
    assert sync.tail.window_checks == 5 and sync.tail.window_rereads == 1
    now[0] = 3.2
    assert sync.poll() == 0
    cursor = sync.tail.cursor
    assert cursor.lower_bound == watermark + 2_500_000 - 3_000_000
    kept = cursor.delivered.column("__cursor").to_pylist()
    assert kept and min(kept) >= cursor.lower_bound, "keys below the window are forgotten"
    assert_shown_once(sync, client)


def test_a_commit_later_than_the_overlap_is_not_delivered(new_client):
    """The documented limit: the overlap bounds how late a commit may be."""
    client = new_client()
    worker = make_producer(client)
    worker.make_batch()
    worker.flush()
    sync = make_sync(new_client(), overlap=1.0)
    sync.backfill(limit=10_000)
    too_late = producer.Market(seed=4).batch(5, time.time_ns() // 1_000_000)
    insert_with_cursor(client, too_late, sync.tail.cursor.watermark - 5_000_000)
    assert sync.poll() == 0
    assert sync.table.size() == ROWS_PER_BATCH


def test_a_table_without_a_key_is_deduplicated_by_whole_row(new_client):
    """--key '' on a user's own table: re-reads of the overlap still add nothing."""
    client = new_client()
    client.command("CREATE TABLE trades (ts DateTime64(6) DEFAULT now64(6), sym String, px Float64) "
                   "ENGINE = MergeTree ORDER BY ts")
    client.insert("trades", [["A", 1.0], ["B", 2.0]], column_names=["sym", "px"])
    tail = Tail(client, "trades", "ts", None, overlap_seconds=60)
    tail.describe()
    sync = Sync(tail, perspective_table(tail))
    assert sync.backfill(limit=100) == 2
    client.insert("trades", [["C", 3.0]], column_names=["sym", "px"])
    assert sync.poll() == 1
    assert sync.poll() == 0
    assert sorted(sync.table.view().to_columns()["sym"]) == ["A", "B", "C"]


ALL_TYPES = {
    "i8": ("Int8", "-8", "integer", -8),
    "i16": ("Int16", "-16", "integer", -16),
    "i32": ("Int32", "-32", "integer", -32),
    "i64": ("Int64", "-5000000000", "integer", -5_000_000_000),
    "u8": ("UInt8", "8", "integer", 8),
    "u16": ("UInt16", "16", "integer", 16),
    "u32": ("UInt32", "4000000000", "integer", 4_000_000_000),
    "u64": ("UInt64", "64", "integer", 64),
    "f32": ("Float32", "1.5", "float", 1.5),
    "f64": ("Float64", "2.25", "float", 2.25),
    "dec": ("Decimal(18, 4)", "12.3456", "float", 12.3456),
    "flag": ("Bool", "true", "boolean", True),
    "s": ("String", "'hello'", "string", "hello"),
    "fs": ("FixedString(8)", "'ab'", "string", "ab"),
    "e8": ("Enum8('buy' = 1, 'sell' = 2)", "'sell'", "string", "sell"),
    "e16": ("Enum16('x' = 1000)", "'x'", "string", "x"),
    "u": ("UUID", "'00000000-0000-0000-0000-000000000001'", "string",
          "00000000-0000-0000-0000-000000000001"),
    "d": ("Date", "'2024-02-29'", "date", None),
    "d32": ("Date32", "'1960-01-01'", "date", None),
    "dt": ("DateTime('UTC')", "'2024-02-29 12:00:00'", "datetime", None),
    "dt64": ("DateTime64(3, 'UTC')", "'2024-02-29 12:00:00.250'", "datetime", None),
    "n": ("Nullable(Int32)", "NULL", "integer", None),
    "lc": ("LowCardinality(String)", "'low'", "string", "low"),
    "lcn": ("LowCardinality(Nullable(String))", "'maybe'", "string", "maybe"),
    "arr": ("Array(Int32)", "[1, 2]", None, None),
}


def test_every_common_type_reaches_perspective(new_client, caplog):
    client = new_client()
    columns = ", ".join(f"{name} {spec[0]}" for name, spec in ALL_TYPES.items())
    client.command(f"CREATE TABLE typed (inserted_at DateTime64(6) DEFAULT now64(6), {columns}) "
                   "ENGINE = MergeTree ORDER BY inserted_at")
    client.command(f"INSERT INTO typed ({', '.join(ALL_TYPES)}) VALUES "
                   f"({', '.join(spec[1] for spec in ALL_TYPES.values())})")
    tail = Tail(client, "typed", "inserted_at", None, overlap_seconds=3)
    tail.describe()
    assert tail.skipped == [("arr", "Array(Int32)")]
    schema = tail.perspective_schema
    for name, (_, _, expected_type, _) in ALL_TYPES.items():
        if expected_type is not None:
            assert schema[name] == expected_type, name

    sync = Sync(tail, perspective_table(tail))
    assert sync.table.schema() == {name: kind for name, kind in schema.items()}
    assert sync.backfill(limit=10) == 1
    row = sync.table.view().to_records()[0]
    for name, (_, _, _, expected_value) in ALL_TYPES.items():
        if expected_value is not None:
            assert row[name] == pytest.approx(expected_value), name
    assert row["n"] is None
    # Perspective returns dates and datetimes as UTC milliseconds.
    assert row["d"] == 1_709_164_800_000
    assert row["d32"] == -315_619_200_000
    assert row["dt"] == 1_709_208_000_000
    assert row["dt64"] == 1_709_208_000_250


def test_a_poll_reads_the_new_rows_not_the_history(new_client):
    """The cursor leads the sort key, so a poll is a range scan: with 200,000
    rows of history and a 20,000-row read limit, only an index read passes."""
    client = new_client()
    producer.create_table(client)
    history = producer.Market(seed=5).batch(200_000, 1_700_000_000_000)
    insert_with_cursor(client, history, 1_700_000_000_000_000)  # long ago
    client.command("OPTIMIZE TABLE stock_values FINAL")
    sync = make_sync(client)
    worker = make_producer(new_client())
    worker.make_batch()
    worker.flush()
    caught_up = int(time.time() * 1_000_000) - 10_000_000  # caught up, and checked, 10 s ago
    sync.tail.cursor.watermark = sync.tail.cursor.checked_up_to = caught_up
    client.set_client_setting("max_rows_to_read", 20_000)
    assert sync.poll() == ROWS_PER_BATCH


def test_a_burst_larger_than_the_limit_is_handed_over_exactly_once(new_client):
    """More rows share one cursor value (a burst) than --limit: the backfill
    takes --limit of them and the first polls deliver none of the rest."""
    client = new_client()
    producer.create_table(client)
    burst = producer.Market(seed=6).batch(5_000, time.time_ns() // 1_000_000)
    insert_with_cursor(client, burst, time.time_ns() // 1000)
    sync = make_sync(new_client(), limit=1_000)
    assert sync.backfill(limit=1_000) == 1_000
    assert [sync.poll() for _ in range(3)] == [0, 0, 0]
    assert sync.tail.rows_returned == 0, "a poll fetched the burst again"

    worker = make_producer(new_client())
    worker.make_batch()
    worker.flush()
    assert sync.poll() == ROWS_PER_BATCH
    shown = ids_in_perspective(sync.table)
    assert len(shown) == len(set(shown)) == 1_000  # the rolling limit kept the newest


def test_a_key_stored_twice_in_different_backfill_chunks_is_shown_once(new_client):
    """A retried insert can store a row twice with two cursors. When the
    copies land in different chunks of the backfill, the later copy is
    dropped, and the first poll does not fetch either again."""
    client = new_client()
    producer.create_table(client)
    now_us = time.time_ns() // 1000
    rows = producer.Market(seed=8).batch(1_000, now_us // 1000)
    for batch in range(10):  # ten inserts, a millisecond apart
        insert_with_cursor(client, rows.slice(100 * batch, 100), now_us - 1_000_000 + 1_000 * batch)
    insert_with_cursor(client, rows.slice(0, 100), now_us)  # the first one retried, a second later
    sync = make_sync(new_client())
    chunks = list(sync.tail.backfill(10_000, chunk_rows=300))
    assert len(chunks) == 4, "the backfill did not come in pages of about 300 rows"
    assert sum(chunk.num_rows for chunk in chunks) == 1_000
    for chunk in chunks:
        sync.push(chunk)
    shown = ids_in_perspective(sync.table)
    assert sorted(shown) == sorted(str(key) for key in rows.column("id").to_pylist())
    assert [sync.poll() for _ in range(3)] == [0, 0, 0]
    assert sync.tail.rows_returned == 0 and sync.tail.window_rereads == 0


def test_a_paged_backfill_takes_exactly_the_newest_limit_rows(new_client):
    """Above chunk_rows the backfill reads in pages by cursor range; the
    oldest page takes only what the limit leaves room for, even when its
    cursor value is shared by more rows, and the first polls add nothing."""
    client = new_client()
    producer.create_table(client)
    now_us = time.time_ns() // 1000
    rows = producer.Market(seed=9).batch(1_000, now_us // 1000)
    for batch in range(10):
        insert_with_cursor(client, rows.slice(100 * batch, 100), now_us - 1_000_000 + 1_000 * batch)
    sync = make_sync(new_client(), limit=250)
    pages = list(sync.tail.backfill(250, chunk_rows=100))
    assert [page.num_rows for page in pages] == [50, 100, 100]
    for page in pages:
        sync.push(page)
    shown = ids_in_perspective(sync.table)
    newest_two = {str(key) for key in rows.column("id").to_pylist()[800:]}
    assert len(shown) == len(set(shown)) == 250
    assert newest_two <= set(shown) <= {str(key) for key in rows.column("id").to_pylist()[700:]}
    assert [sync.poll() for _ in range(3)] == [0, 0, 0]
    assert sync.tail.rows_returned == 0

    worker = make_producer(new_client())
    worker.make_batch()
    worker.flush()
    assert sync.poll() == ROWS_PER_BATCH


def test_a_poll_fetches_only_new_rows_when_nothing_committed_late(new_client):
    """The overlap is checked with one aggregate row; its rows are fetched
    again only when that check finds a late commit."""
    worker = make_producer(new_client())
    sync = make_sync(new_client())
    worker.make_batch()
    worker.flush()
    sync.backfill(limit=10_000)
    for _ in range(5):
        worker.make_batch()
        worker.flush()
        assert sync.poll() == ROWS_PER_BATCH
    assert sync.tail.rows_returned == 5 * ROWS_PER_BATCH
    assert sync.tail.window_rereads == 0

    late = producer.Market(seed=7).batch(10, time.time_ns() // 1_000_000)
    insert_with_cursor(new_client(), late, sync.tail.cursor.watermark - 1_000_000)
    assert sync.poll() == 10
    assert sync.tail.window_rereads == 1


def test_the_server_table_keeps_only_the_newest_limit_rows(new_client):
    """--limit reaches both the backfill and the Perspective table the
    server creates (start_sync), so the browser never holds more."""
    import asyncio

    import perspective

    from perspective_server import ServerSettings, start_sync

    worker = make_producer(new_client())
    for _ in range(4):
        worker.make_batch()
    worker.flush()
    tail = Tail(new_client(), "stock_values", "inserted_at", "id", 3.0)
    tail.describe()

    async def start():
        loop = asyncio.get_running_loop()
        return await start_sync(tail, perspective.Server(), ServerSettings(limit=120, show_key=True),
                                lambda function, *args: loop.run_in_executor(None, function, *args))

    sync = asyncio.run(start())
    assert sync.table.size() == 120
    worker.make_batch()
    newest = set(worker.pending[0].rows.column("id").to_pylist())
    worker.flush()
    assert sync.poll() == ROWS_PER_BATCH
    assert sync.table.size() == 120
    assert newest <= set(ids_in_perspective(sync.table)), "the newest rows must replace the oldest"


def insert_in_shuffled_order(client, rows: pa.Table, cursors_us: list[int]) -> None:
    """Inserts rows with their own cursors, in an order other than the cursors'."""
    stamped = rows.append_column("inserted_at", pa.array(cursors_us, pa.timestamp("us", tz="UTC")))
    order = list(range(stamped.num_rows))
    random.Random(1).shuffle(order)
    client.insert_arrow("stock_values", stamped.take(order))


def test_rows_reach_perspective_in_cursor_order(new_client):
    """Perspective's --limit table drops the rows it was given first. So the
    backfill and every poll must hand rows over oldest cursor first: a
    reversed batch would make the table evict newer rows and keep older
    ones. A key stored twice keeps its first copy, by cursor."""
    client = new_client()
    producer.create_table(client)
    start = (time.time_ns() // 1000) - 10_000_000
    history = producer.Market(seed=20).batch(100, start // 1000)
    insert_in_shuffled_order(client, history, [start + i * 1_000 for i in range(100)])
    sync = make_sync(new_client(), limit=30)
    assert sync.backfill(limit=30) == 30
    newest_history = history.column("id").to_pylist()[70:]
    assert set(ids_in_perspective(sync.table)) == set(newest_history)
    # Ten new rows evict the ten oldest of the backfill, not its newest.
    ten = producer.Market(seed=22).batch(10, start // 1000)
    insert_in_shuffled_order(client, ten, [start + 500_000 + i * 1_000 for i in range(10)])
    assert sync.poll() == 10
    assert set(ids_in_perspective(sync.table)) == set(newest_history[10:] + ten.column("id").to_pylist())

    # One poll with more rows than --limit, among them a key stored twice:
    # first with price 1, a millisecond later with price 2.
    batch = producer.Market(seed=21).batch(40, start // 1000)
    twice = batch.slice(5, 1).set_column(batch.schema.get_field_index("close"), "close", pa.array([2.0]))
    batch = batch.set_column(batch.schema.get_field_index("close"), "close",
                             pa.array([1.0 if i == 5 else v for i, v in enumerate(batch.column("close").to_pylist())]))
    first_cursor = start + 1_000_000
    insert_in_shuffled_order(client, pa.concat_tables([batch, twice]),
                             [first_cursor + i * 1_000 for i in range(40)] + [first_cursor + 5_500])
    assert sync.poll() == 40
    shown = sync.table.view(columns=["id", "close"]).to_columns()
    assert sorted(shown["id"]) == sorted(batch.column("id").to_pylist()[10:]), "the oldest rows are evicted"

    # The same with a limit large enough to keep the twice-stored key.
    client.command("TRUNCATE TABLE stock_values")
    sync = make_sync(new_client(), limit=100)
    insert_in_shuffled_order(client, pa.concat_tables([batch, twice]),
                             [first_cursor + i * 1_000 for i in range(40)] + [first_cursor + 5_500])
    assert sync.poll() == 40
    shown = sync.table.view(columns=["id", "close"]).to_columns()
    prices = dict(zip(shown["id"], shown["close"]))
    assert prices[batch.column("id")[5].as_py()] == 1.0, "the first copy, by cursor, is the one kept"


def test_polls_run_off_the_event_loop(new_client):
    """sync_forever hands every poll to the executor it is given, so a slow
    ClickHouse never freezes the websocket."""
    import asyncio
    import threading as threads
    from concurrent.futures import ThreadPoolExecutor

    from perspective_server import ServerSettings, sync_forever

    worker = make_producer(new_client())
    worker.make_batch()
    worker.flush()
    sync = make_sync(new_client())
    polled_on = []
    real_poll = sync.tail.poll

    def watched_poll():
        polled_on.append(threads.current_thread())
        return real_poll()

    sync.tail.poll = watched_poll

    async def run_briefly():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        executor = ThreadPoolExecutor(max_workers=1)
        loop.call_later(0.5, stop.set)
        await sync_forever(sync, ServerSettings(interval=0.05), lambda f, *a: loop.run_in_executor(executor, f, *a),
                           stop)
        executor.shutdown()
        return threads.current_thread()

    loop_thread = asyncio.run(run_briefly())
    assert polled_on, "sync_forever never polled"
    assert loop_thread not in polled_on
