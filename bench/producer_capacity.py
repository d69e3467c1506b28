"""How many rows per second can one producer insert, by batch size and async_insert?

A benchmark, not a test. For each batch size (--batch-sizes, default 10,
1,000 and 100,000 rows) and async_insert=0 / async_insert=1 (always with
wait_for_async_insert=1, so an insert returns once its rows are stored), it
inserts as fast as it can for --seconds (10) into a fresh `stock_values`
table made by `producer.create_table`, through producer.Producer's own insert
path: one `Batch` (a fresh dedup token each) queued, then `Producer.flush()`,
i.e. `insert_arrow` with `insert_deduplication_token` and
`async_insert_deduplicate=1`. The async_insert settings are client settings,
sent with every request as producer.py's client would send them.

The batches are made by `producer.Market` before the clock starts, so the
figure is the insert path alone. producer.py makes each batch on the same
thread before inserting it; `Market.batch`'s own rate is measured too, and
the "with make_batch" column is what one producer.py loop could reach:
1 / (1/insert rate + 1/make rate).

Targets (--targets): `http` (default) is tests/chdb_http.py, chDB behind
ClickHouse's HTTP interface, so the inserts go over HTTP as to a real server.
It is a TEST HARNESS, NOT A CLICKHOUSE SERVER: it runs one query at a time,
writes each insert body to a temporary file, and is Python; a real server
will be faster and, with several producers, parallel. `embedded` is chDB in
this process (`chdb://memory`), without HTTP.

The "queued async" column counts the inserts the engine put in its async
insert queue (system.events AsyncInsertQuery). chDB 4.4 accepts
async_insert=1 but inserts synchronously (the column stays 0, and with
wait_for_async_insert=0 the rows are visible at once), so on chDB the two
async_insert rows measure the same path; the benchmark says so when it
happens. `--targets server` runs the same cells against a real ClickHouse
server, named by the CLICKHOUSE_URL / CLICKHOUSE_* variables the scripts
read (connection.py), to see the queue's effect there; it creates and drops
tables named capacity_* in the configured database.

Run it from the repository root:

    .venv/bin/python bench/producer_capacity.py                           # http, 10 s per cell
    .venv/bin/python bench/producer_capacity.py --targets http embedded --seconds 5
    .venv/bin/python bench/producer_capacity.py --smoke                   # CI: 10 and 1,000 rows, 1 s per cell
    .venv/bin/python bench/producer_capacity.py --json capacity.json

Sample output (2 cores, shared with other work; chDB 4.4.0; ~2.5 minutes):

    $ python bench/producer_capacity.py --targets http embedded
    machine: python 3.11.7, chdb 4.4.0, clickhouse-connect 1.12.0, pyarrow 26.0.1
    http = tests/chdb_http.py, a TEST HARNESS, NOT A CLICKHOUSE SERVER: one query at a time, each insert body via a temp file; a real server is faster and runs producers in parallel
    embedded = chDB in this process (no HTTP)
      http          10 rows  async_insert=0       1,382 rows/s    138.2 inserts/s
      http          10 rows  async_insert=1       1,453 rows/s    145.3 inserts/s
      http       1,000 rows  async_insert=0     125,316 rows/s    125.3 inserts/s
      http       1,000 rows  async_insert=1     124,976 rows/s    125.0 inserts/s
      http     100,000 rows  async_insert=0   1,164,524 rows/s     11.6 inserts/s
      http     100,000 rows  async_insert=1   1,202,224 rows/s     12.0 inserts/s
      embedded      10 rows  async_insert=0       2,625 rows/s    262.5 inserts/s
      embedded      10 rows  async_insert=1       2,640 rows/s    264.0 inserts/s
      embedded   1,000 rows  async_insert=0     224,527 rows/s    224.5 inserts/s
      embedded   1,000 rows  async_insert=1     234,168 rows/s    234.2 inserts/s
      embedded 100,000 rows  async_insert=0   1,535,167 rows/s     15.4 inserts/s
      embedded 100,000 rows  async_insert=1   1,568,133 rows/s     15.7 inserts/s

    one producer, inserting back to back (wait_for_async_insert=1 throughout); queued async: inserts the engine put in its async insert queue
    target    batch rows  async_insert  queued async  inserts     rows/s  inserts/s  insert p50 ms  p95 ms  rows/s with make_batch
    http              10             0             0    1,383      1,382      138.2            7.0    10.1                   1,342
    http              10             1             0    1,453      1,453      145.3            6.4     9.6                   1,408
    http           1,000             0             0    1,254    125,316      125.3            7.3    11.9                  99,333
    http           1,000             1             0    1,250    124,976      125.0            7.2    12.2                  99,119
    http         100,000             0             0      117  1,164,524       11.6           78.5   136.9                 358,972
    http         100,000             1             0      121  1,202,224       12.0           77.7   138.0                 362,476
    embedded          10             0             0    2,625      2,625      262.5            3.5     6.1                   2,482
    embedded          10             1             0    2,641      2,640      264.0            3.4     6.0                   2,496
    embedded       1,000             0             0    2,246    224,527      224.5            3.9     7.7                 152,879
    embedded       1,000             1             0    2,342    234,168      234.2            3.9     6.8                 157,289
    embedded     100,000             0             0      154  1,535,167       15.4           56.7   116.7                 387,836
    embedded     100,000             1             0      158  1,568,133       15.7           56.9   115.0                 389,907
    Market.batch (making a batch): 10 rows 45,807 rows/s, 1,000 rows 479,089 rows/s, 100,000 rows 518,938 rows/s

    advice:
      http: one producer made 125-145 inserts/s at 10 and 1,000 rows per insert, so its rate is set by --batch-size: 10 rows -> 1,408 rows/s, 1,000 rows -> 99,333 rows/s, 100,000 rows -> 362,476 rows/s (best async_insert, including making the batch).
      http: the engine queued no insert as async (system.events AsyncInsertQuery did not move), so async_insert=1 and 0 ran the same synchronous path (1.00x to 1.05x apart: noise). chDB accepts the setting and ignores it; measure async_insert on a real server (--targets server).
      embedded: one producer made 225-264 inserts/s at 10 and 1,000 rows per insert, so its rate is set by --batch-size: 10 rows -> 2,496 rows/s, 1,000 rows -> 157,289 rows/s, 100,000 rows -> 389,907 rows/s (best async_insert, including making the batch).
      embedded: the engine queued no insert as async (system.events AsyncInsertQuery did not move), so async_insert=1 and 0 ran the same synchronous path (1.01x to 1.04x apart: noise). chDB accepts the setting and ignores it; measure async_insert on a real server (--targets server).
      README: for a rate R rows/s from one producer, set --batch-size to R x --interval and keep it >= 1,000 rows per insert, about one insert per second; 1,000-row inserts carried 99,333 rows/s here (the demo writes 200), so one producer is not the limit. Leave async_insert at the server's default for one producer with large batches; it is for many small concurrent writers (neither measured here).

It exits 1 if a table ends up with a row count other than the rows inserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import clickhouse_connect  # noqa: E402
import numpy as np  # noqa: E402

import connection  # noqa: E402
import producer  # noqa: E402
from chdb_http import running  # noqa: E402

DATABASE = "demo"
POOL = 4  # distinct batches per size, reused round robin (each insert has its own dedup token)
HARNESS_NOTE = ("http = tests/chdb_http.py, a TEST HARNESS, NOT A CLICKHOUSE SERVER: one query at a time, "
                "each insert body via a temp file; a real server is faster and runs producers in parallel")


class WrongCount(Exception):
    pass


@dataclass
class Cell:
    target: str
    batch: int
    async_insert: int
    rows: int = 0
    inserts: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    make_rows_per_s: float = 0.0
    async_queries: int = 0  # inserts the engine queued as async inserts (system.events AsyncInsertQuery)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def inserts_per_s(self) -> float:
        return self.inserts / self.seconds

    @property
    def with_make_rows_per_s(self) -> float:
        return 1 / (1 / self.rows_per_s + 1 / self.make_rows_per_s)


def make_rows_per_s(market: producer.Market, batch: int) -> tuple[list, float]:
    """POOL batches of `batch` rows, and Market.batch's rate in rows/s (warm, at least 0.3 s of calls)."""
    batches = [market.batch(batch, time.time_ns() // 1_000_000) for _ in range(POOL)]
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < 0.3:
        market.batch(batch, time.time_ns() // 1_000_000)
        calls += 1
    return batches, calls * batch / (time.perf_counter() - started)


def async_insert_queries(client) -> int:
    rows = client.query("SELECT sum(value) FROM system.events WHERE event = 'AsyncInsertQuery'").result_rows
    return int(rows[0][0] or 0) if rows else 0


def run_cell(client, cell: Cell, batches: list, seconds: float) -> Cell:
    table = f"capacity_{cell.target}_{cell.batch}_{cell.async_insert}"
    client.command(f"DROP TABLE IF EXISTS {table}")
    producer.create_table(client, table)
    worker = producer.Producer(client, producer.ProducerSettings(batch_size=cell.batch, table=table,
                                                                 max_pending_rows=max(cell.batch, 1_000_000)))
    # One untimed insert: the first into a new table pays for setting it up.
    worker.pending.append(producer.Batch(batches[0], uuid.uuid4().hex))
    worker.flush()
    first = worker.inserted_rows
    queued = async_insert_queries(client)
    started = time.perf_counter()
    i = 0
    while True:
        worker.pending.append(producer.Batch(batches[i % len(batches)], uuid.uuid4().hex))
        t = time.perf_counter()
        worker.flush()
        cell.latencies.append(time.perf_counter() - t)
        i += 1
        if time.perf_counter() - started >= seconds:
            break
    cell.seconds = time.perf_counter() - started
    cell.rows = worker.inserted_rows - first
    cell.inserts = i
    cell.async_queries = async_insert_queries(client) - queued
    stored = client.query(f"SELECT count() FROM {table}").result_rows[0][0]
    if stored != worker.inserted_rows:
        raise WrongCount(f"{table}: {stored:,} rows stored, {worker.inserted_rows:,} inserted")
    client.command(f"DROP TABLE {table}")  # so its merges do not run under the next cell
    return cell


def server_settings():
    """The server producer.py would use: CLICKHOUSE_URL / CLICKHOUSE_* from the environment."""
    parser = argparse.ArgumentParser()
    connection.add_arguments(parser)
    return connection.settings_from_args(parser.parse_args([]))


def clients(target: str, harness) -> dict[int, object]:
    """One client per async_insert value, with the settings on the client."""
    out = {}
    for value in (0, 1):
        settings = {"async_insert": value, "wait_for_async_insert": 1}
        database = DATABASE
        if target == "http":
            client = harness.client(settings=settings, autogenerate_session_id=False)
        elif target == "server":
            ch = server_settings()
            database = ch.database
            client = clickhouse_connect.get_client(host=ch.host, port=ch.port, username=ch.username,
                                                   password=ch.password, secure=ch.secure, settings=settings,
                                                   autogenerate_session_id=False)
        else:
            client = clickhouse_connect.get_client(dsn="chdb://memory", settings=settings)
        client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        client.database = database
        got = client.query("SELECT getSetting('async_insert'), getSetting('wait_for_async_insert')").result_rows[0]
        if (int(got[0]), int(got[1])) != (value, 1):
            raise RuntimeError(f"{target}: client settings not applied (async_insert, wait = {got})")
        out[value] = client
    return out


def print_table(cells: list[Cell]) -> None:
    header = ("target", "batch rows", "async_insert", "queued async", "inserts", "rows/s", "inserts/s",
              "insert p50 ms", "p95 ms", "rows/s with make_batch")
    lines = [(c.target, f"{c.batch:,}", str(c.async_insert), f"{c.async_queries:,}", f"{c.inserts:,}",
              f"{c.rows_per_s:,.0f}",
              f"{c.inserts_per_s:,.1f}", f"{1000 * statistics.median(c.latencies):.1f}",
              f"{1000 * float(np.percentile(c.latencies, 95)):.1f}", f"{c.with_make_rows_per_s:,.0f}")
             for c in cells]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    print("\none producer, inserting back to back (wait_for_async_insert=1 throughout); queued async: inserts the "
          "engine put in its async insert queue")
    for row in [header, *lines]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    makes = sorted({(c.batch, c.make_rows_per_s) for c in cells})
    print("Market.batch (making a batch): " + ", ".join(f"{b:,} rows {r:,.0f} rows/s" for b, r in makes))


def advice(cells: list[Cell], target: str) -> list[str]:
    """Lines for the README, from the `target` rows of the table."""
    mine = {(c.batch, c.async_insert): c for c in cells if c.target == target}
    sizes = sorted({b for b, _ in mine})
    if not sizes:
        return []
    best = {b: max((mine[k] for k in mine if k[0] == b), key=lambda c: c.with_make_rows_per_s) for b in sizes}
    small = [b for b in sizes if b <= 1_000] or sizes[:1]
    per_s = [c.inserts_per_s for (b, _), c in mine.items() if b in small]
    lines = [f"{target}: one producer made {min(per_s):,.0f}-{max(per_s):,.0f} inserts/s at "
             f"{' and '.join(f'{b:,}' for b in small)} rows per insert, so its rate is set by --batch-size: "
             + ", ".join(f"{b:,} rows -> {best[b].with_make_rows_per_s:,.0f} rows/s" for b in sizes)
             + " (best async_insert, including making the batch)."]
    ratios = [mine[(b, 1)].rows_per_s / mine[(b, 0)].rows_per_s for b in sizes if (b, 0) in mine and (b, 1) in mine]
    if ratios and not any(c.async_queries for c in mine.values()):
        lines.append(f"{target}: the engine queued no insert as async (system.events AsyncInsertQuery did not move), "
                     f"so async_insert=1 and 0 ran the same synchronous path ({min(ratios):.2f}x to "
                     f"{max(ratios):.2f}x apart: noise). chDB accepts the setting and ignores it; measure "
                     "async_insert on a real server (--targets server).")
    elif ratios:
        if 0.8 <= min(ratios) and max(ratios) <= 1.25:
            verdict = "within 20% of each other, about this run-to-run noise: no difference for one producer"
        elif min(ratios) < 1 < max(ratios):
            verdict = "no consistent gain or loss for one producer"
        else:
            verdict = "async_insert=1 " + ("faster" if min(ratios) > 1 else "slower") + " throughout"
        lines.append(f"{target}: async_insert=1 vs 0 (wait_for_async_insert=1): {min(ratios):.2f}x to "
                     f"{max(ratios):.2f}x rows/s across batch sizes: {verdict}.")
    size = 1_000 if 1_000 in best else sizes[-1]
    rate = best[size].with_make_rows_per_s
    lines.append(f"README: for a rate R rows/s from one producer, set --batch-size to R x --interval and keep it "
                 f">= 1,000 rows per insert, about one insert per second; {size:,}-row inserts carried "
                 f"{rate:,.0f} rows/s here (the demo writes 200), so one producer is not the limit. Leave "
                 "async_insert at the server's default for one producer with large batches; it is for many small "
                 "concurrent writers (neither measured here).")
    return lines


def machine() -> dict:
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), "chdb": version("chdb"),
            "clickhouse-connect": version("clickhouse-connect"), "pyarrow": version("pyarrow")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Highest sustained insert rate of one producer.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 1_000, 100_000],
                        help="rows per insert (default 10 1000 100000)")
    parser.add_argument("--seconds", type=float, default=10, help="seconds per cell (default 10)")
    parser.add_argument("--targets", nargs="+", choices=("http", "embedded", "server"), default=["http"],
                        help="http: the chDB HTTP test harness (default); embedded: chdb:// in this process; "
                             "server: the real ClickHouse named by CLICKHOUSE_URL / CLICKHOUSE_* (never by default)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: --batch-sizes 10 1000 --seconds 1")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.seconds = [10, 1_000], 1
    if min(args.batch_sizes) < 1 or args.seconds <= 0:
        parser.error("--batch-sizes must be >= 1 and --seconds > 0")
    args.batch_sizes = sorted(set(args.batch_sizes))
    args.targets = list(dict.fromkeys(args.targets))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if "http" in args.targets:
        print(HARNESS_NOTE)
    if "embedded" in args.targets:
        print("embedded = chDB in this process (no HTTP)")
    if "server" in args.targets:
        print(f"server = {server_settings().describe()}")
    market = producer.Market(seed=1)
    pools = {b: make_rows_per_s(market, b) for b in args.batch_sizes}
    cells: list[Cell] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
            for target in args.targets:
                if target == "http":
                    context = running(Path(tmp) / "chdb", log_path=Path(tmp) / "harness.log")
                else:
                    context = contextlib.nullcontext()
                with context as harness:
                    by_async = clients(target, harness)
                    for batch in args.batch_sizes:
                        batches, make_rate = pools[batch]
                        for value in (0, 1):
                            cell = run_cell(by_async[value], Cell(target, batch, value, make_rows_per_s=make_rate),
                                            batches, args.seconds)
                            cells.append(cell)
                            print(f"  {target:8} {batch:>7,} rows  async_insert={value}  {cell.rows_per_s:>10,.0f} "
                                  f"rows/s  {cell.inserts_per_s:>7,.1f} inserts/s", flush=True)
                    for client in by_async.values():
                        client.close()
    except WrongCount as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print_table(cells)
    lines = [line for target in args.targets for line in advice(cells, target)]
    lines = [line for line in lines if not line.startswith("README:")] + \
        [line for line in advice(cells, args.targets[0]) if line.startswith("README:")]
    print("\nadvice:")
    for line in lines:
        print("  " + line)

    if args.json:
        best = {}
        for c in cells:
            if c.target == args.targets[0]:
                best[c.batch] = max(best.get(c.batch, 0), c.with_make_rows_per_s)
        payload = {
            "machine": info,
            "note": HARNESS_NOTE,
            "settings": {"batch_sizes": args.batch_sizes, "seconds": args.seconds, "targets": args.targets},
            "results": [{"target": c.target, "batch": c.batch, "async_insert": c.async_insert, "rows": c.rows,
                         "inserts": c.inserts, "seconds": c.seconds, "rows_per_s": c.rows_per_s,
                         "inserts_per_s": c.inserts_per_s, "queued_async": c.async_queries,
                         "insert_p50_ms": 1000 * statistics.median(c.latencies),
                         "insert_p95_ms": 1000 * float(np.percentile(c.latencies, 95)),
                         "make_rows_per_s": c.make_rows_per_s, "with_make_rows_per_s": c.with_make_rows_per_s}
                        for c in cells],
            "advice": lines,
            "summary": [{"figure": f"producer rows/s, {b:,}-row batches ({args.targets[0]}, best async_insert, "
                                   "incl. make_batch)",
                         "value": f"{rate:,.0f}", "target": "n/a (capacity)", "met": None}
                        for b, rate in sorted(best.items())],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
