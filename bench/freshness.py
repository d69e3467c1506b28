"""How old is a row when a viewer first sees it?

A benchmark, not a test. It measures freshness, the time from a producer's
insert to the row being visible, with the demo's default settings
(perspective_server.py at its default --interval; 100 rows every 500 ms), at two hops:

  1. insert -> Python client: for this project, a copy of the table that
     follows the live feed as the page does (feed.Replica), noting each
     batch as it arrives; for the servers that still serve Perspective's
     /websocket (the old poll scheme, the predecessor), a perspective
     AsyncClient with a view whose `on_update(mode="row")` delta carries the
     new rows;
  2. insert -> browser page: headless Chromium on the served index.html
     (Debian's chromium with the CDN routed to tests/node_modules, as in
     tests/browser.py), measured inside the page with a second view on the
     viewers' table: `on_update` -> `to_columns()` of the newest rows
     ("data"), then `flush()` of every viewer on the page and one animation
     frame ("drawn": every view of the dashboard has redrawn with the
     update). The target is drawn p95 <= 200 ms (earlier, 500 ms): a
     dashboard should redraw well inside one 500 ms insert.

The page before the dashboard (one grid; --old-page) spoke Perspective's
/websocket, which this project's server no longer serves, so it is measured
only as the predecessor's page. `--schemes project old-design` measures the
design before the feed beside this one, in the same run: its own
perspective_server.py and dashboard (bench/fanout.py's old_design), whose
views ran on the server.

Every process is the real one: ClickHouse is the chDB test harness
(tests/chdb_http.py, chDB behind ClickHouse's HTTP interface) and the server
is `python perspective_server.py --port P` in its own process, reading the
harness over HTTP. The bench runs its own producer loop (producer.Market and
producer.py's insert settings) so that each batch's `timestamp` column is
the wall-clock time just before its insert call; each batch has a distinct
timestamp, which is its id. Lag = (time a viewer first sees the batch) -
(that timestamp). Browser and Python read the same machine clock.

producer.py ticks every 500 ms and the server polls every 250 ms, both on
fixed schedules, so in any one run every batch meets the poll at the same
phase and the lag is nearly constant: whatever that phase happens to be. To
sample every phase, each batch is sent at a random point up to --jitter
(250 ms) after its tick; --jitter 0 gives producer.py's exact schedule.

The same figures are taken for the PREDECESSOR's polling scheme, served
side by side by a second process (this file with --serve-predecessor): every
250 ms `SELECT * FROM stock_values WHERE timestamp >= now() - INTERVAL 1
SECOND` (second precision, as it was) -> query_df -> to_dict("records") ->
Table.update(records) (datetimes and UUIDs made JSON-safe as in
bench/sync_throughput.py), into a Perspective table served by perspective's
stock PerspectiveTornadoHandler with the page before the dashboard (the
--old-page, one grid; see run()). That scheme
delivers a row on every poll whose window still covers it (4 to 8 polls),
and never delivers a row that becomes visible after the window has passed
it, so its duplicate ratio (rows delivered / distinct rows) and missed rows
are counted too, by `id`, from the Python client's row deltas. Here inserts
are visible within tens of ms, well inside its window, so it misses nothing:
what it costs is the duplicates (which the page's sums count again) and CPU.

Both schemes read the same table, fed by the same batches, at the same time,
so their figures come from one run under the same load (--only runs one
alone). Each page gets a browser context (a window) of its own: with two busy
pages in one window Chromium draws the one behind at a few frames a second.
One batch is inserted before the servers start (a fresh table's first insert
is slow; the server backfills it, so the first of its 10-second log reports
has a large max), and batches from the first --warmup seconds are not
counted. "Where the time goes" splits each batch's lag by the `inserted_at`
ClickHouse stamped on it and the moments each viewer saw it; the server's own
log line (inserted_at -> its Perspective table) is shown beside it.

Run it from the repository root (needs `npm ci --prefix tests` and
/usr/bin/chromium, as the browser test does):

    .venv/bin/python bench/freshness.py                        # 60 s, both schemes
    .venv/bin/python bench/freshness.py --only project --seconds 30
    .venv/bin/python bench/freshness.py --old-page ''                # without the old page beside the dashboard
    .venv/bin/python bench/freshness.py --only project --server-interval 0.1   # what a shorter poll buys
    .venv/bin/python bench/freshness.py --smoke                # CI: 8 s of inserts, < 20 s in all
    .venv/bin/python bench/freshness.py --json freshness.json

Sample output, from before the dashboard and while the target was 500 ms
(2 cores, load average 3-4 from other work on the machine,
perspective-python 4.3.0, chDB 4.4.0 behind tests/chdb_http.py, Debian Chromium 156):

    $ python bench/freshness.py
    freshness over 60 s: 100 rows every 0.5 s (each sent up to 250 ms after its tick, at random), perspective_server.py --interval 0.25; 119 batches counted (first 2 s not counted)
    scheme        hop                                     batches  p50 ms  p95 ms  max ms  server CPU  delivered/distinct  missed rows
    this project  1. insert -> Python client (ws)             119     180     295     480          4%               1.00x            0
                  2. insert -> page, data (on_update)         119     215     334     664
                  2. insert -> page, drawn (flush+frame)      119     320     462     785
    predecessor   1. insert -> Python client (ws)             119     191     296     371         13%               6.27x            0
                  2. insert -> page, data (on_update)         119     231     337     433
                  2. insert -> page, drawn (flush+frame)      119     330     504     686

    where the time goes, per batch (ms; chdb_http used 11% of one core):
    step                                    this project p50  this project p95  predecessor p50  predecessor p95
    insert call returns                                   19                71               19               71
    send -> inserted_at (ClickHouse stamp)                 8                46                8               46
    inserted_at -> Python client                         166               277              179              280
    Python client -> page data                            46                66               44               61
    page data -> drawn (viewer render)                    98               155               93              212
    this project's server log, inserted_at -> its Perspective table, per 10 s: p50 184 / max 1403; p50 140 / max 281; p50 203 / max 369; p50 149 / max 293; p50 183 / max 268; p50 156 / max 260 ms
    this project: 11,900 rows delivered to the Python client for 11,900 sent (11,900 distinct)
    predecessor: 74,600 rows delivered to the Python client for 11,900 sent (11,900 distinct)
    target browser p95 <= 500 ms (this project, drawn): 462 ms, met with 38 ms to spare

Most of the lag is the wait for the next poll (uniform over 0-250 ms, so
about 125 ms at p50 and 240 ms at p95), then the viewer's redraw (~100 ms,
part of it the viewers' adaptive render throttle, which the page now turns
off: --compare-throttle adaptive shows how much),
then the poll itself, the insert and the websocket (tens of ms each). Both
schemes poll every 250 ms, so their freshness is alike. Three full runs on
this machine gave a drawn p95 of 396, 462 and 478 ms, depending on the other
load; 30 s runs with --server-interval 0.1 gave 282 ms.

Those figures are from the one-grid page. The dashboard (four views, each
redrawn on every update) measured beside the one-grid page in one run, on a
machine far busier than above (load average 10-12 on 2 cores from other
work, so both pages missed the target): drawn p50 862 vs 571 ms, p95 2,799
vs 2,372 ms. The data reaches both pages alike ("data" rows, p50 329 vs 319
ms); the difference is drawing four views, two of them charts, not one grid.

It exits 1 if a hop saw no batch at all, or if this project's server missed
or duplicated a row.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

import producer  # noqa: E402

TABLE = "stock_values"
PREDECESSOR_QUERY = f"SELECT * FROM {TABLE} WHERE timestamp >= now() - INTERVAL 1 SECOND"
# The predecessor's table: every column of stock_values, as Perspective types.
PREDECESSOR_SCHEMA = {
    "inserted_at": "datetime", "id": "string", "timestamp": "datetime", "ticker": "string",
    "client": "string", "open": "float", "high": "float", "low": "float", "close": "float",
    "volume": "integer", "date": "date",
}
SCHEMES = {"project": "this project", "old-poll": "old poll scheme", "old-design": "views on the server",
           "predecessor": "predecessor"}
# This project's server with the poll of earlier versions, which fetched
# the whole overlap window on every poll (see serve_old_poll); and the
# design before the feed, whose dashboard's views ran on the server
# (bench/fanout.py's old_design: its own perspective_server.py and index.html).
PROJECT_SERVERS = ("project", "old-poll", "old-design")
OLD_PAGE = "project-old-page"  # the page before the dashboard, on this project's server
THROTTLE_PAGE = "project-throttle"  # the dashboard again, its viewers with --compare-throttle
# The last commit whose index.html was one grid (before the dashboard).
OLD_PAGE_REF = "4ee2ee41a1909448ddc42bf2bf34dfbf1cca4fda:index.html"
TARGET_BROWSER_P95_MS = 200
# perspective_server.py's 10-second report: lag from inserted_at to the Perspective table.
SYNCED = re.compile(r"synced [\d,]+ rows \(\d+ rows/s\), lag p50 (\d+) ms / max (\d+) ms")


# ---- processes -------------------------------------------------------------

@contextlib.contextmanager
def scratch(prefix: str):
    """A temporary folder for data and logs: removed after a good run, kept
    (and named on stderr) when the run fails."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    except BaseException:
        print(f"logs kept in {path}", file=sys.stderr)
        raise
    shutil.rmtree(path, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """% of one core a process used between start() and stop()."""

    def __init__(self, pid: int):
        self.pid = pid
        self.percent: float | None = None

    def start(self) -> "CpuMeter":
        self._cpu, self._wall = cpu_seconds(self.pid), time.monotonic()
        return self

    def stop(self) -> float:
        self.percent = 100 * (cpu_seconds(self.pid) - self._cpu) / (time.monotonic() - self._wall)
        return self.percent


class Program:
    """`python <args>` from the repository root as its own process, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path):
        self.name, self.log_path = name, log_path
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "CHDB_"))}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env={**base, **env},
                                         stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 60) -> None:
        from servers import serves

        if serves(url, self.proc, timeout):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        raise RuntimeError(f"{self.name} did not answer {url} in {timeout:g} s:\n{self.log()}")

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_project_server(port: int, harness, database: str, log_path: Path, interval: float = 0.1) -> Program:
    env = {**harness.env(), "CLICKHOUSE_DB": database}
    return Program("perspective_server.py",
                   # --show-key: the bench tells batches apart by their ids in the page.
                   ["perspective_server.py", "--port", str(port), "--interval", str(interval), "--show-key"],
                   env, log_path)


def start_old_poll_server(port: int, harness, database: str, log_path: Path, interval: float = 0.1) -> Program:
    env = {**harness.env(), "CLICKHOUSE_DB": database}
    return Program("old-poll", [str(Path(__file__).resolve()), "--serve-old-poll", str(port),
                                "--server-interval", str(interval)], env, log_path)


def start_old_design_server(port: int, harness, database: str, log_path: Path, interval: float = 0.1) -> Program:
    from fanout import old_design

    env = {**harness.env(), "CLICKHOUSE_DB": database}
    script = old_design(None) / "perspective_server.py"
    return Program("old-design", [str(script), "--port", str(port), "--interval", str(interval), "--show-key"],
                   env, log_path)


def start_predecessor_server(port: int, harness, database: str, log_path: Path, page: Path) -> Program:
    env = {**harness.env(), "CLICKHOUSE_DB": database}
    return Program("predecessor", [str(Path(__file__).resolve()), "--serve-predecessor", str(port),
                                   "--predecessor-page", str(page)], env, log_path)


# ---- the producer ----------------------------------------------------------

@dataclass
class Sent:
    ts_ms: int  # the batch's timestamp column: wall clock just before the insert call
    insert_s: float  # how long the insert call took
    ids: list[str]


class Feed:
    """Inserts batches on a fixed schedule, as producer.py does, stamping each
    batch with the wall-clock time just before its insert call."""

    def __init__(self, client, batch_size: int, interval: float, jitter: float = 0.0, seed: int | None = None):
        # seed None: fresh random ids. Two feeds with one seed would insert the
        # same ids, which the server rightly treats as rows it already has.
        self.client = client
        self.batch_size = batch_size
        self.interval = interval
        self.jitter = jitter
        self.market = producer.Market(seed)
        self.rng = np.random.default_rng(seed)
        self.sent: list[Sent] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="insert")
        self._last_ms = 0

    def insert_one(self) -> Sent:
        rows = self.market.batch(self.batch_size, time.time_ns() // 1_000_000)
        ids = rows.column("id").to_pylist()
        now_ms = max(time.time_ns() // 1_000_000, self._last_ms + 1)  # distinct per batch: it is the batch id
        self._last_ms = now_ms
        stamp = pa.array(np.full(self.batch_size, now_ms, dtype=np.int64), pa.timestamp("ms", tz="UTC"))
        rows = rows.set_column(rows.schema.get_field_index("timestamp"), "timestamp", stamp)
        started = time.perf_counter()
        self.client.insert_arrow(TABLE, rows, settings={"insert_deduplication_token": uuid.uuid4().hex,
                                                        "async_insert_deduplicate": 1})
        return Sent(now_ms, time.perf_counter() - started, ids)

    async def run(self, seconds: float) -> None:
        """One batch per `interval` tick, sent `jitter` * U(0, 1) seconds after its tick."""
        loop = asyncio.get_running_loop()
        tick = time.monotonic()
        end = tick + seconds
        while tick < end:
            await asyncio.sleep(max(0.0, tick + self.jitter * self.rng.random() - time.monotonic()))
            self.sent.append(await loop.run_in_executor(self.executor, self.insert_one))
            tick = max(tick + self.interval, time.monotonic())


# ---- a Python viewer -------------------------------------------------------

class Watcher:
    """What one websocket viewer saw: per batch, when it first arrived and how many rows."""

    def __init__(self, with_ids: bool):
        self.with_ids = with_ids
        self.first_seen: dict[int, float] = {}  # batch ts (ms) -> time.time() when first seen
        self.inserted_at: dict[int, int] = {}  # batch ts -> earliest inserted_at (ms) seen
        self.rows: collections.Counter = collections.Counter()  # batch ts -> rows delivered
        self.ids: dict[int, set] = collections.defaultdict(set)  # batch ts -> distinct ids delivered
        self.newest: list[tuple[int, float]] = []  # at each update: (newest timestamp in it, now)
        self.updates = 0
        self.errors: list[str] = []

    def on_update(self, port_id, delta=None):
        now = time.time()
        try:
            self._count(now, delta)
        except Exception as error:  # in a Perspective callback an exception would vanish
            self.errors.append(f"{type(error).__name__}: {error}")

    def _count(self, now: float, delta) -> None:
        self.updates += 1
        if not delta:
            return
        rows = pa.ipc.open_stream(delta).read_all()
        if rows.num_rows == 0:
            return
        ts = rows.column("timestamp").cast(pa.int64()).to_numpy(zero_copy_only=False)
        batches, counts = np.unique(ts, return_counts=True)
        self.newest.append((int(batches[-1]), now))
        for batch, count in zip(batches.tolist(), counts.tolist()):
            self.first_seen.setdefault(batch, now)
            self.rows[batch] += count
        if "inserted_at" in rows.column_names:
            inserted = rows.column("inserted_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
            for batch in batches.tolist():
                low = int(inserted[ts == batch].min())
                self.inserted_at[batch] = min(self.inserted_at.get(batch, low), low)
        if self.with_ids:
            ids = rows.column("id").to_pylist()
            for batch, key in zip(ts.tolist(), ids):
                self.ids[batch].add(key)


async def subscribe(port: int, columns: list[str], watcher: Watcher, timeout: float = 60):
    """Opens a websocket viewer on the hosted table with a row-delta on_update.

    Returns (socket, reader task, table, view); the table may not exist yet when
    the server has just started, so this waits for it.
    """
    import tornado.httpclient
    from servers import follow_feed, open_viewer

    try:
        replica, follower = await follow_feed(port, patience=timeout)
    except tornado.httpclient.HTTPClientError:  # 404: a server with Perspective's /websocket instead
        replica = None
    if replica is not None:
        follower.cancel()

        async def follow():  # what replica.follow() does, noting when each batch arrived
            while (message := await replica.socket.read_message()) is not None:
                replica.apply(message)
                watcher.on_update(None, memoryview(message)[8:])

        return replica.socket, asyncio.ensure_future(follow()), replica.table, None

    client, socket, reader = await open_viewer(port, path="/websocket")
    deadline = time.monotonic() + timeout
    while not (names := await client.get_hosted_table_names()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} hosts no table after {timeout:g} s")
        await asyncio.sleep(0.1)
    table = await client.open_table(names[0])
    view = await table.view(columns=columns)
    await view.on_update(watcher.on_update, mode="row")
    return socket, reader, table, view


async def close_viewer(socket, reader) -> None:
    reader.cancel()
    socket.close()
    await asyncio.sleep(0)


async def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---- the page --------------------------------------------------------------

# Installed in the page once it is live. A second view on the viewers' own
# table, newest rows first; on each update it reads the newest rows and notes,
# for each batch timestamp not seen before, when the page had it ("data") and
# when every viewer had drawn it (each viewer's flush(), then one animation
# frame).
PAGE_PROBE = """async (maxRows) => {
    const viewers = [...document.querySelectorAll("perspective-viewer")];
    const table = await viewers[0].getTable();
    const view = await table.view({columns: ["timestamp"], sort: [["timestamp", "desc"]]});
    const probe = window.__freshness = {data: {}, drawn: {}, flushed: {}, updates: 0, errors: []};
    window.__freshnessView = view;
    await view.on_update(async () => {
        probe.updates++;
        try {
            const columns = await view.to_columns({start_row: 0, end_row: maxRows});
            const now = Date.now();
            const fresh = [];
            for (const ts of columns.timestamp) {
                if (!(ts in probe.data)) { probe.data[ts] = now; fresh.push(ts); }
            }
            if (fresh.length) {
                // Each viewer's own flush time too: which view holds the frame back.
                await Promise.all(viewers.map(async (viewer, i) => {
                    await viewer.flush();
                    const name = viewer.dataset.view || `viewer ${i + 1}`;
                    (probe.flushed[name] = probe.flushed[name] || []).push(Date.now() - now);
                }));
                await new Promise((resolve) => requestAnimationFrame(() => resolve()));
                const drawn = Date.now();
                for (const ts of fresh) probe.drawn[ts] = drawn;
            }
        } catch (error) {
            probe.errors.push(String(error));
        }
    });
}"""


@contextlib.contextmanager
def chromium():
    """Debian's Chromium through Playwright, as tests/browser.py launches it.

    Not browser.launch_chromium(): its one persistent context puts every page
    in one window, and with two busy pages Chromium draws the tab behind at a
    few frames a second (its flush() then takes a second or more). Each page
    here gets a context, so a window, of its own: two dashboards side by side.
    """
    import browser

    if not os.path.exists(browser.CHROMIUM):
        raise RuntimeError(f"{browser.CHROMIUM} not found: install Debian's chromium (not `playwright install`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # The old page is served by routing (Pages.open), and Chromium counts a
        # routed document as a public page, which may not open a websocket to
        # 127.0.0.1 unless local network access checks are off.
        chrome = pw.chromium.launch(executable_path=browser.CHROMIUM, headless=True,
                                    args=[*browser.CHROMIUM_ARGS, "--disable-features=LocalNetworkAccessChecks"])
        try:
            yield chrome
        finally:
            chrome.close()


def serve_document(html: bytes, route, request=None) -> None:
    route.fulfill(status=200, body=html, headers={"Content-Type": "text/html; charset=utf-8"})


class Pages:
    """One page per server, each in its own browser context, probed by PAGE_PROBE."""

    def __init__(self, chrome):
        import browser

        self.browser = browser
        self.chrome = chrome
        self.pages: dict[str, object] = {}
        self.routers: list = []

    def open(self, urls: dict[str, str], probe_rows: int, documents: dict[str, bytes] | None = None,
             throttles: dict[str, float | None] | None = None) -> None:
        """Loads every page at once, then installs the probe in each.

        `documents` replaces the HTML served at some of the URLs (the old page,
        on the project server's origin so that its websocket is same-origin).
        """
        consoles = {}
        for scheme, url in urls.items():
            context = self.chrome.new_context(viewport={"width": 1280, "height": 720})
            self.routers.append(self.browser.CdnRouter().install(context))
            page = self.pages[scheme] = context.new_page()
            if documents and scheme in documents:
                page.route(url, functools.partial(serve_document, documents[scheme]))
            consoles[scheme] = self.browser.ConsoleErrors(page)
            page.goto(url)
        for scheme, page in self.pages.items():
            try:
                self.browser.wait_for_status(page, "live", timeout_ms=30_000)
            except Exception:
                self.assert_ok()
                raise RuntimeError(f"{urls[scheme]} never went live; console: {consoles[scheme].errors}") from None
            if throttles and scheme in throttles:  # None: the viewer's adaptive throttle
                page.evaluate("(ms) => document.querySelectorAll('perspective-viewer')"
                              ".forEach((viewer) => viewer.setThrottle(ms))", throttles[scheme])
            page.evaluate(PAGE_PROBE, probe_rows)

    def wait(self, seconds: float) -> None:
        """Sleeps while still serving Playwright's callbacks."""
        page = next(iter(self.pages.values()))
        page.wait_for_timeout(seconds * 1000)

    def has_seen(self, scheme: str, ts_ms: int) -> bool:
        return self.pages[scheme].evaluate("(ts) => ts in window.__freshness.drawn", ts_ms)

    def result(self, scheme: str) -> dict:
        return self.pages[scheme].evaluate("() => window.__freshness")

    def assert_ok(self) -> None:
        for router in self.routers:
            router.assert_ok()

    def close(self) -> None:
        for page in self.pages.values():
            page.context.close()


def read_old_page(ref: str) -> bytes | None:
    """The page as it was at `ref` (e.g. "<commit>:index.html"), or None (and a note) if git cannot show it."""
    result = subprocess.run(["git", "show", ref], cwd=REPO, capture_output=True)
    if result.returncode != 0:
        print(f"note: no old page to compare (git show {ref}: {result.stderr.decode().strip()})", flush=True)
        return None
    return result.stdout


# ---- figures ---------------------------------------------------------------

def stats(lags_ms) -> dict:
    lags = np.asarray(list(lags_ms), dtype=float)
    if not len(lags):
        return {"count": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}
    return {"count": int(len(lags)), "p50_ms": float(np.percentile(lags, 50)),
            "p95_ms": float(np.percentile(lags, 95)), "max_ms": float(lags.max())}


def lags_from(first_seen: dict, batches: list[int], scale: float) -> list[float]:
    """first_seen: batch ts -> seen time (seconds if scale is 1000, ms if 1)."""
    return [first_seen[ts] * scale - ts for ts in batches if ts in first_seen]


def table_lines(header: tuple, rows: list[tuple], left: int = 2) -> list[str]:
    """Aligned columns: the first `left` to the left, the rest (numbers) to the right."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(w) if i < left else str(cell).rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in [header, *rows]]


def ms(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def machine() -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"nproc": len(os.sched_getaffinity(0)), "loadavg_1m_at_start": os.getloadavg()[0],
            "python": platform.python_version(), "perspective-python": version("perspective-python"),
            "chdb": version("chdb"), "clickhouse-connect": version("clickhouse-connect"),
            "playwright": version("playwright")}


# ---- the run ---------------------------------------------------------------

class Measure(threading.Thread):
    """The asyncio side, on its own thread: Python viewers, then the feed.

    The main thread drives Chromium with Playwright's sync API, which cannot
    share a thread with a running asyncio loop.
    """

    def __init__(self, args, harness, database: str, ports: dict[str, int]):
        super().__init__(name="measure", daemon=True)
        self.args, self.harness, self.database, self.ports = args, harness, database, ports
        self.watchers = {scheme: Watcher(with_ids=True) for scheme in ports}
        self.subscribed = threading.Event()
        self.go = threading.Event()
        self.fed = threading.Event()
        self.done = threading.Event()
        self.feed: Feed | None = None
        self.error: BaseException | None = None

    def run(self):
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by the main thread
            self.error = error
        finally:
            self.subscribed.set()
            self.fed.set()
            self.done.set()

    async def _main(self):
        client = self.harness.client(autogenerate_session_id=False, database=self.database)
        self.feed = Feed(client, self.args.batch_size, self.args.batch_interval, self.args.jitter)
        viewers = []
        for scheme, port in self.ports.items():
            viewers.append(await subscribe(port, ["timestamp", "inserted_at", "id"], self.watchers[scheme]))
        self.subscribed.set()
        while not self.go.is_set():
            await asyncio.sleep(0.05)
        await self.feed.run(self.args.warmup + self.args.seconds)
        self.fed.set()
        last = self.feed.sent[-1].ts_ms
        await wait_until(lambda: all(last in w.first_seen for w in self.watchers.values()), self.args.drain)
        if "predecessor" in self.ports:
            # Its one-second window, whole seconds, covers a row for up to 2 s
            # after its timestamp: wait that out (plus a poll and delivery),
            # so the duplicate ratio counts every delivery of the last batches.
            await asyncio.sleep(max(0.0, last / 1000 + 2.5 - time.time()))
        for socket, reader, _, _ in viewers:
            await close_viewer(socket, reader)
        self.feed.executor.shutdown()
        client.close()


def run(args) -> dict:
    import chdb_http
    from servers import free_port

    schemes = [args.only] if args.only else args.schemes
    old_page = read_old_page(args.old_page) if args.old_page else None
    database = f"freshness_{uuid.uuid4().hex[:8]}"
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(scratch("bench-freshness-"))
        harness = stack.enter_context(chdb_http.running(workdir / "chdb-data", log_path=workdir / "chdb_http.log"))
        admin = harness.client(autogenerate_session_id=False)
        admin.command(f"CREATE DATABASE {database}")
        admin.database = database
        producer.create_table(admin, TABLE)
        # One batch before anything else: a fresh table's first insert is slow.
        warmup = Feed(admin, args.batch_size, args.batch_interval)
        warmup.insert_one()
        warmup.executor.shutdown()
        ports = {scheme: free_port() for scheme in schemes}
        # The predecessor serves the one-grid page when git can show it, as it
        # did before the dashboard, so its figures compare with earlier runs.
        # (Serving the dashboard, its server stalled in Table.update, 0% CPU,
        # in every run here; with the one-grid page it did not.)
        predecessor_page = workdir / "predecessor.html"
        predecessor_page.write_bytes(old_page or (REPO / "index.html").read_bytes())
        servers = {}
        for scheme in schemes:
            log_path = workdir / f"{scheme}.log"
            if scheme == "project":
                servers[scheme] = start_project_server(ports[scheme], harness, database, log_path,
                                                       args.server_interval)
            elif scheme == "old-design":
                servers[scheme] = start_old_design_server(ports[scheme], harness, database, log_path,
                                                          args.server_interval)
            elif scheme == "old-poll":
                servers[scheme] = start_old_poll_server(ports[scheme], harness, database, log_path,
                                                        args.server_interval)
            else:
                servers[scheme] = start_predecessor_server(ports[scheme], harness, database, log_path,
                                                           predecessor_page)
            stack.callback(servers[scheme].stop)
        pages = Pages(stack.enter_context(chromium())) if not args.no_browser else None  # while the servers start
        for scheme, server in servers.items():
            server.wait_http(f"http://127.0.0.1:{ports[scheme]}/")
        measure = Measure(args, harness, database, ports)
        measure.start()
        measure.subscribed.wait()
        if measure.error:
            raise measure.error
        if pages:
            urls = {scheme: f"http://127.0.0.1:{port}/" for scheme, port in ports.items()}
            documents = {}
            throttles = {} if args.page_throttle is None else {scheme: args.page_throttle for scheme in urls}
            if args.compare_throttle is not None and "project" in ports:
                urls[THROTTLE_PAGE] = f"http://127.0.0.1:{ports['project']}/?compare-throttle"
                throttles[THROTTLE_PAGE] = None if args.compare_throttle == "adaptive" else float(args.compare_throttle)
            pages.open(urls, args.probe_rows, documents, throttles)
        meters = {scheme: CpuMeter(server.pid).start() for scheme, server in servers.items()}
        meters["chdb_http"] = CpuMeter(harness.proc.pid).start()
        measure.go.set()
        browser_results = {}
        if pages:
            while not measure.fed.is_set():
                pages.wait(0.2)
            if measure.feed and measure.feed.sent:
                last = measure.feed.sent[-1].ts_ms
                deadline = time.monotonic() + args.drain
                while time.monotonic() < deadline and not all(pages.has_seen(s, last) for s in pages.pages):
                    pages.wait(0.1)
            while not measure.done.is_set():
                pages.wait(0.2)
            browser_results = {scheme: pages.result(scheme) for scheme in pages.pages}
            pages.assert_ok()
            pages.close()
        measure.done.wait()
        for meter in meters.values():
            meter.stop()
        measure.join()
        if measure.error:
            raise measure.error
        logs = {scheme: server.log() for scheme, server in servers.items()}
        stored = admin.command(f"SELECT count() FROM {TABLE}")
        admin.close()
    return summarize(args, schemes, measure, browser_results, meters, stored, info, logs)


def summarize(args, schemes, measure, browser_results, meters, stored, info, logs) -> dict:
    feed = measure.feed
    start_ms = feed.sent[0].ts_ms + args.warmup * 1000
    counted = [s for s in feed.sent if s.ts_ms >= start_ms]
    batches = [s.ts_ms for s in counted]
    distinct_rows = len(batches) * args.batch_size
    results = {"machine": info, "settings": {
        "seconds": args.seconds, "warmup_s": args.warmup, "batch_size": args.batch_size,
        "batch_interval_s": args.batch_interval, "jitter_s": args.jitter, "server_interval_s": args.server_interval,
        "page_throttle_ms": args.page_throttle, "compare_throttle": args.compare_throttle, "schemes": schemes},
        "batches_sent": len(feed.sent), "batches_counted": len(batches), "rows_stored": stored,
        "insert_call_ms": stats(s.insert_s * 1000 for s in counted), "schemes": {}}
    for scheme in schemes:
        watcher = measure.watchers[scheme]
        delivered = sum(watcher.rows[ts] for ts in batches)
        distinct = sum(len(watcher.ids[ts]) for ts in batches)
        entry = {
            "python_client": stats(lags_from(watcher.first_seen, batches, 1000)),
            "rows_delivered": delivered, "distinct_rows_delivered": distinct,
            "distinct_rows_sent": distinct_rows, "missed_rows": distinct_rows - distinct,
            "duplicate_ratio": delivered / distinct if distinct else None,
            "missed_batches": sum(ts not in watcher.first_seen for ts in batches),
            "send_to_inserted_at_ms": stats(watcher.inserted_at[ts] - ts for ts in batches
                                            if ts in watcher.inserted_at),
            "inserted_at_to_python_ms": stats(watcher.first_seen[ts] * 1000 - watcher.inserted_at[ts]
                                              for ts in batches if ts in watcher.inserted_at),
            "python_updates": watcher.updates, "python_errors": watcher.errors[:5],
            "server_cpu_percent_of_one_core": meters[scheme].percent if scheme in meters else None,
        }
        sent = {s.ts_ms: s for s in counted}
        steps = {
            "insert call returns": [sent[ts].insert_s * 1000 for ts in batches],
            "send -> inserted_at (ClickHouse stamp)": [watcher.inserted_at[ts] - ts for ts in batches
                                                       if ts in watcher.inserted_at],
            "inserted_at -> Python client": [watcher.first_seen[ts] * 1000 - watcher.inserted_at[ts]
                                             for ts in batches if ts in watcher.inserted_at],
        }
        page = browser_results.get(scheme)
        if page is not None:
            data = {int(k): v for k, v in page["data"].items()}
            drawn = {int(k): v for k, v in page["drawn"].items()}
            entry["page_data"] = stats(lags_from(data, batches, 1))
            entry["page_drawn"] = stats(lags_from(drawn, batches, 1))
            entry["page_updates"] = page["updates"]
            entry["page_errors"] = page["errors"][:5]
            steps["Python client -> page data"] = [data[ts] - watcher.first_seen[ts] * 1000 for ts in batches
                                                   if ts in data and ts in watcher.first_seen]
            steps["page data -> drawn (viewer render)"] = [drawn[ts] - data[ts] for ts in batches
                                                           if ts in data and ts in drawn]
            for name, flushed in page.get("flushed", {}).items():
                steps[f"  of which: page data -> {name} flushed"] = flushed
        # The extra pages on this project's server: the old one-grid page, and
        # the dashboard with another render throttle.
        for extra, prefix in ((OLD_PAGE, "old_page"), (THROTTLE_PAGE, "throttle_page")):
            other = browser_results.get(extra) if scheme == "project" else None
            if other is not None:
                for hop in ("data", "drawn"):
                    entry[f"{prefix}_{hop}"] = stats(lags_from({int(k): v for k, v in other[hop].items()}, batches, 1))
                entry[f"{prefix}_errors"] = other["errors"][:5]
        entry["steps_ms"] = {step: stats(values) for step, values in steps.items()}
        results["schemes"][scheme] = entry
    if "chdb_http" in meters:
        results["chdb_http_cpu_percent_of_one_core"] = meters["chdb_http"].percent
    for scheme in PROJECT_SERVERS:
        if scheme in logs:
            results["schemes"][scheme]["server_log_synced"] = [
                {"lag_p50_ms": int(m.group(1)), "lag_max_ms": int(m.group(2))} for m in SYNCED.finditer(logs[scheme])]
    results["server_logs_tail"] = {s: logs[s].splitlines()[-3:] for s in schemes}
    results["summary"] = summary(results)
    return results


def summary(results: dict) -> list[dict]:
    """The headline figures, in the form bench/run_all.py tabulates."""
    out = []
    for scheme, entry in results["schemes"].items():
        name = SCHEMES[scheme]
        for key, label in (("python_client", "insert -> Python client"), ("page_drawn", "insert -> page drawn"),
                           ("old_page_drawn", "insert -> old one-grid page drawn")):
            figure = entry.get(key)
            if not figure or figure["p95_ms"] is None:
                continue
            target = scheme in PROJECT_SERVERS and key == "page_drawn"
            out.append({"figure": f"freshness p95, {label} ({name})",
                        "value": f"{figure['p95_ms']:,.0f} ms (p50 {figure['p50_ms']:,.0f}, max "
                                 f"{figure['max_ms']:,.0f}, {figure['count']} batches)",
                        "target": f"<= {TARGET_BROWSER_P95_MS} ms" if target else "n/a",
                        "met": figure["p95_ms"] <= TARGET_BROWSER_P95_MS if target else None})
        out.append({"figure": f"rows delivered / distinct, missed rows ({name})",
                    "value": f"{entry['duplicate_ratio'] or 0:.2f}x, {entry['missed_rows']:,} missed",
                    "target": "1.00x, 0 missed" if scheme in PROJECT_SERVERS else "n/a",
                    "met": (entry["rows_delivered"] == entry["distinct_rows_sent"] and not entry["missed_rows"])
                    if scheme in PROJECT_SERVERS else None})
        cpu = entry["server_cpu_percent_of_one_core"]
        if cpu is not None:
            out.append({"figure": f"server CPU, % of one core ({name})", "value": f"{cpu:.0f}%",
                        "target": "n/a", "met": None})
    return out


def print_results(results: dict) -> None:
    settings = results["settings"]
    throttle = settings["page_throttle_ms"]
    print(f"\nfreshness over {settings['seconds']:g} s: {settings['batch_size']} rows every "
          f"{settings['batch_interval_s']:g} s (each sent up to {settings['jitter_s'] * 1000:.0f} ms after its "
          f"tick, at random), perspective_server.py --interval {settings['server_interval_s']:g}"
          f"{'' if throttle is None else f', pages setThrottle({throttle:g})'}; "
          f"{results['batches_counted']} batches counted"
          + (f" (first {settings['warmup_s']:g} s not counted)" if settings["warmup_s"] else ""))
    header = ("scheme", "hop", "batches", "p50 ms", "p95 ms", "max ms", "server CPU", "delivered/distinct",
              "missed rows")
    rows = []
    hops = (("python_client", "1. insert -> Python client (ws)"),
            ("page_data", "2. insert -> page, data (on_update)"),
            ("page_drawn", "2. insert -> page, drawn (flush+frame)"),
            ("old_page_data", "2. insert -> old page, data"),
            ("old_page_drawn", "2. insert -> old page, drawn"),
            ("throttle_page_data", f"2. insert -> setThrottle({settings.get('compare_throttle')}) page, data"),
            ("throttle_page_drawn", f"2. insert -> setThrottle({settings.get('compare_throttle')}) page, drawn"))
    for scheme, entry in results["schemes"].items():
        for i, (key, label) in enumerate(hops):
            if key not in entry:
                continue
            figure = entry[key]
            first = i == 0
            cpu = entry["server_cpu_percent_of_one_core"]
            rows.append((SCHEMES[scheme] if first else "", label, figure["count"], ms(figure["p50_ms"]),
                         ms(figure["p95_ms"]), ms(figure["max_ms"]),
                         (f"{cpu:.0f}%" if cpu is not None else "-") if first else "",
                         f"{entry['duplicate_ratio']:.2f}x" if first and entry["duplicate_ratio"] else "",
                         f"{entry['missed_rows']:,}" if first else ""))
    for line in table_lines(header, rows):
        print(line)
    print(f"\nwhere the time goes, per batch (ms; chdb_http used "
          f"{results.get('chdb_http_cpu_percent_of_one_core', 0):.0f}% of one core):")
    schemes = list(results["schemes"])
    header = ("step", *[f"{SCHEMES[s]} {q}" for s in schemes for q in ("p50", "p95")])
    rows = []
    for step in results["schemes"][schemes[0]]["steps_ms"]:
        cells = []
        for scheme in schemes:
            figure = results["schemes"][scheme]["steps_ms"].get(step, {})
            cells += [ms(figure.get("p50_ms")), ms(figure.get("p95_ms"))]
        rows.append((step, *cells))
    for line in table_lines(header, rows, left=1):
        print(line)
    for scheme in PROJECT_SERVERS:
        synced = results["schemes"].get(scheme, {}).get("server_log_synced")
        if synced:
            print(f"{SCHEMES[scheme]}: server log, inserted_at -> its Perspective table, per 10 s: "
                  + "; ".join(f"p50 {s['lag_p50_ms']} / max {s['lag_max_ms']}" for s in synced) + " ms")
    for scheme, entry in results["schemes"].items():
        print(f"{SCHEMES[scheme]}: {entry['rows_delivered']:,} rows delivered to the Python client for "
              f"{entry['distinct_rows_sent']:,} sent ({entry['distinct_rows_delivered']:,} distinct)")
        for key in ("python_errors", "page_errors", "old_page_errors", "throttle_page_errors"):
            if entry.get(key):
                print(f"  {key}: {entry[key]}")
    project = results["schemes"].get("project", {}).get("page_drawn")
    old = results["schemes"].get("project", {}).get("old_page_drawn")
    if project and old and project["p95_ms"] is not None and old["p95_ms"]:
        print(f"dashboard / old one-grid page, drawn: p50 {ms(project['p50_ms'])} / {ms(old['p50_ms'])} ms, "
              f"p95 {ms(project['p95_ms'])} / {ms(old['p95_ms'])} ms ({project['p95_ms'] / old['p95_ms']:.2f}x)")
    if project and project["p95_ms"] is not None:
        margin = TARGET_BROWSER_P95_MS - project["p95_ms"]
        verdict = (f"met with {margin:,.0f} ms to spare" if margin >= 0
                   else f"MISSED by {-margin:,.0f} ms")
        print(f"target browser p95 <= {TARGET_BROWSER_P95_MS} ms (this project, drawn): "
              f"{project['p95_ms']:,.0f} ms, {verdict}")


def check(results: dict) -> list[str]:
    problems = []
    for scheme, entry in results["schemes"].items():
        for key in ("python_client", "page_data", "page_drawn", "old_page_data", "old_page_drawn",
                    "throttle_page_data", "throttle_page_drawn"):
            if key in entry and entry[key]["count"] == 0:
                problems.append(f"{SCHEMES[scheme]}: {key} saw no batch")
    for scheme in PROJECT_SERVERS:
        project = results["schemes"].get(scheme)
        if project and (project["missed_rows"] or project["rows_delivered"] != project["distinct_rows_sent"]):
            problems.append(f"{SCHEMES[scheme]}: {project['missed_rows']} rows missed, {project['rows_delivered']:,} "
                            f"delivered for {project['distinct_rows_sent']:,} sent (must be exactly once)")
    return problems


# ---- the predecessor's server (a subprocess of the bench) ----------------

def serve_predecessor(port: int, page: Path, interval: float = 0.25) -> int:
    """The predecessor's scheme: poll the last second by `timestamp`, records into Perspective."""
    import clickhouse_connect
    import perspective
    import tornado.web
    from perspective.handlers.tornado import PerspectiveTornadoHandler

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sync_throughput import records_frame_to_json_safe  # the same conversion as its records path

    index = page.read_bytes()

    class Index(tornado.web.RequestHandler):
        def get(self):
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.write(index)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        env = os.environ
        client = clickhouse_connect.get_client(
            host=env["CLICKHOUSE_HOST"], port=int(env["CLICKHOUSE_PORT"]), username=env["CLICKHOUSE_USER"],
            password=env["CLICKHOUSE_PASSWORD"], database=env["CLICKHOUSE_DB"], autogenerate_session_id=False)
        server = perspective.Server()
        table = server.new_local_client().table(PREDECESSOR_SCHEMA, name=TABLE, limit=10_000)
        app = tornado.web.Application([(r"/", Index),
                                       (r"/websocket", PerspectiveTornadoHandler, {"perspective_server": server})])
        http = app.listen(port, "127.0.0.1")
        executor = ThreadPoolExecutor(max_workers=1)
        polls = rows = 0

        def poll() -> int:
            df = client.query_df(PREDECESSOR_QUERY)
            if len(df):
                table.update(records_frame_to_json_safe(df).to_dict("records"))
            return len(df)

        while not stop.is_set():
            started = time.monotonic()
            rows += await loop.run_in_executor(executor, poll)
            polls += 1
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - started)))
            except asyncio.TimeoutError:
                pass
        print(f"predecessor: {polls} polls, {rows:,} rows delivered", flush=True)
        http.stop()
        executor.shutdown()

    asyncio.run(main())
    return 0


def serve_old_poll(port: int, interval: float) -> int:
    """This project's server, but every poll fetches the whole overlap window
    again, as it did before the once-a-second window check replaced that."""
    import perspective_server
    import tailer

    tailer.Tail._window_unchanged = lambda self: False  # always "something committed late"
    return perspective_server.main(["--port", str(port), "--interval", str(interval), "--show-key",
                                    "--check-every", "0"])


# ---- main ----------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Freshness: insert -> Python client and -> browser, "
                                                 "this project's server and the predecessor's polling.")
    parser.add_argument("--seconds", type=float, default=60, help="seconds of inserts measured (default 60)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of inserts not counted first (default 2)")
    parser.add_argument("--batch-size", type=int, default=100, help="rows per insert (default 100, as producer.py)")
    parser.add_argument("--batch-interval", type=float, default=0.5,
                        help="seconds between inserts (default 0.5, as producer.py)")
    parser.add_argument("--jitter", type=float, default=0.25, metavar="SECONDS",
                        help="send each batch up to this long after its tick, at random (default 0.25, the "
                             "server's poll interval; 0: producer.py's exact schedule)")
    parser.add_argument("--server-interval", type=float, default=0.1, metavar="SECONDS",
                        help="diagnosis: perspective_server.py --interval (default 0.1, its default); "
                             "the predecessor always polls every 0.25 s")
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=["project", "predecessor"],
                        help="servers measured side by side in one run (default: project predecessor); "
                             "old-poll is this project's server fetching the whole overlap window on every poll")
    parser.add_argument("--only", choices=sorted(SCHEMES), help="run one scheme alone")
    parser.add_argument("--no-browser", action="store_true", help="hop 1 only")
    parser.add_argument("--probe-rows", type=int, default=1000,
                        help="newest rows the page probe reads on each update (default 1000)")
    parser.add_argument("--page-throttle", type=float, metavar="MS",
                        help="diagnosis: viewer.setThrottle(MS) in every page (default: what the page sets)")
    parser.add_argument("--compare-throttle", metavar="MS|adaptive",
                        help="diagnosis: a second dashboard on this project's server, in the same run, its "
                             "viewers with setThrottle(MS) ('adaptive': the viewer's own throttle)")
    parser.add_argument("--old-page", default=OLD_PAGE_REF, metavar="GIT_REF:PATH",
                        help=f"the page before the dashboard (git show GIT_REF:PATH; default {OLD_PAGE_REF}): "
                             "measured on this project's server beside the dashboard (not with --smoke), and "
                             "served by the predecessor's server ('' for neither)")
    parser.add_argument("--drain", type=float, default=10,
                        help="seconds to wait for the last batch after the inserts stop (default 10)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: --seconds 8 --warmup 0")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--serve-predecessor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-old-poll", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--predecessor-page", default=str(REPO / "index.html"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.drain = 8, 0, 5
    if args.seconds <= 0 or args.warmup < 0 or args.batch_size < 1 or args.batch_interval <= 0:
        parser.error("--seconds, --batch-size and --batch-interval must be positive, --warmup >= 0")
    if args.compare_throttle not in (None, "adaptive"):
        try:
            if float(args.compare_throttle) < 0:
                raise ValueError
        except ValueError:
            parser.error("--compare-throttle must be a number of ms >= 0, or 'adaptive'")
    if not 0 <= args.jitter < args.batch_interval:
        parser.error("--jitter must be at least 0 and less than --batch-interval")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_predecessor:
        return serve_predecessor(args.serve_predecessor, Path(args.predecessor_page))
    if args.serve_old_poll:
        return serve_old_poll(args.serve_old_poll, args.server_interval)
    started = time.monotonic()
    results = run(args)
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
