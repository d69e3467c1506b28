"""How fast do rows get from ClickHouse into a Perspective table?

A benchmark, not a test. It fills the producer's `stock_values` table in an
embedded ClickHouse (chDB, in memory) with N rows from `producer.Market`, then
times the ways of loading those same N rows into a fresh Perspective table:

  a. this project's path, exactly what perspective_server.py runs at start:
     `Sync(tail, table).backfill(N)`: `Tail.backfill` reads the rows in
     pages of up to a million (one Arrow query each, by cursor range) on a
     second thread, while this one hands the page before to
     `Table.update(arrow_table)`;
  b. the predecessor's path: `query_df("SELECT * ...")` ->
     `df.to_dict("records")` -> `Table.update(records)`. Perspective 4.3.0
     serialises a list of dicts with Python's json module, which rejects
     pandas Timestamps and UUIDs (the predecessor patched json.JSONEncoder
     globally). Here the datetime columns are converted to int64 ms since the
     epoch and the UUID column to str, vectorised in pandas before to_dict;
     that conversion is inside the timing. It is cheaper than a per-value
     encoder hook, so this path is, if anything, flattered;
  c. the ceiling: only `Table.update(ipc_bytes)` of the same rows as one
     Arrow IPC buffer, made before the clock starts. No ClickHouse path can
     beat it;
  d. the same, but in the chunks path (a) loads (one IPC buffer each, made
     beforehand). Perspective takes the first update into an empty table on
     a fast path, and every later one costs it about 1.7x as much per row,
     so (a) / (d) is the share of the time that is ours at (a)'s chunking.

Each runs for two column sets, side by side: `key-hidden`, what the server
really does (its --key column `id` stays out of Perspective unless
--show-key), and `with-id`, the unique UUID strings included.

Each timed run gets a new perspective.Server, a table made as the server
makes it (from the tail's empty Arrow batch) with `limit=N`, and ends with
`table.size()` (inside the timing, so deferred work is counted) which must
equal N. Paths run interleaved (a, c, b, a, c, b, ...) so drift hits all of
them alike, with the records path last in each round because of the memory
it leaves behind; rows/s is from the best of --repeat runs, the median is
shown beside it. A thread samples RSS every 5 ms during each run: the table
shows the peak and the peak divided by the RSS right after the run (the
loaded table still alive).

Run it from the repository root:

    .venv/bin/python bench/sync_throughput.py                       # 1,000,000 rows, best of 3
    .venv/bin/python bench/sync_throughput.py --rows 1000000 5000000 --records-max-rows 1000000
    .venv/bin/python bench/sync_throughput.py --rows 20000 --repeat 1   # CI smoke run, a few seconds
    .venv/bin/python bench/sync_throughput.py --configs key-hidden --json results.json

bench/README.md has the figures measured on this repository's machine.
Timings on small shared VMs vary by 20-30% from run to run.

It exits 1 if a table ends up with a row count other than N.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clickhouse_connect  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import perspective  # noqa: E402
import pyarrow as pa  # noqa: E402

import producer  # noqa: E402
from clickhouse_types import quote  # noqa: E402
from perspective_server import Sync, to_ipc  # noqa: E402
from tailer import CURSOR, Tail  # noqa: E402

TABLE = "stock_values"
DATABASE = "demo"
CHUNK = 100_000  # rows per insert while filling the table
START_MS = 1_700_000_000_000  # event time (ms) of the first batch; later batches add the rows before them
OVERLAP = 3.0  # perspective_server.py's default --overlap

PATHS = {
    "tail": "a. paged Tail -> update (this)",
    "records": "b. query_df -> records -> update",
    "ceiling": "c. update(IPC) only (ceiling)",
    "chunked": "d. update(IPC) in a.'s chunks",
}
# Column sets. The server keeps its --key column (`id`) out of Perspective
# unless --show-key, so "key hidden" is what it really does.
CONFIGS = {
    "key-hidden": ("id",),
    "with-id": (),
}

# Run order within a round: the records path last, because it leaves the
# most memory behind (gigabytes at 5M rows) for the allocator to hand back.
RUN_ORDER = ("tail", "ceiling", "chunked", "records")


class SizeMismatch(Exception):
    pass


@dataclass
class Result:
    path: str
    rows: int
    config: str = ""
    seconds: list[float] = field(default_factory=list)
    # RSS (GB) before a run, at its peak, and after it with the table alive.
    rss_before_gb: list[float] = field(default_factory=list)
    rss_peak_gb: list[float] = field(default_factory=list)
    rss_after_gb: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.best


# ---- the data ------------------------------------------------------------

def connect():
    client = clickhouse_connect.get_client(dsn="chdb://memory")
    client.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
    client.database = DATABASE
    producer.create_table(client, TABLE)
    return client


def fill(client, market: producer.Market, have: int, want: int) -> int:
    """Inserts rows until the table holds `want`; returns the new count."""
    while have < want:
        rows = min(CHUNK, want - have)
        client.insert_arrow(TABLE, market.batch(rows, START_MS + have))
        have += rows
    # One part: background merges would otherwise compete with the timed runs.
    client.command(f"OPTIMIZE TABLE {TABLE} FINAL")
    count = client.query(f"SELECT count() FROM {TABLE}").result_rows[0][0]
    if count != want:
        raise SizeMismatch(f"{TABLE} holds {count:,} rows after filling, expected {want:,}")
    return count


def new_tail(client, exclude: tuple[str, ...] = ()) -> Tail:
    tail = Tail(client, TABLE, "inserted_at", "id", OVERLAP)
    tail.describe()
    # --exclude: leave columns out of the Perspective table. The key is
    # still read (Tail selects `key_column` on its own), so dedup is unchanged.
    tail.columns = [column for column in tail.columns if column.name not in exclude]
    return tail


def release_memory() -> None:
    """Collects garbage and asks glibc to return freed heap pages to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_gb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError):
        return float("nan")


def new_table(schema: bytes, rows: int):
    """`schema` is the Arrow IPC of an empty batch, as the server creates its table."""
    return perspective.Server().new_local_client().table(schema, limit=rows)


def check_size(size: int, rows: int, path: str) -> None:
    if size != rows:
        raise SizeMismatch(f"{PATHS[path]}: Perspective table has {size:,} rows, expected {rows:,}")


# ---- the paths -----------------------------------------------------------
# Each returns (seconds from the first query to a table holding `rows`,
# peak RSS GB during that, RSS GB right after with the table alive).

def timed_load(path: str, schema, rows: int, load) -> tuple[float, float, float]:
    """Runs `load(table)` on a fresh table, timed and with RSS sampled."""
    table = new_table(schema, rows)
    with PeakRss() as peak:
        started = time.perf_counter()
        load(table)
        size = table.size()
        seconds = time.perf_counter() - started
    after = rss_gb()
    check_size(size, rows, path)
    table.delete()
    return seconds, peak.peak, after


def run_tail(client, schema, rows: int, exclude: tuple[str, ...]) -> tuple[float, float, float]:
    tail = new_tail(client, exclude)  # the server describes the table once, at start
    return timed_load("tail", schema, rows, lambda table: Sync(tail, table).backfill(rows))


def records_frame_to_json_safe(df: pd.DataFrame) -> pd.DataFrame:
    """What json.dumps needs: datetimes as int64 ms since the epoch, UUIDs as str."""
    for name in df.columns:
        column = df[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            if getattr(column.dt, "tz", None) is not None:
                column = column.dt.tz_convert("UTC").dt.tz_localize(None)
            df[name] = column.to_numpy().astype("datetime64[ms]").astype(np.int64)
        elif column.dtype == object and len(column) and not isinstance(column.iloc[0], str):
            df[name] = column.map(str)
    return df


def run_records(client, schema, rows: int, exclude: tuple[str, ...]) -> tuple[float, float, float]:
    columns = "*" if not exclude else "* EXCEPT (" + ", ".join(quote(name) for name in exclude) + ")"

    def load(table):
        df = client.query_df(f"SELECT {columns} FROM {TABLE} ORDER BY inserted_at DESC LIMIT {rows}")
        table.update(records_frame_to_json_safe(df).to_dict("records"))

    return timed_load("records", schema, rows, load)


def ceiling_ipc(client, rows: int, exclude: tuple[str, ...]) -> tuple[bytes, list[bytes]]:
    """The rows path (a) hands to Table.update, made outside any timing: as
    one IPC buffer (c), and as one buffer per chunk of path (a) (d)."""
    chunks = [chunk.drop_columns([CURSOR]) for chunk in new_tail(client, exclude).backfill(rows)]
    return to_ipc(pa.concat_tables(chunks)), [to_ipc(chunk) for chunk in chunks]


def run_ceiling(ipc: bytes, schema, rows: int) -> tuple[float, float, float]:
    return timed_load("ceiling", schema, rows, lambda table: table.update(ipc))


def run_chunked(ipcs: list[bytes], schema, rows: int) -> tuple[float, float, float]:
    """Perspective's own ingest of the same rows in the same chunks as path
    (a): every update after the first into a table costs Perspective more
    per row than the first (bench/README.md), and this shows how much."""
    def load(table):
        for ipc in ipcs:
            table.update(ipc)

    return timed_load("chunked", schema, rows, load)


# ---- memory --------------------------------------------------------------

class PeakRss:
    """Samples this process's RSS every few ms while a path runs."""

    def __init__(self, every_s: float = 0.005):
        self.every_s = every_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_gb())
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gb())


# ---- report --------------------------------------------------------------

def machine(client) -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {
        "nproc": cpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "perspective-python": version("perspective-python"),
        "clickhouse-connect": version("clickhouse-connect"),
        "chdb": version("chdb"),
        "clickhouse": client.query("SELECT version()").result_rows[0][0],
        "pyarrow": version("pyarrow"),
        "pandas": version("pandas"),
    }


def print_results(results: list[Result], repeat: int) -> None:
    header = ("configuration", "path", "rows", "best s", "median s", "rows/s", "vs records", "% of ceiling",
              "% of d.", "peak RSS", "peak / after")
    lines = []
    for result in results:
        same = {r.path: r for r in results if r.rows == result.rows and r.config == result.config}
        records = same.get("records")
        ceiling = same.get("ceiling")
        chunked = same.get("chunked")
        peak, after = max(result.rss_peak_gb), min(result.rss_after_gb)
        lines.append((
            result.config,
            PATHS[result.path],
            f"{result.rows:,}",
            f"{result.best:.3f}",
            f"{result.median:.3f}",
            f"{result.rows_per_s:,.0f}",
            f"{result.rows_per_s / records.rows_per_s:.1f}x" if records else "n/a",
            f"{100 * result.rows_per_s / ceiling.rows_per_s:.0f}%" if ceiling else "n/a",
            f"{100 * result.rows_per_s / chunked.rows_per_s:.0f}%" if chunked else "n/a",
            f"{peak:.2f} GB",
            f"{peak / after:.2f}x",
        ))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    print(f"\nrows/s from the best of {repeat} run(s); each run loads a fresh Perspective table")
    for row in [header, *lines]:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


# ---- main ----------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ClickHouse -> Perspective sync throughput, four paths side by side.")
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000],
                        help="table sizes to measure (default 1000000); several run one after another")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per path and size (default 3)")
    parser.add_argument("--records-max-rows", type=int, default=None,
                        help="skip the slow records path (b) above this many rows (default: never skip)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="which column sets to measure (default: both, the server's own first)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.rows) < 1:
        parser.error("--rows must be at least 1")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def measure(client, config: str, rows: int, args) -> list[Result]:
    """All paths for one column set and one size, interleaved, --repeat times."""
    exclude = CONFIGS[config]
    schema = to_ipc(new_tail(client, exclude).empty())
    ipc, chunk_ipcs = ceiling_ipc(client, rows, exclude)
    with_records = args.records_max_rows is None or rows <= args.records_max_rows
    if not with_records:
        print(f"  records path skipped: {rows:,} > --records-max-rows {args.records_max_rows:,}")
    runs = {path: Result(path, rows, config) for path in PATHS if with_records or path != "records"}
    for attempt in range(args.repeat):
        for path in RUN_ORDER:
            if path not in runs:
                continue
            release_memory()
            before = rss_gb()
            if path == "tail":
                seconds, peak, after = run_tail(client, schema, rows, exclude)
            elif path == "records":
                seconds, peak, after = run_records(client, schema, rows, exclude)
            elif path == "chunked":
                seconds, peak, after = run_chunked(chunk_ipcs, schema, rows)
            else:
                seconds, peak, after = run_ceiling(ipc, schema, rows)
            run = runs[path]
            run.seconds.append(seconds)
            run.rss_before_gb.append(before)
            run.rss_peak_gb.append(peak)
            run.rss_after_gb.append(after)
            print(f"  run {attempt + 1}/{args.repeat}  {PATHS[path]:<34} {seconds:8.3f} s"
                  f"  {rows / seconds:>12,.0f} rows/s   RSS {before:.2f} -> peak {peak:.2f} -> {after:.2f} GB",
                  flush=True)
    del ipc, chunk_ipcs
    return [runs[p] for p in PATHS if p in runs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = connect()
    info = machine(client)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("records path (b): datetimes -> int64 ms and UUID -> str in pandas before to_dict, timed")
    market = producer.Market(seed=1)
    have = 0
    results: list[Result] = []
    try:
        for rows in sorted(set(args.rows)):
            started = time.perf_counter()
            have = fill(client, market, have, rows)
            print(f"\n{rows:,} rows in {TABLE} (filled in {time.perf_counter() - started:.1f} s)", flush=True)
            for config in args.configs:
                print(f" {config}:")
                results.extend(measure(client, config, rows, args))
    except SizeMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print_results(results, args.repeat)
    if args.json:
        payload = {
            "machine": info,
            "repeat": args.repeat,
            "configs": {name: list(CONFIGS[name]) for name in args.configs},
            "records_conversion": "datetime64 -> int64 ms, UUID -> str (pandas, vectorised), inside the timing",
            "results": [{**asdict(r), "best_s": r.best, "median_s": r.median, "rows_per_s": r.rows_per_s}
                        for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
