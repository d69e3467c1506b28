"""History (chapter 4): first viewport of a 10M-row pivot, computed in ClickHouse.

Side by side in one run, on the same rows in chDB:

* history.py: time from a view request to its first viewport (view, row
  count, the first 50 rows: what the grid asks first), for a flat view,
  group-by ticker, ticker x split-by client, and a 1-minute bucket (grouped
  by a MATERIALIZED `minute` column: expressions are off on /history, so
  that is how a user groups by minute);
* the same pivots after loading rows into a Perspective table (load time
  and the process's RSS growth; 2M rows by default, --perspective-rows,
  because 10M rows would take about 10 GB on a shared machine);
* Perspective's bundled ClickHouse virtual server, where it runs at all;
* RSS growth over a session of repeated history views (--session-seconds,
  2 minutes by default: shortened from "a long session").

The client speaks Perspective's protocol to the VirtualServer in process,
byte for byte as over the websocket, without the network.

    python bench/history.py                # 10M rows: a few minutes
    python bench/history.py --smoke        # 200k rows, seconds: only shows it runs
    python bench/history.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clickhouse_connect  # noqa: E402
import perspective  # noqa: E402

import history  # noqa: E402
from clickhouse_types import map_columns  # noqa: E402

CREATE = """
CREATE TABLE stock_values (
    inserted_at DateTime64(6, 'UTC'), id UUID, timestamp DateTime64(3, 'UTC'),
    ticker LowCardinality(String), client LowCardinality(String),
    open Float64, high Float64, low Float64, close Float64, volume UInt32, date Date,
    minute DateTime MATERIALIZED toStartOfMinute(timestamp)
) ENGINE = MergeTree ORDER BY (inserted_at, id)
"""
FILL = """
INSERT INTO stock_values (inserted_at, id, timestamp, ticker, client, open, high, low, close, volume, date)
SELECT toDateTime64('2024-01-01 00:00:00', 6, 'UTC') + toIntervalMicrosecond(number * 10),
       generateUUIDv4(number), toDateTime64('2024-01-01 09:30:00', 3, 'UTC') + toIntervalMillisecond(number * 3),
       ['AAPL','MSFT','GOOG','AMZN','TSLA','META','NFLX','NVDA','ORCL','IBM'][1 + number % 10],
       ['alice','bob','carol','dave','erin'][1 + intDiv(number, 7) % 5],
       100 + number % 97, 101 + number % 97, 99 + number % 97, 100 + (number % 9973) / 100, number % 5000,
       toDate('2024-01-01') + intDiv(number, 1000000)
FROM numbers({rows:UInt64})
"""
PIVOTS = {
    "flat": {"columns": ["ticker", "close", "volume"]},
    "group-by ticker": {"columns": ["close", "volume"], "group_by": ["ticker"], "aggregates": {"close": "avg"}},
    "ticker x split-by client": {"columns": ["close"], "group_by": ["ticker"], "split_by": ["client"],
                                 "aggregates": {"close": "avg"}},
    "group-by 1-minute bucket": {"columns": ["close", "volume"], "group_by": ["minute"],
                                 "aggregates": {"close": "last"}},
}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def first_viewport(table, config) -> float:
    started = time.perf_counter()
    view = table.view(**config)
    view.num_rows()
    view.to_columns(start_row=0, end_row=50)
    elapsed = time.perf_counter() - started
    view.delete()
    return elapsed


def best_of(table, config, repeat: int) -> float:
    return min(first_viewport(table, config) for _ in range(repeat))


def history_client(database: str):
    def connect():
        client = clickhouse_connect.get_client(dsn="chdb://memory")
        client.database = database
        return client

    source = history.History(connect, "stock_values", "inserted_at", hidden=("id",))
    session = source.new_session(callback=None)
    client = None
    client = perspective.Client(lambda request: client.handle_response(session._answer(request)))
    return source, client.open_table("stock_values")


def upstream_attempt(admin, config) -> str:
    """Perspective's bundled ClickHouse virtual server on the same table."""
    from perspective.virtual_servers.clickhouse import ClickhouseVirtualServerHandler
    server = perspective.VirtualServer(ClickhouseVirtualServerHandler(admin))
    client = None
    client = perspective.Client(lambda request: client.handle_response(server.handle_request(request)))
    try:
        table = client.open_table("stock_values")
        return f"{best_of(table, config, 1) * 1000:.0f} ms"
    except BaseException as error:  # noqa: BLE001 - we report whatever it does
        text = str(error)
        reason = (re.search(r"DB::Exception: (.{0,70})", text) or re.search(r"value: \w+\((.{0,70})", text))
        return "fails: " + (reason.group(1) if reason else text[:70])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--session-seconds", type=float, default=120)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--perspective-rows", type=int, default=2_000_000,
                        help="rows loaded into the Perspective table for comparison (default 2M: 10M rows "
                             "would take ~10 GB of RSS on a shared machine); 0 skips it")
    parser.add_argument("--smoke", action="store_true", help="200k rows, 3 s session: shows that it runs")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.session_seconds, args.repeat, args.perspective_rows = 200_000, 3, 1, 200_000

    database = f"bench_{uuid.uuid4().hex[:8]}"
    admin = clickhouse_connect.get_client(dsn="chdb://memory")
    admin.command(f"CREATE DATABASE {database}")
    admin.database = database
    admin.command(CREATE)
    started = time.perf_counter()
    admin.command(FILL, parameters={"rows": args.rows})
    print(f"{args.rows:,} rows inserted in {time.perf_counter() - started:.1f} s", flush=True)

    rss_start = rss_mb()
    source, table = history_client(database)
    results = {"rows": args.rows, "history_ms": {}, "perspective_ms": {}, "upstream": {}}
    for name, config in PIVOTS.items():
        results["history_ms"][name] = best_of(table, config, args.repeat) * 1000
        print(f"history      {name:28} {results['history_ms'][name]:8.0f} ms", flush=True)
    for name, config in PIVOTS.items():
        if name != "group-by 1-minute bucket":
            results["upstream"][name] = upstream_attempt(admin, config)
            print(f"upstream     {name:28} {results['upstream'][name]}", flush=True)

    # A session of repeated views: RSS must not grow with the number of views.
    rss_before_session = rss_mb()
    deadline, views = time.monotonic() + args.session_seconds, 0
    while time.monotonic() < deadline:
        for config in PIVOTS.values():
            first_viewport(table, config)
            views += 1
    results["session"] = {"seconds": args.session_seconds, "views": views,
                          "rss_growth_mb": rss_mb() - rss_before_session, "rss_mb": rss_mb()}
    print(f"history session: {views} views in {args.session_seconds:g} s, RSS {rss_before_session:.0f} -> "
          f"{rss_mb():.0f} MB", flush=True)
    source.close()

    if args.perspective_rows:
        rss_before_load = rss_mb()
        described = admin.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                "AND table = 'stock_values' AND name NOT IN ('id') ORDER BY position").result_rows
        columns, _ = map_columns(described)
        started = time.perf_counter()
        arrow = admin.query_arrow(f"SELECT {', '.join(c.select for c in columns)} FROM stock_values "
                                  f"ORDER BY inserted_at LIMIT {int(args.perspective_rows)}")
        local = perspective.Server().new_local_client().table(arrow)
        del arrow
        results["perspective_load_s"] = time.perf_counter() - started
        results["perspective_rss_mb"] = rss_mb() - rss_before_load
        results["perspective_rows"] = min(args.perspective_rows, args.rows)
        print(f"perspective  load {results['perspective_rows']:,} rows {results['perspective_load_s']:.1f} s, "
              f"+{results['perspective_rss_mb']:.0f} MB RSS", flush=True)
        for name, config in PIVOTS.items():
            results["perspective_ms"][name] = best_of(local, config, args.repeat) * 1000
            print(f"perspective  {name:28} {results['perspective_ms'][name]:8.0f} ms", flush=True)
    admin.command(f"DROP DATABASE {database}")

    grouped = results["history_ms"]["group-by ticker"]
    growth = results["session"]["rss_growth_mb"]
    summary = [
        {"figure": f"history first viewport, group-by ticker ({args.rows:,} rows)", "value": f"{grouped:.0f} ms",
         "target": "<= 1000 ms", "met": grouped <= 1000},
        {"figure": "history first viewport, ticker x split-by client",
         "value": f"{results['history_ms']['ticker x split-by client']:.0f} ms", "target": "n/a", "met": None},
        {"figure": "history first viewport, flat / 1-minute bucket",
         "value": f"{results['history_ms']['flat']:.0f} / {results['history_ms']['group-by 1-minute bucket']:.0f} ms",
         "target": "n/a", "met": None},
        {"figure": f"history RSS growth over a {args.session_seconds:g} s session ({views} views)",
         "value": f"{growth:+.0f} MB", "target": "<= 100 MB", "met": growth <= 100},
    ]
    if results["perspective_ms"]:
        summary.append({"figure": f"Perspective table: load {results['perspective_rows']:,} rows, RSS growth",
                        "value": f"{results['perspective_load_s']:.1f} s, +{results['perspective_rss_mb']:.0f} MB",
                        "target": "n/a", "met": None})
    print(f"\nRSS at start {rss_start:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
