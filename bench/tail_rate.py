"""How many rows does a poll fetch per new row, and what insert rate keeps up?

A benchmark, not a test. Everything runs in one process on an embedded
ClickHouse (chDB, in memory), as `perspective_server.py --embedded` does:

* a producer thread inserts `--rate` rows per second, in one insert every
  0.5 s (the demo's cadence; ClickHouse prefers few large inserts);
* a poll loop runs every `--interval` (0.1 s, the server's default) and,
  on each tick, polls three tails of the same table one after the other,
  each into its own Perspective table:

    new   tailer.Tail as the server runs it: once every --check-every
          (1 s), one aggregate checks that the overlap window holds exactly
          the keys already read; every poll fetches only the rows past the
          watermark, unless that check fails;
    each  the same, checking the window on every poll (--check-every 0);
    old   the same Tail with the check switched off, so every poll fetches
          the whole `--overlap` window again (the scheme before both).

For each tail it reports the rows ClickHouse returned per new row, the rows
ClickHouse read per new row (system.events SelectedRows around each poll),
how often the window had to be re-read, how long a poll took (its queries
plus Table.update), and the lag from a row's insert-time stamp to its
arrival in the Perspective table (p50/p95/max). A rate is kept
up with when the lag p95 stays under 1 s for the whole run.

Run it from the repository root:

    .venv/bin/python bench/tail_rate.py                                  # 2,000 rows/s for 60 s
    .venv/bin/python bench/tail_rate.py --rates 2000 20000 100000 --seconds 60
    .venv/bin/python bench/tail_rate.py --smoke                          # 3 s at 2,000 rows/s (CI)
    .venv/bin/python bench/tail_rate.py --json tail_rate.json

It exits 1 if a tail delivers a row twice or misses one.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clickhouse_connect  # noqa: E402
import numpy as np  # noqa: E402
import perspective  # noqa: E402

import producer  # noqa: E402
from perspective_server import Sync, to_ipc  # noqa: E402
from tailer import Tail  # noqa: E402

TABLE = "stock_values"


class RereadingTail(Tail):
    """The previous scheme: the whole overlap window on every poll."""

    def _window_unchanged(self) -> bool:
        return False


def selected_rows(client) -> int:
    rows = client.query("SELECT value FROM system.events WHERE event = 'SelectedRows'").result_rows
    return int(rows[0][0]) if rows else 0


class Subject:
    def __init__(self, name: str, tail: Tail, limit: int):
        tail.describe()
        self.name = name
        self.sync = Sync(tail, perspective.Server().new_local_client().table(to_ipc(tail.empty()), limit=limit))
        self.read = 0
        self.poll_ms: list[float] = []

    def poll(self, client) -> None:
        before = selected_rows(client)
        started = time.perf_counter()
        self.sync.poll()
        self.poll_ms.append((time.perf_counter() - started) * 1000)
        # The events query itself selects a row or so; negligible here.
        self.read += selected_rows(client) - before


def run_rate(rate: int, seconds: float, interval: float, overlap: float, new_only: bool = False,
             check_every: float = 1.0) -> list[dict]:
    client = clickhouse_connect.get_client(dsn="chdb://memory")
    database = f"tail_rate_{rate}"
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.command(f"CREATE DATABASE {database}")
    client.database = database
    producer.create_table(client, TABLE)
    writer = clickhouse_connect.get_client(dsn="chdb://memory")
    writer.database = database
    batch = max(1, int(rate * 0.5))
    worker = producer.Producer(writer, producer.ProducerSettings(interval=0.5, batch_size=batch, table=TABLE,
                                                                 max_pending_rows=batch * 100))
    subjects = [Subject("new", Tail(client, TABLE, "inserted_at", "id", overlap, ("id",), check_every=check_every),
                        10_000_000),
                Subject("each", Tail(client, TABLE, "inserted_at", "id", overlap, ("id",)), 10_000_000),
                Subject("old", RereadingTail(client, TABLE, "inserted_at", "id", overlap, ("id",)), 10_000_000)]
    if new_only:
        subjects = subjects[:1]
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, 3600), daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    next_tick = time.monotonic()
    ticks = 0
    while time.monotonic() < deadline:
        shift = ticks % len(subjects)  # each tail goes first in turn
        for subject in subjects[shift:] + subjects[:shift]:
            subject.poll(client)
        ticks += 1
        next_tick += interval
        time.sleep(max(0.0, next_tick - time.monotonic()))
    stop.set()
    thread.join()
    for subject in subjects:  # the last rows, then compare with ClickHouse
        subject.poll(client)
    stored = client.query(f"SELECT count() FROM {TABLE}").result_rows[0][0]
    out = []
    for subject in subjects:
        tail = subject.sync.tail
        delivered, lags = subject.sync.take_figures()
        size = subject.sync.table.size()
        if size != stored:
            raise SystemExit(f"error: {subject.name} tail holds {size:,} rows, ClickHouse {stored:,}")
        out.append({
            "rate": rate, "tail": subject.name, "seconds": seconds, "rows": stored, "polls": tail.polls,
            "returned_per_new_row": tail.rows_returned / max(1, stored),
            "read_per_new_row": subject.read / max(1, stored),
            "window_checks": tail.window_checks, "window_rereads": tail.window_rereads,
            "poll_p50_ms": float(np.percentile(subject.poll_ms, 50)),
            "poll_p95_ms": float(np.percentile(subject.poll_ms, 95)),
            "lag_p50_ms": float(np.percentile(lags, 50)) if len(lags) else None,
            "lag_p95_ms": float(np.percentile(lags, 95)) if len(lags) else None,
            "lag_max_ms": float(lags.max()) if len(lags) else None,
        })
    client.command(f"DROP DATABASE {database}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rows fetched per new row, and the insert rate the tail keeps up with.")
    parser.add_argument("--rates", type=int, nargs="+", default=[2_000], help="rows per second (default 2000)")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per rate (default 60)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between polls (default 0.1)")
    parser.add_argument("--overlap", type=float, default=3.0, help="overlap window, seconds (default 3)")
    parser.add_argument("--check-every", type=float, default=1.0,
                        help="the new tail's seconds between window checks (default 1, the server's)")
    parser.add_argument("--new-only", action="store_true",
                        help="poll only the server's own tail (to find the rate it keeps up with alone)")
    parser.add_argument("--smoke", action="store_true", help="3 s at 2,000 rows/s")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rates, args.seconds = [2_000], 3.0
    results = []
    print(f"poll every {args.interval} s, overlap {args.overlap} s, one insert every 0.5 s; every tail polled each "
          f"tick; new checks the window every {args.check_every:g} s")
    header = f"{'rows/s':>8}  {'tail':<4}  {'rows':>9}  {'returned/new':>12}  {'read/new':>9}  {'checks':>7}  " \
             f"{'rereads':>8}  " \
             f"{'poll p50':>8}  {'p95':>6}  {'lag p50':>8}  {'p95':>7}  {'max':>7}  kept up"
    print(header)
    for rate in args.rates:
        for row in run_rate(rate, args.seconds, args.interval, args.overlap, args.new_only, args.check_every):
            results.append(row)
            kept = row["lag_p95_ms"] is not None and row["lag_p95_ms"] < 1000
            print(f"{rate:>8,}  {row['tail']:<4}  {row['rows']:>9,}  {row['returned_per_new_row']:>12.2f}  "
                  f"{row['read_per_new_row']:>9.1f}  {row['window_checks']:>7,}  {row['window_rereads']:>8,}  "
                  f"{row['poll_p50_ms']:>6.1f}ms  "
                  f"{row['poll_p95_ms']:>4.0f}ms  {row['lag_p50_ms']:>6.0f}ms  "
                  f"{row['lag_p95_ms']:>5.0f}ms  {row['lag_max_ms']:>5.0f}ms  {'yes' if kept else 'NO'}", flush=True)
    summary = []
    for row in results:
        if row["tail"] == "new":
            summary.append({"figure": f"rows returned per new row at {row['rate']:,} rows/s",
                            "value": f"{row['returned_per_new_row']:.2f} (read {row['read_per_new_row']:.1f})",
                            "target": "<= 3", "met": row["returned_per_new_row"] <= 3})
            summary.append({"figure": f"lag p95 at {row['rate']:,} rows/s", "value": f"{row['lag_p95_ms']:.0f} ms",
                            "target": "< 1000 ms", "met": row["lag_p95_ms"] < 1000})
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
