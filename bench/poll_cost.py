"""Does a poll cost the same with 10 million rows of history as with 10 thousand?

A benchmark, not a test. The README says a poll "costs the number of new
rows, not the size of the table", because `inserted_at` leads ORDER BY and
each poll asks for `inserted_at >= watermark - overlap`. This measures it.

In one embedded ClickHouse (chDB, `clickhouse_connect.get_client(dsn=
"chdb://memory")`) it creates one table per --sizes value with
`producer.create_table` and fills it with that many rows of history, made by
`INSERT ... SELECT ... FROM numbers()` in 1M-row chunks with `inserted_at`
spread evenly over the hour before the run, then `OPTIMIZE TABLE ... FINAL`
(one part, as a long-lived table mostly is after merges). Then, per table, a
real `tailer.Tail` catches up the way perspective_server.py does at start
(`Tail.backfill(10,000)`), and every --interval (0.5 s, the producer's):

    for each table (order alternating every cycle, so drift hits all alike):
        Producer.make_batch() + Producer.flush()   # --batch rows (100), as the demo
        time Tail.poll()                           # must deliver exactly those rows

The first cycles, until the overlap window has moved past the history
(overlap / interval + 2 of them), are not timed.

Rows read: chDB's per-query summary `read_rows` is the number of result
rows, not the rows read, and chDB has no system.query_log. So after each
timed poll the poll's exact SQL and parameters run once more (untimed, with
the query condition cache off, which would otherwise remember the repeat)
between two reads of system.events: the SelectedRows and SelectedMarks
(granules) deltas are what a poll reads. `EXPLAIN indexes = 1` of the last
poll shows whether the primary key is used and how many granules it keeps.

With --overlap 3 s and a batch every 0.5 s, a poll returns about
(3 / 0.5 + 1) x 100 = 700 rows (the new batch plus the overlap's re-read),
of which Cursor.accept passes only the 100 new ones; what it reads is that,
rounded up to whole 8,192-row granules.

--proposed-fix polls each table with a second Tail too, whose queries end in
`SETTINGS prefer_column_name_to_alias = 1`: `inserted_at` in WHERE and ORDER
BY then means the column, not the SELECT list's `toDateTime64(inserted_at, 3,
'UTC') AS inserted_at`, which today hides the primary key from the WHERE.

Run it from the repository root:

    .venv/bin/python bench/poll_cost.py                            # 10k and 10M rows, 200 polls each
    .venv/bin/python bench/poll_cost.py --proposed-fix             # also the fixed query, side by side
    .venv/bin/python bench/poll_cost.py --sizes 10000 1000000 10000000 --polls 400
    .venv/bin/python bench/poll_cost.py --smoke                    # 1k and 100k rows, 10 polls (CI, ~10 s)
    .venv/bin/python bench/poll_cost.py --json poll_cost.json

Sample output (2 cores, shared with other work; chDB 4.4.0; about 2 minutes):

    $ python bench/poll_cost.py --proposed-fix
    machine: python 3.11.7, chdb 4.4.0, clickhouse 26.9.2.1, clickhouse-connect 1.12.0, pyarrow 26.0.1
    stock_values_10k: 10,000 rows filled in 0.0 s; backfill of 10,000 rows in 0.05 s, 0.01 s
    stock_values_10M: 10,000,000 rows filled in 8.8 s; backfill of 10,000 rows in 0.03 s, 0.02 s

    Tail.poll() after each 100-row insert; cycle 0.50 s (--interval 0.5), overlap 3 s; all tails polled in turn, in one run
    history rows  tail                                        polls  poll p50 ms  p95 ms  max ms  query p50 ms  rows returned  rows read p50  rows read max  granules read  primary key (EXPLAIN)
          10,000  Tail.poll                                     200         11.1    17.8    24.5           9.8            800         20,861         30,814              6            unused, 4/4
          10,000  + SETTINGS prefer_column_name_to_alias = 1    200          9.8    16.7    21.2           8.4            700          3,262          9,114              5              used, 1/1
      10,000,000  Tail.poll                                     200        107.6   120.0   139.2         105.9            800     10,010,861     10,020,814          1,226      unused, 1228/1228
      10,000,000  + SETTINGS prefer_column_name_to_alias = 1    200         10.9    15.8    25.4           9.5            700          4,162          9,011              5              used, 5/7

    Tail.poll: poll p50 10M/10k 9.70x (target <= 1.5x: MISSED), p95 6.74x; rows read 10M/10k 479.88x
    + SETTINGS prefer_column_name_to_alias = 1: poll p50 10M/10k 1.11x (target <= 1.5x: met), p95 0.95x; rows read 10M/10k 1.28x
    a poll should read the new batch plus the overlap's re-read, about 100 x (3 / 0.50 + 1) = 700 rows (in whole 8,192-row granules), not the 10,000,000 rows of history
    the poll's WHERE does not use the primary key: tailer.py selects `toDateTime64(inserted_at, 3, 'UTC') AS inserted_at`, and ClickHouse resolves `inserted_at` in WHERE and ORDER BY to that alias, so each poll scans the whole table (--proposed-fix shows the same Tail with prefer_column_name_to_alias=1)

It exits 1 if a poll delivers other rows than the batch inserted just before it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clickhouse_connect  # noqa: E402
import numpy as np  # noqa: E402

import producer  # noqa: E402
from clickhouse_types import quote  # noqa: E402
from tailer import Tail  # noqa: E402

DATABASE = "demo"
CHUNK = 1_000_000  # history rows per INSERT ... SELECT
SPAN_US = 3600 * 1_000_000  # history covers the hour before the run
BACKFILL = 10_000  # perspective_server.py's default --limit: what it backfills at start
TARGET_RATIO = 1.5


class WrongRows(Exception):
    pass


class _Recorder:
    """Passes everything to the client; keeps the last query_arrow's SQL and clocks it.

    `settings` (a SQL `SETTINGS ...` clause, in the query text so that chDB
    applies it without extra queries) is appended to every query_arrow:
    empty for the real Tail.poll; prefer_column_name_to_alias = 1 for the
    --proposed-fix variant.
    """

    def __init__(self, client, settings: str = ""):
        self._client = client
        self.settings = settings
        self.last = None
        self.seconds = 0.0
        self.rows = 0

    def query_arrow(self, query, parameters=None, **kwargs):
        query = f"{query} SETTINGS {self.settings}" if self.settings else query
        started = time.perf_counter()
        result = self._client.query_arrow(query, parameters=parameters, **kwargs)
        self.seconds = time.perf_counter() - started
        self.last, self.rows = (query, parameters, self.settings), result.num_rows
        return result

    def __getattr__(self, name):
        return getattr(self._client, name)


def label(rows: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if rows >= size and rows % size == 0:
            return f"{rows // size}{unit}"
    return f"{rows:,}"


def fill(client, table: str, rows: int, end_us: int) -> float:
    """`rows` rows with inserted_at spread over the hour before `end_us`; returns seconds."""
    started = time.perf_counter()
    tickers = "[" + ", ".join(f"'{t}'" for t in producer.TICKERS) + "]"
    clients = "[" + ", ".join(f"'{c}'" for c in producer.CLIENTS) + "]"
    for offset in range(0, rows, CHUNK):
        count = min(CHUNK, rows - offset)
        client.command(f"""
            INSERT INTO {quote(table)}
                (inserted_at, id, timestamp, ticker, client, open, high, low, close, volume, date)
            SELECT fromUnixTimestamp64Micro(toInt64({end_us - SPAN_US}) + intDiv(toInt64(number) * {SPAN_US}, {rows}),
                                            'UTC') AS at,
                   generateUUIDv4(number), toDateTime64(at, 3, 'UTC'),
                   {tickers}[number % {len(producer.TICKERS)} + 1],
                   {clients}[intHash32(number) % {len(producer.CLIENTS)} + 1],
                   100 + (intHash32(number) % 10000) / 100 AS price, price * 1.001, price * 0.999, price * 1.0005,
                   toUInt32(intHash32(number) % 9999 + 1), toDate(at)
            FROM numbers({offset}, {count})""")
    client.command(f"OPTIMIZE TABLE {quote(table)} FINAL")
    have = client.query(f"SELECT count() FROM {quote(table)}").result_rows[0][0]
    if have != rows:
        raise WrongRows(f"{table} holds {have:,} rows after filling, expected {rows:,}")
    return time.perf_counter() - started


EVENTS = ("SelectedRows", "SelectedMarks")
FIX = "prefer_column_name_to_alias = 1"  # the --proposed-fix variant's SETTINGS


def _events(client) -> dict[str, int]:
    rows = client.query("SELECT event, value FROM system.events WHERE event IN {names:Array(String)}",
                        parameters={"names": list(EVENTS)}).result_rows
    return {name: 0 for name in EVENTS} | dict(rows)


def events_overhead(client) -> dict[str, int]:
    """What reading system.events itself adds to the counters."""
    samples = []
    for _ in range(5):
        before = _events(client)
        after = _events(client)
        samples.append({name: after[name] - before[name] for name in EVENTS})
    return {name: min(sample[name] for sample in samples) for name in EVENTS}


def rows_read(client, last, overhead: dict[str, int]) -> dict[str, int]:
    """Rows and granules (marks) ClickHouse reads for the poll's exact query.

    chDB's per-query summary `read_rows` is the number of result rows, not the
    rows read, and chDB has no system.query_log, so this re-runs the query and
    takes the difference of the process-wide counters in system.events. The
    query condition cache is off for the re-run: it would remember the poll
    it repeats and skip granules a new poll, with a new bound, cannot.
    """
    sql, params, settings = last
    before = _events(client)
    client.query(f"{sql}{', ' if settings else ' SETTINGS '}use_query_condition_cache = 0", parameters=params)
    after = _events(client)
    return {name: after[name] - before[name] - overhead[name] for name in EVENTS}


def primary_key_use(client, last) -> str:
    """What EXPLAIN indexes = 1 says of the primary key for the poll's query:
    'used' or 'unused' (Condition: true), and granules selected/total."""
    sql, params, settings = last
    text = "\n".join(row[0] for row in client.query("EXPLAIN indexes = 1 " + sql, parameters=params).result_rows)
    found = re.search(r"PrimaryKey\s+(?:Keys:.*?)?Condition: (.*?)\n.*?Granules: (\d+/\d+)", text, re.DOTALL)
    if not found:
        return "?"
    condition, selected = found.groups()
    return f"{'unused' if condition.strip() == 'true' else 'used'}, {selected}"


class Poller:
    """One Tail on one table, and its figures."""

    def __init__(self, client, table: str, overlap: float, variant: str, settings: str = ""):
        self.variant = variant
        self.recorder = _Recorder(client, settings)
        self.tail = Tail(self.recorder, table, "inserted_at", "id", overlap)
        self.poll_s: list[float] = []
        self.query_s: list[float] = []
        self.returned: list[int] = []
        self.read: list[int] = []
        self.marks: list[int] = []
        self.primary_key = "?"
        self.backfill_s = 0.0


class Subject:
    """One table of a given history size, its producer and its tail(s)."""

    def __init__(self, client, rows: int, batch: int, overlap: float, proposed_fix: bool):
        self.rows = rows
        self.table = f"stock_values_{label(rows)}"
        self.client = client
        self.producer = producer.Producer(client, producer.ProducerSettings(batch_size=batch, table=self.table),
                                          producer.Market(seed=rows))
        self.pollers = [Poller(client, self.table, overlap, "Tail.poll")]
        if proposed_fix:
            self.pollers.append(Poller(client, self.table, overlap, "+ SETTINGS " + FIX, FIX))
        self.fill_s = 0.0

    def catch_up(self) -> int:
        """As perspective_server.py starts: describe, then backfill --limit rows."""
        for poller in self.pollers:
            poller.tail.describe()
            started = time.perf_counter()
            rows = sum(chunk.num_rows for chunk in poller.tail.backfill(BACKFILL))
            poller.backfill_s = time.perf_counter() - started
        return rows

    def step(self, timed: bool, flip: bool, overhead: dict[str, int]) -> None:
        self.producer.make_batch()
        sent = sorted(self.producer.pending[-1].rows.column("id").to_pylist())
        self.producer.flush()
        for poller in (self.pollers[::-1] if flip else self.pollers):
            started = time.perf_counter()
            got = poller.tail.poll()
            seconds = time.perf_counter() - started
            if sorted(got.column("id").to_pylist()) != sent:
                raise WrongRows(f"{self.table} ({poller.variant}): a poll delivered {got.num_rows} rows, "
                                f"expected the {len(sent)} just inserted")
            if timed:
                poller.poll_s.append(seconds)
                poller.query_s.append(poller.recorder.seconds)
                poller.returned.append(poller.recorder.rows)
                read = rows_read(self.client, poller.recorder.last, overhead)
                poller.read.append(read["SelectedRows"])
                poller.marks.append(read["SelectedMarks"])


def pct(values, q) -> float:
    return float(np.percentile(values, q))


def machine(client) -> dict:
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), "chdb": version("chdb"),
            "clickhouse": client.query("SELECT version()").result_rows[0][0],
            "clickhouse-connect": version("clickhouse-connect"), "pyarrow": version("pyarrow")}


def ratios(subjects: list[Subject], index: int) -> dict:
    small, big = subjects[0].pollers[index], subjects[-1].pollers[index]
    return {"variant": small.variant,
            "p50_ratio": pct(big.poll_s, 50) / pct(small.poll_s, 50),
            "p95_ratio": pct(big.poll_s, 95) / pct(small.poll_s, 95),
            "read_rows_ratio": statistics.median(big.read) / max(1, statistics.median(small.read))}


def print_table(subjects: list[Subject], args, cycle_s: float) -> list[dict]:
    header = ("history rows", "tail", "polls", "poll p50 ms", "p95 ms", "max ms", "query p50 ms",
              "rows returned", "rows read p50", "rows read max", "granules read", "primary key (EXPLAIN)")
    lines = []
    for s in subjects:
        for p in s.pollers:
            lines.append((f"{s.rows:,}", p.variant, f"{len(p.poll_s)}", f"{1000 * pct(p.poll_s, 50):.1f}",
                          f"{1000 * pct(p.poll_s, 95):.1f}", f"{1000 * max(p.poll_s):.1f}",
                          f"{1000 * pct(p.query_s, 50):.1f}", f"{statistics.median(p.returned):,.0f}",
                          f"{statistics.median(p.read):,.0f}", f"{max(p.read):,}",
                          f"{statistics.median(p.marks):,.0f}", p.primary_key))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    print(f"\nTail.poll() after each {args.batch}-row insert; cycle {cycle_s:.2f} s (--interval {args.interval:g}), "
          f"overlap {args.overlap:g} s; all tails polled in turn, in one run")
    for row in [header, *lines]:
        print("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    expected = round(args.batch * (args.overlap / cycle_s + 1))
    small, big = label(subjects[0].rows), label(subjects[-1].rows)
    figures = [ratios(subjects, i) for i in range(len(subjects[0].pollers))]
    print()
    for f in figures:
        print(f"{f['variant']}: poll p50 {big}/{small} {f['p50_ratio']:.2f}x (target <= {TARGET_RATIO}x: "
              f"{'met' if f['p50_ratio'] <= TARGET_RATIO else 'MISSED'}), p95 {f['p95_ratio']:.2f}x; "
              f"rows read {big}/{small} {f['read_rows_ratio']:.2f}x")
    print(f"a poll should read the new batch plus the overlap's re-read, about {args.batch} x "
          f"({args.overlap:g} / {cycle_s:.2f} + 1) = {expected:,} rows (in whole 8,192-row granules), "
          f"not the {subjects[-1].rows:,} rows of history")
    if figures[0]["p50_ratio"] > TARGET_RATIO and subjects[-1].pollers[0].primary_key.startswith("unused"):
        print("the poll's WHERE does not use the primary key: tailer.py selects "
              "`toDateTime64(inserted_at, 3, 'UTC') AS inserted_at`, and ClickHouse resolves `inserted_at` in "
              "WHERE and ORDER BY to that alias, so each poll scans the whole table (--proposed-fix shows the "
              "same Tail with prefer_column_name_to_alias=1)")
    for f in figures:
        f["expected_rows_per_poll"] = expected
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tail.poll() latency and rows read vs table history size.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 10_000_000],
                        help="history rows, one table each (default 10000 10000000); ratio is largest/smallest")
    parser.add_argument("--polls", type=int, default=200, help="timed polls per table (default 200)")
    parser.add_argument("--batch", type=int, default=100,
                        help="rows inserted before each poll (default 100, the demo's)")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds per cycle, as the producer's --interval (default 0.5)")
    parser.add_argument("--overlap", type=float, default=3.0, help="Tail overlap in seconds (default 3, the server's)")
    parser.add_argument("--proposed-fix", action="store_true",
                        help=f"also poll each table with a second Tail whose queries carry {FIX}, i.e. "
                             "`inserted_at` in WHERE / ORDER BY means the column, not the SELECT's alias")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: --sizes 1000 100000 --polls 10")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.polls = [1_000, 100_000], 10
    if min(args.sizes) < 1 or args.polls < 1 or args.batch < 1 or args.interval <= 0 or args.overlap < 0:
        parser.error("sizes, polls and batch must be >= 1, interval > 0, overlap >= 0")
    args.sizes = sorted(set(args.sizes))
    if len(args.sizes) < 2:
        parser.error("--sizes needs at least two different sizes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = clickhouse_connect.get_client(dsn="chdb://memory")
    client.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
    client.database = DATABASE
    info = machine(client)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    end_us = time.time_ns() // 1000
    subjects = [Subject(client, rows, args.batch, args.overlap, args.proposed_fix) for rows in args.sizes]
    try:
        for s in subjects:
            producer.create_table(client, s.table)
            s.fill_s = fill(client, s.table, s.rows, end_us)
            caught_up = s.catch_up()
            print(f"{s.table}: {s.rows:,} rows filled in {s.fill_s:.1f} s; backfill of {caught_up:,} rows in "
                  + ", ".join(f"{p.backfill_s:.2f} s" for p in s.pollers), flush=True)
        overhead = events_overhead(client)
        warmup = math.floor(args.overlap / args.interval) + 2
        next_cycle = time.monotonic()
        for cycle in range(warmup + args.polls):
            if cycle == warmup:
                timed_from = time.monotonic()
            flip = cycle % 2 == 1  # alternate the order, so drift and caches hit all alike
            for s in (subjects[::-1] if flip else subjects):
                s.step(cycle >= warmup, flip, overhead)
            next_cycle += args.interval
            time.sleep(max(0.0, next_cycle - time.monotonic()))
        cycle_s = (time.monotonic() - timed_from) / args.polls
        for s in subjects:
            for p in s.pollers:
                p.primary_key = primary_key_use(client, p.recorder.last)
    except WrongRows as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    figures = print_table(subjects, args, cycle_s)

    if args.json:
        small, big = subjects[0], subjects[-1]
        payload = {
            "machine": info,
            "settings": {k: getattr(args, k)
                         for k in ("sizes", "polls", "batch", "interval", "overlap", "proposed_fix")},
            "cycle_s": cycle_s,
            "results": [{"rows": s.rows, "tail": p.variant, "fill_s": s.fill_s, "backfill_s": p.backfill_s,
                         "poll_p50_ms": 1000 * pct(p.poll_s, 50), "poll_p95_ms": 1000 * pct(p.poll_s, 95),
                         "poll_max_ms": 1000 * max(p.poll_s), "query_p50_ms": 1000 * pct(p.query_s, 50),
                         "rows_returned_p50": statistics.median(p.returned),
                         "read_rows_p50": statistics.median(p.read), "read_rows_max": max(p.read),
                         "read_granules_p50": statistics.median(p.marks), "primary_key": p.primary_key,
                         "poll_ms": [1000 * x for x in p.poll_s], "read_rows": p.read}
                        for s in subjects for p in s.pollers],
            "ratios": figures,
            "summary": [
                {"figure": f"poll p50, {label(big.rows)} vs {label(small.rows)} rows of history ({f['variant']})",
                 "value": f"{f['p50_ratio']:.2f}x ({1000 * pct(big.pollers[i].poll_s, 50):.1f} vs "
                          f"{1000 * pct(small.pollers[i].poll_s, 50):.1f} ms)",
                 "target": f"<= {TARGET_RATIO}x", "met": f["p50_ratio"] <= TARGET_RATIO}
                for i, f in enumerate(figures)
            ] + [
                {"figure": f"rows read per poll at {label(big.rows)}, median ({f['variant']})",
                 "value": f"{statistics.median(big.pollers[i].read):,.0f}",
                 "target": f"~new + overlap ({f['expected_rows_per_poll']:,}), not history",
                 "met": f["read_rows_ratio"] <= TARGET_RATIO}
                for i, f in enumerate(figures)
            ],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
