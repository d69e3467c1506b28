"""What producer.py promises about the rows it makes and the batches it keeps.

Market is pure (no clock, no I/O), so its rows are checked directly. The
Producer's queue is checked against a fake client that only implements
insert_arrow(): this is about keeping and retrying batches, not about
ClickHouse.
"""

import logging
import uuid
from datetime import date, datetime, timedelta, timezone

import pyarrow as pa
import pytest

import connection
import producer
from producer import CLIENTS, TICKERS, Batch, Market, Producer, ProducerSettings

NOW_MS = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def rows_of(*batches: pa.Table) -> list[dict]:
    return [row for batch in batches for row in batch.to_pylist()]


# --- Market: every row looks like a trade -----------------------------------


@pytest.fixture(scope="module")
def big_batch() -> pa.Table:
    return Market(seed=7).batch(5_000, NOW_MS)


def test_batch_has_the_requested_number_of_rows_and_the_table_columns():
    batch = Market(seed=1).batch(25, NOW_MS)
    assert batch.num_rows == 25
    assert batch.column_names == ["id", "timestamp", "ticker", "client", "open", "high", "low",
                                  "close", "volume", "date"]


def test_low_and_high_bracket_open_and_close(big_batch):
    for row in big_batch.to_pylist():
        assert row["low"] <= row["open"] <= row["high"], row
        assert row["low"] <= row["close"] <= row["high"], row


def test_all_prices_are_positive(big_batch):
    for name in ("open", "high", "low", "close"):
        assert min(big_batch.column(name).to_pylist()) > 0, name


def test_volume_is_positive(big_batch):
    assert min(big_batch.column("volume").to_pylist()) > 0


def test_tickers_and_clients_come_only_from_the_published_lists(big_batch):
    assert set(big_batch.column("ticker").to_pylist()) <= set(TICKERS)
    assert set(big_batch.column("client").to_pylist()) <= set(CLIENTS)


def test_ids_are_unique_uuid_strings(big_batch):
    ids = big_batch.column("id").to_pylist()
    assert all(str(uuid.UUID(value)) == value for value in ids)
    assert len(set(ids)) == len(ids)


def test_ids_stay_unique_across_batches():
    market = Market(seed=3)
    ids = [row["id"] for row in rows_of(*(market.batch(200, NOW_MS) for _ in range(5)))]
    assert len(set(ids)) == len(ids)


# --- Market: each ticker's price is one continuous random walk --------------


def assert_each_ticker_walks_continuously(rows: list[dict]) -> None:
    last_close: dict[str, float] = {}
    for row in rows:
        ticker = row["ticker"]
        if ticker in last_close:
            assert row["open"] == last_close[ticker], f"{ticker} jumped from {last_close[ticker]} to {row['open']}"
        last_close[ticker] = row["close"]


def test_each_trade_opens_at_its_tickers_previous_close_within_a_batch(big_batch):
    assert_each_ticker_walks_continuously(big_batch.to_pylist())


def test_each_trade_opens_at_its_tickers_previous_close_across_batches():
    market = Market(seed=11)
    batches = [market.batch(rows, NOW_MS + i * 500) for i, rows in enumerate([1, 3, 50, 2, 400])]
    assert_each_ticker_walks_continuously(rows_of(*batches))


def test_a_ticker_absent_from_a_batch_resumes_where_it_stopped():
    market = Market(seed=5, tickers=("AAPL", "MSFT"))
    rows = rows_of(*(market.batch(1, NOW_MS) for _ in range(200)))
    assert {row["ticker"] for row in rows} == {"AAPL", "MSFT"}
    assert_each_ticker_walks_continuously(rows)


# --- Market: --seed makes the run repeatable --------------------------------


def test_same_seed_gives_identical_batches():
    first, second = Market(seed=42), Market(seed=42)
    for rows in (10, 100, 1):
        assert first.batch(rows, NOW_MS).equals(second.batch(rows, NOW_MS))


def test_different_seeds_give_different_batches():
    first = Market(seed=1).batch(50, NOW_MS)
    second = Market(seed=2).batch(50, NOW_MS)
    assert first.column("id").to_pylist() != second.column("id").to_pylist()
    assert first.column("close").to_pylist() != second.column("close").to_pylist()


# --- Market: time columns ----------------------------------------------------


def test_timestamp_is_utc_milliseconds_equal_to_now_ms():
    batch = Market(seed=1).batch(10, NOW_MS)
    column = batch.column("timestamp")
    assert column.type == pa.timestamp("ms", tz="UTC")
    assert column.cast(pa.int64()).to_pylist() == [NOW_MS] * 10


@pytest.mark.parametrize("moment, expected", [
    (datetime(2024, 3, 9, 23, 59, 59, 999_000, tzinfo=timezone.utc), date(2024, 3, 9)),
    (datetime(2024, 3, 10, 0, 0, 0, tzinfo=timezone.utc), date(2024, 3, 10)),
    (datetime(2024, 3, 10, 0, 0, 0, 1_000, tzinfo=timezone.utc), date(2024, 3, 10)),
    (datetime(1970, 1, 1, tzinfo=timezone.utc), date(1970, 1, 1)),
], ids=["1ms-before-midnight", "midnight", "1ms-after-midnight", "epoch"])
def test_date_is_the_utc_day_of_now_ms(moment, expected):
    batch = Market(seed=1).batch(3, epoch_ms(moment))
    assert batch.column("date").type == pa.date32()
    assert batch.column("date").to_pylist() == [expected] * 3


def test_date_follows_utc_not_the_local_clock():
    # 23:30 UTC is already the next day east of UTC; the row keeps the UTC day.
    late_utc = datetime(2024, 3, 9, 23, 30, tzinfo=timezone.utc)
    assert late_utc.astimezone(timezone(timedelta(hours=9))).date() == date(2024, 3, 10)
    batch = Market(seed=1).batch(1, epoch_ms(late_utc))
    assert batch.column("date").to_pylist() == [date(2024, 3, 9)]


# --- Producer: the queue keeps batches until ClickHouse has them -------------


class FakeClickHouse:
    """Implements only Client.insert_arrow; `down` makes it refuse like a stopped server."""

    def __init__(self, down: bool = False):
        self.down = down
        self.attempts: list[tuple[str, pa.Table, dict]] = []
        self.stored: list[tuple[str, pa.Table, dict]] = []

    def insert_arrow(self, table, rows, settings=None):
        call = (table, rows, dict(settings or {}))
        self.attempts.append(call)
        if self.down:
            raise OSError("Connection refused")
        self.stored.append(call)


def make_producer(client, batch_size=10, max_pending_rows=1_000, table="trades"):
    settings = ProducerSettings(interval=0.5, batch_size=batch_size,
                                max_pending_rows=max_pending_rows, seed=0, table=table)
    return Producer(client, settings, Market(seed=0))


def test_the_fake_outage_counts_as_transient():
    # Producer.run() retries only errors that is_transient() accepts.
    assert connection.is_transient(OSError("Connection refused"))


def test_flush_inserts_every_queued_batch_oldest_first_and_empties_the_queue():
    client = FakeClickHouse()
    worker = make_producer(client)
    for _ in range(3):
        worker.make_batch()
    queued = list(worker.pending)

    worker.flush()

    assert [rows for _, rows, _ in client.stored] == [batch.rows for batch in queued]
    assert {table for table, _, _ in client.stored} == {"trades"}
    assert not worker.pending
    assert (worker.inserted_rows, worker.inserted_batches) == (30, 3)


def test_batches_made_while_clickhouse_is_down_are_kept_in_order():
    client = FakeClickHouse(down=True)
    worker = make_producer(client)
    made: list[Batch] = []
    for _ in range(4):
        worker.make_batch()
        made.append(worker.pending[-1])
        with pytest.raises(OSError) as failure:
            worker.flush()
        assert connection.is_transient(failure.value)

    assert list(worker.pending) == made
    assert worker.pending_rows == 40
    assert client.stored == []
    assert worker.inserted_rows == 0


def test_after_an_outage_flush_inserts_oldest_first_with_the_token_of_the_failed_attempt():
    client = FakeClickHouse(down=True)
    worker = make_producer(client)
    for _ in range(3):
        worker.make_batch()
        with pytest.raises(OSError):
            worker.flush()
    made = list(worker.pending)
    # While down, each flush retried only the oldest batch, with its own token.
    failed_tokens = {settings["insert_deduplication_token"] for _, _, settings in client.attempts}
    assert failed_tokens == {made[0].token}

    client.down = False
    worker.flush()

    assert [rows for _, rows, _ in client.stored] == [batch.rows for batch in made]
    assert [s["insert_deduplication_token"] for _, _, s in client.stored] == [b.token for b in made]
    assert not worker.pending
    assert worker.inserted_rows == 30


def test_every_insert_asks_for_deduplication_even_with_async_insert():
    client = FakeClickHouse()
    worker = make_producer(client)
    worker.make_batch()
    worker.make_batch()
    worker.flush()
    tokens = [settings["insert_deduplication_token"] for _, _, settings in client.stored]
    assert len(set(tokens)) == 2 and all(tokens)
    assert all(settings["async_insert_deduplicate"] == 1 for _, _, settings in client.stored)


class FailsAfter(FakeClickHouse):
    """Stores the first `good` inserts, then refuses."""

    def __init__(self, good: int):
        super().__init__()
        self.good = good

    def insert_arrow(self, table, rows, settings=None):
        self.down = len(self.attempts) >= self.good
        super().insert_arrow(table, rows, settings)


def test_flush_stops_at_the_first_failure_and_keeps_the_rest():
    client = FailsAfter(good=2)
    worker = make_producer(client)
    for _ in range(5):
        worker.make_batch()
    made = list(worker.pending)

    with pytest.raises(OSError):
        worker.flush()

    assert [rows for _, rows, _ in client.stored] == [batch.rows for batch in made[:2]]
    assert list(worker.pending) == made[2:]
    assert worker.inserted_batches == 2


def test_a_full_queue_pauses_the_market_with_one_warning_and_drops_nothing(caplog):
    client = FakeClickHouse(down=True)
    worker = make_producer(client, batch_size=10, max_pending_rows=35)
    caplog.set_level(logging.WARNING, logger="producer")

    for _ in range(3):
        worker.make_batch()
    made = list(worker.pending)
    assert worker.pending_rows == 30  # a fourth batch would make 40 > 35

    for _ in range(5):
        worker.make_batch()

    assert list(worker.pending) == made
    warnings = [r for r in caplog.records if r.name == "producer" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "--max-pending-rows" in warnings[0].getMessage()


def test_a_queue_exactly_at_the_limit_is_allowed():
    worker = make_producer(FakeClickHouse(down=True), batch_size=10, max_pending_rows=30)
    for _ in range(4):
        worker.make_batch()
    assert worker.pending_rows == 30


def test_the_market_resumes_once_the_queue_drains(caplog):
    client = FakeClickHouse(down=True)
    worker = make_producer(client, batch_size=10, max_pending_rows=20)
    caplog.set_level(logging.WARNING, logger="producer")
    for _ in range(3):
        worker.make_batch()
    assert worker.pending_rows == 20

    client.down = False
    worker.flush()
    worker.make_batch()

    assert worker.pending_rows == 10
    assert len(client.stored) == 2
    assert len([r for r in caplog.records if r.name == "producer"]) == 1


def test_make_batch_stamps_rows_with_the_current_time(monkeypatch):
    monkeypatch.setattr(producer.time, "time_ns", lambda: NOW_MS * 1_000_000 + 123_456)
    worker = make_producer(FakeClickHouse())
    worker.make_batch()
    stamped = worker.pending[0].rows.column("timestamp").cast(pa.int64()).to_pylist()
    assert stamped == [NOW_MS] * 10
