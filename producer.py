"""Chapter 1: a fake market that writes into ClickHouse.

Every --interval (500 ms) this script inserts one batch of random market rows
into the table `stock_values`, creating the database and the table first if
they are missing. Prices follow a random walk per ticker, so the charts look
like a market, and every row keeps low <= open, close <= high.

Run it after ./docker.sh:

    .venv/bin/python producer.py
    .venv/bin/python producer.py --batch-size 1000 --interval 1   # fewer, larger inserts

You will see one line every 10 seconds, e.g.

    inserted 2,000 rows in 20 batches (200 rows/s), 0 pending

Rows are built column by column with numpy and sent as one Arrow table per
batch. Each batch carries an `insert_deduplication_token`, so a batch that is
retried after a dropped connection is stored once, not twice. If ClickHouse
goes away, the producer keeps the batches it has made, retries with backoff,
and pauses making new ones when --max-pending-rows is reached: nothing it has
made is thrown away.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from clickhouse_connect.driver.client import Client

import connection

log = logging.getLogger("producer")

TICKERS = ("AAPL", "AMZN", "GOOG", "META", "MSFT", "NFLX", "NVDA", "ORCL", "TSLA", "UBER")
CLIENTS = ("Alpha Capital", "Birch Fund", "Cobalt Partners", "Delta Advisors")

# `inserted_at` is stamped by ClickHouse when the row arrives and leads the
# sort key: it is the cursor perspective_server.py tails (docs/tailing.md). `id` lets the server drop a row it has already delivered.
# The deduplication window lets ClickHouse drop a batch that the producer
# sends twice, which plain MergeTree only does when this setting is on.
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS `{table}`
(
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6, 'UTC'),
    id          UUID,
    timestamp   DateTime64(3, 'UTC'),
    ticker      LowCardinality(String),
    client      LowCardinality(String),
    open        Float64,
    high        Float64,
    low         Float64,
    close       Float64,
    volume      UInt32,
    date        Date
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(inserted_at)
ORDER BY (inserted_at, id)
SETTINGS non_replicated_deduplication_window = 1000
"""

# History (chapter 4) charts the whole table by time bucket. Over 100 million
# rows a scan per chart is seconds; a rollup keeps, per ticker (and client)
# and minute, what a candle or a pivot needs: the row count and, per price, the
# first/last (by `inserted_at`), min, max and sum, as aggregate states. A
# materialized view fills it on every insert, and history.py reads it when a
# view's buckets are whole minutes (docs/history.md). Columns are named
# `<column>__<aggregate>`: history_rollup.py finds them by that name.
ROLLUP_MEASURES = {"open": ("first", "last", "min", "max", "sum"), "high": ("first", "last", "min", "max", "sum"),
                   "low": ("first", "last", "min", "max", "sum"), "close": ("first", "last", "min", "max", "sum"),
                   "volume": ("min", "max", "sum")}
_STATES = {  # aggregate -> (column type, state function) for a column of type {t}
    "first": ("AggregateFunction(argMin, {t}, DateTime64(6, 'UTC'))", "argMinState({x}, inserted_at)"),
    "last": ("AggregateFunction(argMax, {t}, DateTime64(6, 'UTC'))", "argMaxState({x}, inserted_at)"),
    "min": ("SimpleAggregateFunction(min, {t})", "min({x})"),
    "max": ("SimpleAggregateFunction(max, {t})", "max({x})"),
    "sum": ("SimpleAggregateFunction(sum, {s})", "sum({x})"),
}
_TYPES = {"open": ("Float64", "Float64"), "high": ("Float64", "Float64"), "low": ("Float64", "Float64"),
          "close": ("Float64", "Float64"), "volume": ("UInt32", "UInt64")}  # (type, type of its sum)


# Two rollups: the smaller one (per ticker) for candles, the other (per
# ticker and client) for pivots by client. History reads the smallest that
# answers a view.
ROLLUPS = {"by_minute": ("ticker",), "by_client_minute": ("ticker", "client")}


def rollup_statements(table: str) -> list[str]:
    """Each rollup table `<table>_<name>` and the materialized view that fills it."""
    columns, states = [], []
    for name, aggregates in ROLLUP_MEASURES.items():
        kind, sum_kind = _TYPES[name]
        for aggregate in aggregates:
            column_type, state = _STATES[aggregate]
            columns.append(f"    `{name}__{aggregate}` {column_type.format(t=kind, s=sum_kind)}")
            states.append(f"{state.format(x=name)} AS `{name}__{aggregate}`")
    statements = []
    for name, keys in ROLLUPS.items():
        statements += [
            f"CREATE TABLE IF NOT EXISTS `{table}_{name}` (\n"
            + "".join(f"    {key} LowCardinality(String),\n" for key in keys)
            + "    minute DateTime('UTC'),\n    rows SimpleAggregateFunction(sum, UInt64),\n"
            + ",\n".join(columns) + "\n) ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(minute) "
            f"ORDER BY ({keys[0]}, minute{''.join(', ' + key for key in keys[1:])})",
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS `{table}_{name}_mv` TO `{table}_{name}` AS "
            f"SELECT {', '.join(keys)}, toStartOfMinute(timestamp) AS minute, count() AS rows, {', '.join(states)} "
            f"FROM `{table}` GROUP BY {', '.join(keys)}, minute",
        ]
    return statements


@dataclass(frozen=True)
class ProducerSettings:
    interval: float = 0.5
    batch_size: int = 100
    max_pending_rows: int = 1_000_000
    seed: int | None = None
    table: str = connection.TABLE


class Market:
    """A random walk of prices, one per ticker. Pure: no I/O, no clock."""

    def __init__(self, seed: int | None = None, tickers=TICKERS, clients=CLIENTS):
        self.rng = np.random.default_rng(seed)
        self.tickers = np.array(tickers)
        self.clients = np.array(clients)
        self.prices = self.rng.uniform(50, 500, len(tickers))

    def batch(self, rows: int, now_ms: int) -> pa.Table:
        """Makes `rows` trades stamped `now_ms` (milliseconds since the epoch, UTC)."""
        rng = self.rng
        which = rng.integers(0, len(self.tickers), rows)
        opens = np.empty(rows)
        closes = np.empty(rows)
        for ticker in np.unique(which):
            # Each trade opens where the ticker's previous one closed.
            mine = np.flatnonzero(which == ticker)
            steps = np.exp(rng.normal(0.0, 0.002, len(mine)))
            path = self.prices[ticker] * np.cumprod(steps)
            opens[mine] = np.concatenate(([self.prices[ticker]], path[:-1]))
            closes[mine] = path
            self.prices[ticker] = path[-1]
        highs = np.maximum(opens, closes) * (1 + np.abs(rng.normal(0, 0.001, rows)))
        lows = np.minimum(opens, closes) * (1 - np.abs(rng.normal(0, 0.001, rows)))
        ids = rng.bytes(16 * rows)
        return pa.table({
            "id": [str(uuid.UUID(bytes=ids[i:i + 16])) for i in range(0, 16 * rows, 16)],
            "timestamp": pa.array(np.full(rows, now_ms, dtype=np.int64), pa.timestamp("ms", tz="UTC")),
            "ticker": pa.array(self.tickers[which]),
            "client": pa.array(self.clients[rng.integers(0, len(self.clients), rows)]),
            "open": opens,
            "high": highs,
            "low": lows,
            "close": closes,
            "volume": pa.array(rng.integers(1, 10_000, rows, dtype=np.uint32)),
            "date": pa.array(np.full(rows, now_ms // 86_400_000, dtype=np.int32), pa.date32()),
        })


def create_table(client: Client, table: str = connection.TABLE) -> None:
    """The table, and with a new table its rollup for history. A table made
    before the rollup existed keeps working without one (history is then
    slower); README chapter 4 shows how to add it to a table with rows."""
    new = not client.command(f"EXISTS TABLE `{table}`")
    client.command(CREATE_TABLE.format(table=table))
    if new:
        for statement in rollup_statements(table):
            client.command(statement)


@dataclass
class Batch:
    rows: pa.Table
    token: str  # the same token on every retry makes ClickHouse store it once


class Producer:
    """Makes batches on a timer and inserts them in order, retrying on failure."""

    def __init__(self, client: Client, settings: ProducerSettings, market: Market | None = None):
        self.client = client
        self.settings = settings
        self.market = market or Market(settings.seed)
        self.pending: deque[Batch] = deque()
        self.inserted_rows = 0
        self.inserted_batches = 0
        self._warned_full = False

    @property
    def pending_rows(self) -> int:
        return sum(batch.rows.num_rows for batch in self.pending)

    def make_batch(self) -> None:
        """Adds one batch to the queue, unless the queue is full."""
        if self.pending_rows + self.settings.batch_size > self.settings.max_pending_rows:
            if not self._warned_full:
                log.warning("%s rows are waiting for ClickHouse (--max-pending-rows): "
                            "pausing the market until they are written", f"{self.pending_rows:,}")
                self._warned_full = True
            return
        self._warned_full = False
        rows = self.market.batch(self.settings.batch_size, time.time_ns() // 1_000_000)
        self.pending.append(Batch(rows, uuid.uuid4().hex))

    def flush(self) -> None:
        """Inserts queued batches oldest first; stops at the first failure."""
        while self.pending:
            batch = self.pending[0]
            self.client.insert_arrow(self.settings.table, batch.rows, settings={
                "insert_deduplication_token": batch.token,
                # With async_insert (on by default since ClickHouse 26.2) the
                # token is ignored unless this is set too.
                "async_insert_deduplicate": 1,
            })
            self.pending.popleft()
            self.inserted_rows += batch.rows.num_rows
            self.inserted_batches += 1

    def run(self, stop: threading.Event, report_every: float = 10.0) -> None:
        """Produces until `stop` is set, then makes a last attempt to flush."""
        backoff = 0.0
        next_tick = time.monotonic()
        next_report = next_tick + report_every
        reported = (0, 0)
        while not stop.is_set():
            self.make_batch()
            try:
                self.flush()
                if backoff:
                    log.info("ClickHouse is back; %s rows pending", f"{self.pending_rows:,}")
                backoff = 0.0
            except Exception as error:
                if not connection.is_transient(error):
                    raise
                backoff = min(max(backoff * 2, self.settings.interval), 10.0)
                log.warning("insert failed (%s); retrying in %.1f s with %s rows pending",
                            connection.short_reason(error), backoff, f"{self.pending_rows:,}")
            now = time.monotonic()
            if now >= next_report:
                rows = self.inserted_rows - reported[0]
                log.info("inserted %s rows in %d batches (%.0f rows/s), %s pending",
                         f"{rows:,}", self.inserted_batches - reported[1],
                         rows / (now - next_report + report_every), f"{self.pending_rows:,}")
                reported = (self.inserted_rows, self.inserted_batches)
                next_report = now + report_every
            next_tick = max(next_tick + self.settings.interval, now) + backoff
            stop.wait(max(0.0, next_tick - time.monotonic()))
        self._final_flush()

    def _final_flush(self) -> None:
        if not self.pending:
            return
        try:
            self.flush()
        except Exception as error:
            log.warning("exiting with %s rows not written: %s", f"{self.pending_rows:,}", connection.short_reason(error))


def parse_args(argv: list[str] | None = None) -> tuple[ProducerSettings, connection.ClickHouseSettings]:
    parser = argparse.ArgumentParser(
        description="Insert random market rows into ClickHouse every --interval seconds.")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between batches (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="rows per batch (default 100); ClickHouse prefers >= 1,000 per insert")
    parser.add_argument("--max-pending-rows", type=int, default=1_000_000,
                        help="rows kept while ClickHouse is unreachable before pausing (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable prices")
    parser.add_argument("--table", default=connection.TABLE, help="table name (default stock_values)")
    connection.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be more than 0 seconds")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.max_pending_rows < args.batch_size:
        parser.error("--max-pending-rows must be at least --batch-size")
    try:
        ch = connection.settings_from_args(args)
    except connection.SetupError as error:
        parser.error(str(error))
    settings = ProducerSettings(args.interval, args.batch_size, args.max_pending_rows, args.seed, args.table)
    return settings, ch


def main(argv: list[str] | None = None) -> int:
    connection.setup_logging()
    settings, ch = parse_args(argv)
    log.info("%s; table %s; %d rows every %.2f s", ch.describe(), settings.table,
             settings.batch_size, settings.interval)
    try:
        client = connection.connect(ch)
        create_table(client, settings.table)
    except connection.SetupError as error:
        print(f"producer.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    # Ctrl-C and SIGTERM end the loop between batches, so the last batch is
    # written instead of being cut off mid-insert.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    producer = Producer(client, settings)
    try:
        producer.run(stop)
    except Exception as error:
        print(f"producer.py: ClickHouse rejected an insert into {settings.table}: {connection.short_reason(error)} "
              f"({producer.pending_rows:,} rows not written)", file=sys.stderr)
        return 1
    log.info("stopped after inserting %s rows", f"{producer.inserted_rows:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
