"""Does every viewer get every row, at 10x the demo's insert rate?

A benchmark, not a test. It starts the real server (`python
perspective_server.py --port P`, default settings: --interval 0.1, --limit
10,000) in its own process against the chDB test harness (tests/chdb_http.py,
chDB behind ClickHouse's HTTP interface), connects --viewers websocket
viewers (perspective AsyncClients, as tests/servers.py open_viewer makes
them), each holding a view of the hosted table with an
`on_update(mode="row")` callback, and inserts 1,000 rows every 500 ms
(2,000 rows/s: 10x producer.py's 100 rows every 500 ms, in the larger
batches the README recommends; --batch-size 100 --batch-interval 0.05 is the
same rate in small inserts) for --seconds.

Each batch's `timestamp` is the wall-clock time just before its insert call
and is distinct per batch, so it is the batch id. Each viewer counts, from
its row deltas, the rows it received per batch; a viewer "missed" something
if any batch is absent or short (fewer rows than were inserted). The run
waits for every viewer to see the last batch (--drain), then reads the
hosted table's size, which must be min(rows in ClickHouse, --limit).

Figures, per --viewers value (several values run one after another against
the same server, each with fresh connections):

  lag      at each on_update: now - newest timestamp in the update, pooled
           over all viewers (p50, p95, max); "every batch" is the stricter
           now - timestamp of each batch when a viewer first saw it;
  spread   per batch, last viewer - first viewer to see it (p95): the cost
           of serving one more viewer;
  CPU      of the server process, from /proc/<pid>/stat utime+stime over
           the run, as % of one core; the harness's and this bench's own
           (the viewers' side) beside it. Over 100% means more than one core.

Run it from the repository root:

    python bench/fanout.py                         # 50 viewers, 30 s
    python bench/fanout.py --viewers 1 10 50       # the same server, three runs
    python bench/fanout.py --page none dashboard   # one counting view per viewer, then the dashboard
    python bench/fanout.py --smoke                 # CI: 5 viewers, 5 s, < 20 s in all
    python bench/fanout.py --json fanout.json

Before the dashboard, each viewer held its counting view only (what --page
none measures now). Sample output then (2 cores shared with other work,
load average 1.5-3, perspective-python 4.3.0, chDB 4.4.0 behind
tests/chdb_http.py):

    $ python bench/fanout.py
    fanout: 1,000 rows every 0.5 s (2,000 rows/s, 10x the demo; each sent up to 250 ms after its tick), 30 s per run; perspective_server.py defaults (--interval 0.25, --overlap 3, --limit 10,000)
    viewers  batches  rows each  viewers missing rows  lag p50 ms  lag p95 ms  lag max ms  every-batch p95 ms  spread p95 ms  server CPU  chdb_http CPU  bench CPU
         50       60     60,000                  0/50         224         321         349                 321             19         19%            11%         3%
    50 viewer(s): 60,000 rows sent, each viewer received 60,000-60,000; table size 10,000 (expected 10,000 = min(rows in ClickHouse 61,000, --limit 10,000)); insert call p50 16 / p95 25 ms, server log (inserted_at -> Perspective table): p50 238 / max 517 ms; p50 168 / max 292 ms; p50 205 / max 318 ms

    $ python bench/fanout.py --viewers 1 50 --seconds 20
    viewers  batches  rows each  viewers missing rows  lag p50 ms  lag p95 ms  lag max ms  every-batch p95 ms  spread p95 ms  server CPU  chdb_http CPU  bench CPU
          1       40     40,000                   0/1         165         256         269                 256              0          4%             9%         2%
         50       40     40,000                  0/50         262         349         365                 349             12         23%            10%         3%
    ...
    server CPU per extra viewer: 0.40% of one core (1 -> 50 viewers)

(The server's first 10-second log report includes the backfill of the one
batch inserted before it started, hence its larger max.) Nearly all of the
lag is the server's own, before the websocket: its log (inserted_at -> its
Perspective table, measured after Table.update returns) is within ~20 ms of
what the viewers see, and the last of 50 viewers gets a batch 10-20 ms after
the first. That is the wait for the next 250 ms poll plus the poll itself,
which at this rate re-reads the 3 s overlap (6,000 rows) and, inside
Table.update, builds a row delta for each of the 50 views: 50 viewers add
~60-100 ms to the p50 of 1 viewer. --server-interval 0.1 gave a lag p95 of
229 ms at the same server CPU (22%; chdb_http 18%).

Each viewer stands for one browser on the dashboard (--page dashboard, the
default): besides its counting view it holds every default view of
index.html, with the configs the page's own viewers hold (read once from the
page in headless Chromium, so the bench follows index.html), and after each
update reads each view again as its plugin does: a chart its whole
aggregated view (to_columns), a grid the first 40 rows (a screenful). One
re-read per view is in flight at a time; updates that arrive meanwhile are
folded into one more, as the viewer's render throttle does. --page none is
the counting view alone (one row-delta view per browser, the old single-grid
page's cost in this model); `--page none dashboard` runs both, one after the
other against the same server, for a side-by-side ratio. The browsers are
modelled in Python rather than run: 50 real Chromium pages would take the
two cores the server is being measured on.

With the dashboard, on the same machine under heavier load from other work
(load average 5-11 on 2 cores, so each figure below is higher than on a
quiet machine; the ratios come from one run each):

    $ python bench/fanout.py --viewers 50 --page none dashboard --seconds 20
    viewers  page       redraws each  batches  rows each  viewers missing rows  lag p50 ms  lag p95 ms  server CPU
         50  none                  0       40     40,000                  0/50         284         617         38%
         50  dashboard            20       39     31,000                 50/50       6,995      12,094         85%

    $ python bench/fanout.py --viewers 50 --page none dashboard --seconds 20 --batch-size 100   # the demo's rate
         50  none                  0       40      4,000                  0/50         103         147         12%
         50  dashboard           131       40      4,000                  0/50         565       1,299         67%

(columns trimmed). At 10x the demo's rate 50 dashboards are more than the
server can compute: it falls behind (its own log lag grows to 12 s) and the
viewers have not caught up when the drain ends. At the demo's rate it keeps
up (every row, server log lag p50 ~350 ms) at 5-6x the CPU of 50 one-view
clients. The reason is that Perspective computes every view on every update,
for every browser: 50 dashboards are 250 views. Per view and per 100-row
update, measured in-process on a 10,000-row table (perspective-python 4.3.0):
a candlestick grouped by `timestamp` 0.9 ms, the same grouped by a
`bucket("timestamp", '1s')` expression 4.7 ms; the line chart 1.5 ms (5.8
with the bucket); the pivot 2.0 ms, but 13.4 ms with a summed expression
column (`"close" * "volume"`); the sorted blotter 3.4 ms. The default views
avoid both costly forms, which took a dashboard from about 30 to about 8 ms
per update. What is left scales with browsers x views; sharing one set of
views among all browsers (server-side aggregates) would be the next step.

All viewers live in this one process, so their lag includes this process's
own queueing; the bench CPU column shows how busy it was. It exits 1 if any
viewer missed a row or the table size is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import freshness  # noqa: E402  (also puts the repository and tests/ on sys.path)
import producer  # noqa: E402

TABLE = freshness.TABLE
LIMIT = 10_000  # perspective_server.py's default --limit
GRID_ROWS = 40  # rows a datagrid reads per redraw: what fits on screen, plus a margin

# The keys of a viewer config that shape the view the server computes (the
# rest, e.g. plugin, title or theme, only change how the browser draws it).
VIEW_KEYS = ("group_by", "split_by", "columns", "aggregates", "expressions", "filter", "sort",
             "group_rollup_mode")

SYNCED = re.compile(r"synced ([\d,]+) rows \((\d+) rows/s\), lag p50 (\d+) ms / max (\d+) ms, (\d+) viewer")


def read_page_views(url: str) -> dict[str, tuple[dict, bool]]:
    """The dashboard's default views as the page sets them up: name -> (view config, is a grid).

    Read from a fresh browser profile, so no saved layout of a user's gets in.
    """
    import browser

    with browser.launch_chromium() as context:
        router = browser.CdnRouter().install(context)
        page = context.new_page()
        page.goto(url)
        browser.wait_for_status(page, "live", timeout_ms=60_000)
        configs = {name: browser.viewer_config(page, name) for name in browser.view_names(page)}
        router.assert_ok()
    return {name: ({key: config[key] for key in VIEW_KEYS if config.get(key)}, config["plugin"] == "Datagrid")
            for name, config in configs.items()}


class Dashboard:
    """One browser's dashboard: the page's views on its connection, re-read after every update."""

    def __init__(self):
        self.redraws = 0
        self.errors: list[str] = []
        self._busy: set[str] = set()
        self._dirty: set[str] = set()

    async def open(self, table, page_views: dict[str, tuple[dict, bool]]) -> None:
        for name, (config, is_grid) in page_views.items():
            view = await table.view(**config)
            read = (functools.partial(view.to_columns_string, start_row=0, end_row=GRID_ROWS) if is_grid
                    else view.to_columns_string)
            await read()  # the first draw
            await view.on_update(functools.partial(self._updated, name, read))

    def _updated(self, name: str, read, *_) -> None:
        if name in self._busy:
            self._dirty.add(name)  # folded into the re-read after the one in flight
        else:
            self._busy.add(name)
            asyncio.ensure_future(self._redraw(name, read))

    async def _redraw(self, name: str, read) -> None:
        try:
            while True:
                self._dirty.discard(name)
                await read()
                self.redraws += 1
                if name not in self._dirty:
                    break
        except Exception as error:  # reported with the run's figures
            self.errors.append(f"{name}: {type(error).__name__}: {error}")
        finally:
            self._busy.discard(name)


async def measure(args, harness, database: str, port: int, server: freshness.Program, viewers: int,
                  page_views: dict[str, tuple[dict, bool]]) -> dict:
    client = harness.client(autogenerate_session_id=False, database=database)
    watchers = [freshness.Watcher(with_ids=False) for _ in range(viewers)]
    dashboards = [Dashboard() for _ in range(viewers)]
    connections = []
    connect_started = time.monotonic()
    for watcher, dashboard in zip(watchers, dashboards):
        connections.append(await freshness.subscribe(port, ["timestamp"], watcher))
        await dashboard.open(connections[-1][2], page_views)
    connect_s = time.monotonic() - connect_started
    log_offset = len(server.log())
    feed = freshness.Feed(client, args.batch_size, args.batch_interval, args.jitter)
    meters = {"server": freshness.CpuMeter(server.pid).start(),
              "chdb_http": freshness.CpuMeter(harness.proc.pid).start(),
              "bench": freshness.CpuMeter(os.getpid()).start()}
    started = time.monotonic()
    await feed.run(args.seconds)
    feed_s = time.monotonic() - started
    last = feed.sent[-1].ts_ms
    drained = await freshness.wait_until(lambda: all(last in w.first_seen for w in watchers), args.drain)
    cpu = {name: meter.stop() for name, meter in meters.items()}
    run_s = time.monotonic() - started
    _, _, table, _ = connections[0]
    size = await table.size()
    stored = client.command(f"SELECT count() FROM {TABLE}")
    for socket, reader, _, _ in connections:
        await freshness.close_viewer(socket, reader)
    feed.executor.shutdown()
    client.close()

    sent = [s.ts_ms for s in feed.sent]
    sent_set = set(sent)  # updates carrying only older rows (the warm-up batch) are not counted
    missed_viewers, missing_rows, extra_rows = 0, 0, 0
    every_batch, newest = [], []
    for watcher in watchers:
        short = sum(max(0, args.batch_size - watcher.rows.get(ts, 0)) for ts in sent)
        extra_rows += sum(max(0, watcher.rows.get(ts, 0) - args.batch_size) for ts in sent)
        missing_rows += short
        missed_viewers += bool(short)
        every_batch += freshness.lags_from(watcher.first_seen, sent, 1000)
        newest += [seen * 1000 - ts for ts, seen in watcher.newest if ts in sent_set]
    spread = [max(w.first_seen[ts] for w in watchers) * 1000 - min(w.first_seen[ts] for w in watchers) * 1000
              for ts in sent if all(ts in w.first_seen for w in watchers)]
    synced = [dict(zip(("rows", "rows_per_s", "lag_p50_ms", "lag_max_ms", "viewers"),
                       (int(g.replace(",", "")) for g in m.groups())))
              for m in SYNCED.finditer(server.log()[log_offset:])]
    return {
        "viewers": viewers, "page_views": sorted(page_views), "connect_s": connect_s,
        "redraws_per_viewer": sum(d.redraws for d in dashboards) / viewers, "feed_s": feed_s, "run_s": run_s, "drained": drained,
        "batches": len(sent), "rows_sent": len(sent) * args.batch_size,
        "rows_per_viewer": [sum(w.rows.get(ts, 0) for ts in sent) for w in watchers],
        "viewers_missing_rows": missed_viewers, "rows_missing": missing_rows, "rows_extra": extra_rows,
        "table_size": size, "rows_in_clickhouse": stored, "expected_size": min(stored, LIMIT),
        "lag_newest_ms": freshness.stats(newest), "lag_every_batch_ms": freshness.stats(every_batch),
        "spread_ms": freshness.stats(spread), "insert_call_ms": freshness.stats(s.insert_s * 1000 for s in feed.sent),
        "cpu_percent_of_one_core": cpu, "server_log_synced": synced,
        "batches_timeline": [{"ts_ms": s.ts_ms, "insert_ms": round(s.insert_s * 1000, 1),
                              "first_viewer_ms": _lag(watchers, s.ts_ms, min),
                              "last_viewer_ms": _lag(watchers, s.ts_ms, max)} for s in feed.sent],
        "errors": sorted({e for w in watchers for e in w.errors} | {e for d in dashboards for e in d.errors})[:5],
    }


def _lag(watchers, ts: int, pick) -> float | None:
    seen = [w.first_seen[ts] for w in watchers if ts in w.first_seen]
    return round(pick(seen) * 1000 - ts, 1) if seen else None


def run(args) -> dict:
    import chdb_http
    from servers import free_port

    database = f"fanout_{uuid.uuid4().hex[:8]}"
    info = freshness.machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results = []
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(freshness.scratch("bench-fanout-"))
        harness = stack.enter_context(chdb_http.running(workdir / "chdb-data", log_path=workdir / "chdb_http.log"))
        admin = harness.client(autogenerate_session_id=False)
        admin.command(f"CREATE DATABASE {database}")
        admin.database = database
        producer.create_table(admin, TABLE)
        # One batch before the server starts (it backfills it): a fresh
        # table's first insert is slow.
        warmup = freshness.Feed(admin, args.batch_size, args.batch_interval)
        warmup.insert_one()
        warmup.executor.shutdown()
        port = free_port()
        server = freshness.start_project_server(port, harness, database, workdir / "server.log",
                                                args.server_interval)
        stack.callback(server.stop)
        server.wait_http(f"http://127.0.0.1:{port}/")
        page_views = read_page_views(f"http://127.0.0.1:{port}/") if "dashboard" in args.page else {}
        for page in args.page:
            for viewers in args.viewers:
                views = page_views if page == "dashboard" else {}
                print(f"{viewers} viewer(s), page {page} ({', '.join(['counting view', *views])}): "
                      f"connecting, then {args.seconds:g} s of inserts ...", flush=True)
                result = asyncio.run(measure(args, harness, database, port, server, viewers, views))
                result["page"] = page
                results.append(result)
        admin.close()
    return {"machine": info, "summary": summary(results, args), "settings": {
        "seconds": args.seconds, "batch_size": args.batch_size, "batch_interval_s": args.batch_interval,
        "jitter_s": args.jitter, "rows_per_s": args.batch_size / args.batch_interval,
        "server": ("perspective_server.py defaults (--interval 0.1, --overlap 3, --limit 10,000)"
                   if args.server_interval == 0.1 else
                   f"perspective_server.py --interval {args.server_interval:g} (--overlap 3, --limit 10,000)")},
        "runs": results}


def summary(runs: list[dict], args) -> list[dict]:
    """The headline figures, in the form bench/run_all.py tabulates."""
    out = []
    rate = f"{args.batch_size / args.batch_interval:,.0f} rows/s"
    for run in runs:
        n = f"{run['viewers']} viewers, page {run['page']}"
        lag = run["lag_newest_ms"]
        out += [
            {"figure": f"viewers that missed a row ({n} viewers, {rate})",
             "value": f"{run['viewers_missing_rows']}/{run['viewers']}", "target": "0",
             "met": not run["viewers_missing_rows"] and not run["rows_extra"]
             and run["table_size"] == run["expected_size"]},
            {"figure": f"lag p95 across viewers, now - newest row at each update ({n} viewers)",
             "value": f"{freshness.ms(lag['p95_ms'])} ms (p50 {freshness.ms(lag['p50_ms'])}, "
                      f"max {freshness.ms(lag['max_ms'])})", "target": "n/a", "met": None},
            {"figure": f"server CPU, % of one core ({n} viewers)",
             "value": f"{run['cpu_percent_of_one_core']['server']:.0f}%", "target": "n/a", "met": None},
        ]
    return out


def print_results(results: dict) -> None:
    settings = results["settings"]
    rate = settings["rows_per_s"]
    print(f"\nfanout: {settings['batch_size']:,} rows every {settings['batch_interval_s']:g} s "
          f"({rate:,.0f} rows/s, {rate / 200:g}x the demo; each sent up to {settings['jitter_s'] * 1000:.0f} ms "
          f"after its tick), {settings['seconds']:g} s per run; {settings['server']}")
    header = ("viewers", "page", "redraws each", "batches", "rows each", "viewers missing rows", "lag p50 ms", "lag p95 ms", "lag max ms",
              "every-batch p95 ms", "spread p95 ms", "server CPU", "chdb_http CPU", "bench CPU")
    rows = []
    for run in results["runs"]:
        per_viewer = run["rows_per_viewer"]
        each = (f"{per_viewer[0]:,}" if min(per_viewer) == max(per_viewer)
                else f"{min(per_viewer):,}-{max(per_viewer):,}")
        cpu = run["cpu_percent_of_one_core"]
        lag, every, spread = run["lag_newest_ms"], run["lag_every_batch_ms"], run["spread_ms"]
        rows.append((run["viewers"], run["page"], f"{run['redraws_per_viewer']:,.0f}", run["batches"], each, f"{run['viewers_missing_rows']}/{run['viewers']}",
                     freshness.ms(lag["p50_ms"]), freshness.ms(lag["p95_ms"]), freshness.ms(lag["max_ms"]),
                     freshness.ms(every["p95_ms"]), freshness.ms(spread["p95_ms"]),
                     f"{cpu['server']:.0f}%", f"{cpu['chdb_http']:.0f}%", f"{cpu['bench']:.0f}%"))
    for line in freshness.table_lines(header, rows, left=0):
        print(line)
    for run in results["runs"]:
        insert = run["insert_call_ms"]
        synced = run["server_log_synced"]
        server_lag = (", server log (inserted_at -> Perspective table): "
                      + "; ".join(f"p50 {s['lag_p50_ms']} / max {s['lag_max_ms']} ms" for s in synced)
                      if synced else "")
        print(f"{run['viewers']} viewer(s), page {run['page']}: {run['rows_sent']:,} rows sent, each viewer received "
              f"{min(run['rows_per_viewer']):,}-{max(run['rows_per_viewer']):,}; table size {run['table_size']:,} "
              f"(expected {run['expected_size']:,} = min(rows in ClickHouse {run['rows_in_clickhouse']:,}, "
              f"--limit {LIMIT:,})); insert call p50 {freshness.ms(insert['p50_ms'])} / p95 "
              f"{freshness.ms(insert['p95_ms'])} ms{server_lag}")
        if run["errors"]:
            print(f"  errors in on_update: {run['errors']}")
        if not run["drained"]:
            print(f"  not every viewer saw the last batch within {results['settings'].get('drain', 'the drain')} s")
    by_page = {}
    for run in results["runs"]:
        by_page.setdefault(run["viewers"], {})[run["page"]] = run
    for viewers, pages in by_page.items():
        if {"none", "dashboard"} <= set(pages):
            none, dash = (pages[p]["cpu_percent_of_one_core"]["server"] for p in ("none", "dashboard"))
            lags = (pages[p]["lag_newest_ms"]["p95_ms"] for p in ("none", "dashboard"))
            print(f"{viewers} viewers, dashboard / counting view only: server CPU {dash:.0f}% / {none:.0f}% "
                  f"({dash / none:.1f}x), lag p95 {' / '.join(freshness.ms(lag) for lag in lags)} ms")
    runs_of_first_page = [run for run in results["runs"] if run["page"] == results["runs"][0]["page"]]
    if len(runs_of_first_page) > 1:
        first, last = runs_of_first_page[0], runs_of_first_page[-1]
        extra = last["viewers"] - first["viewers"]
        if extra > 0:
            per = (last["cpu_percent_of_one_core"]["server"] - first["cpu_percent_of_one_core"]["server"]) / extra
            print(f"server CPU per extra viewer: {per:.2f}% of one core "
                  f"({first['viewers']} -> {last['viewers']} viewers)")


def check(results: dict) -> list[str]:
    problems = []
    for run in results["runs"]:
        if run["viewers_missing_rows"] or run["rows_extra"]:
            problems.append(f"{run['viewers']} viewers: {run['viewers_missing_rows']} missed rows "
                            f"({run['rows_missing']:,} rows short, {run['rows_extra']:,} extra)")
        if run["table_size"] != run["expected_size"]:
            problems.append(f"{run['viewers']} viewers: table size {run['table_size']:,}, "
                            f"expected {run['expected_size']:,}")
        if run["errors"]:
            problems.append(f"{run['viewers']} viewers: on_update errors {run['errors']}")
    return problems


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fan-out: many websocket viewers, 10x the demo's insert rate.")
    parser.add_argument("--viewers", type=int, nargs="+", default=[50],
                        help="viewers to connect (default 50); several values run one after another")
    parser.add_argument("--page", nargs="+", choices=("dashboard", "none"), default=["dashboard"],
                        help="what each viewer holds besides its counting view: every default view of "
                             "index.html (dashboard, the default) or nothing (none); both run one after another")
    parser.add_argument("--seconds", type=float, default=30, help="seconds of inserts per run (default 30)")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per insert (default 1000)")
    parser.add_argument("--batch-interval", type=float, default=0.5, help="seconds between inserts (default 0.5)")
    parser.add_argument("--jitter", type=float, default=0.25, metavar="SECONDS",
                        help="send each batch up to this long after its tick, at random, so batches sample "
                             "every phase of the server's 250 ms poll (default 0.25; 0: a fixed schedule)")
    parser.add_argument("--server-interval", type=float, default=0.1, metavar="SECONDS",
                        help="diagnosis: perspective_server.py --interval (default 0.1, its default)")
    parser.add_argument("--drain", type=float, default=15,
                        help="seconds to wait for every viewer to see the last batch (default 15)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: --viewers 5 --seconds 5")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.viewers, args.seconds, args.drain = [5], 5, 5
    if min(args.viewers) < 1 or args.seconds <= 0 or args.batch_size < 1 or args.batch_interval <= 0:
        parser.error("--viewers, --seconds, --batch-size and --batch-interval must be positive")
    if not 0 <= args.jitter < args.batch_interval:
        parser.error("--jitter must be at least 0 and less than --batch-interval")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    results = run(args)
    results["settings"]["drain"] = args.drain
    results["wall_s"] = time.monotonic() - started
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    problems = check(results)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
