"""Chapter 3: ClickHouse rows, live in every browser.

This server keeps a Perspective table in step with a ClickHouse table, and
every browser keeps a copy of that table in step with the server's:

    ClickHouse --(query_arrow, new rows only)--> Perspective table
               --(the same Arrow bytes, once per poll, /feed)--> a Perspective
                 table in each browser --> its <perspective-viewer>s

Each browser computes its own views (pivots, charts, sorts) on its own copy,
so the server's work per update is the same for one page or a thousand:
update its table, serialize the new rows once, write them to each socket
(feed.py explains how a page joins without missing or repeating a row).

At start it backfills the newest --limit rows, then polls every --interval
for rows that arrived since (tailer.py explains how each row is read exactly
once). Rows travel as Arrow from ClickHouse to Perspective, with no
conversion in Python. Queries run on a worker thread, so a slow query never
stalls the websocket.

Run it after ./docker.sh and producer.py, then open http://localhost:8080:

    .venv/bin/python perspective_server.py

Or run the whole demo in this one process, no Docker needed: ClickHouse runs
in-process (chDB) and the producer runs on a thread beside the server.

    .venv/bin/python perspective_server.py --embedded

Every 10 seconds it logs what it did, e.g.

    synced 2,000 rows (200 rows/s), lag p50 140 ms / max 390 ms, 1 viewer(s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import perspective
import pyarrow as pa
import tornado.web

import assets
import clickhouse_http
import connection
import history
import producer
from feed import Feed, FeedHandler, to_ipc
from tailer import CURSOR, SchemaError, TableNotFound, Tail
import viewers
from viewers import ViewerHandler, ViewerLimits, Viewers

log = logging.getLogger("server")

INDEX_HTML = Path(__file__).with_name("index.html")


@dataclass(frozen=True)
class ServerSettings:
    port: int = 8080
    bind: str = "127.0.0.1"
    interval: float = 0.1
    limit: int = 30_000
    overlap: float = 3.0
    table: str = connection.TABLE
    cursor: str = "inserted_at"
    key: str = "id"
    allowed_origins: tuple[str, ...] = ()
    table_wait: float = 0.0
    show_key: bool = False
    limits: ViewerLimits = ViewerLimits()
    history: history.Limits | None = history.Limits()  # None: --no-history
    check_every: float = 1.0
    sql_port: int = 0  # with --embedded: ClickHouse's HTTP interface on 127.0.0.1 (0: none)


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, connection.ClickHouseSettings]:
    parser = argparse.ArgumentParser(
        description="Tail a ClickHouse table into Perspective and serve it to browsers.")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port for the page (default 8080)")
    parser.add_argument("--bind", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to your network)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="also accept websockets from pages at ORIGIN, e.g. https://intranet.example "
                             "(repeatable; by default only the page this server serves)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between polls (default 0.1)")
    parser.add_argument("--limit", type=int, default=30_000,
                        help="rows kept in the live table, on the server and in each page, oldest dropped "
                             "first (default 30,000)")
    parser.add_argument("--overlap", type=float, default=3.0,
                        help="how late, in seconds, a row may commit after ClickHouse stamped it and "
                             "still be delivered (default 3)")
    parser.add_argument("--check-every", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between checks of the overlap for late commits (default 1; 0: every "
                             "poll). Rows on time arrive at the next poll either way; a late one waits "
                             "for the next check")
    parser.add_argument("--table", default=connection.TABLE,
                        help="table to tail, in the database --ch-database names (default stock_values, "
                             "in database demo)")
    parser.add_argument("--cursor", default="inserted_at",
                        help="DateTime64 column ClickHouse stamps at insert (default inserted_at)")
    parser.add_argument("--table-wait", type=float, default=0, metavar="SECONDS",
                        help="give up if the table does not exist after this long (default 0: wait for ever)")
    parser.add_argument("--key", default="id",
                        help="column unique per row (default id); '' compares whole rows")
    parser.add_argument("--show-key", action="store_true",
                        help="also send the --key column to the browser; by default it is only used to "
                             "drop re-read rows, because Perspective keeps every distinct string it has "
                             "seen, so a unique id column grows its memory without bound")
    history.add_arguments(parser)
    connection.add_arguments(parser, embedded=True)
    parser.add_argument("--sql-port", type=int, default=0, metavar="PORT",
                        help="with --embedded: also answer ClickHouse's HTTP interface on 127.0.0.1:PORT, "
                             "read-write, as CLICKHOUSE_USER with CLICKHOUSE_PASSWORD, so other programs "
                             "(producer.py, curl, your own writer) can create tables and insert while this "
                             "server holds the chDB folder")
    viewers.add_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port (1-65535)")
    if args.interval <= 0:
        parser.error("--interval must be more than 0 seconds")
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.overlap < 0:
        parser.error("--overlap must be zero or more seconds")
    if args.check_every < 0:
        parser.error("--check-every must be zero or more seconds")
    if args.table_wait < 0:
        parser.error("--table-wait must be zero or more seconds")
    if args.sql_port and not args.embedded:
        parser.error("--sql-port needs --embedded: a ClickHouse server has its own HTTP interface")
    if not 0 <= args.sql_port < 65536:
        parser.error(f"--sql-port {args.sql_port} is not a TCP port (1-65535)")
    try:
        ch = connection.settings_from_args(args)
    except connection.SetupError as error:
        parser.error(str(error))
    settings = ServerSettings(args.port, args.bind, args.interval, args.limit, args.overlap,
                              args.table, args.cursor, args.key or "", tuple(args.allow_origin),
                              args.table_wait, args.show_key, viewers.limits_from_args(args, parser),
                              history.limits_from_args(args, parser), check_every=args.check_every,
                              sql_port=args.sql_port)
    return settings, ch


class IndexHandler(tornado.web.RequestHandler):
    """index.html, told whether this server offers History (its meta tag),
    and, when assets.py has downloaded Perspective's browser code, loading
    it from this server instead of the CDN."""

    def initialize(self, history: bool = True, local_assets: bool = False):
        self.history = history
        self.local_assets = local_assets

    def get(self):
        page = INDEX_HTML.read_bytes()
        if not self.history:
            page = page.replace(b'<meta name="history" content="on">', b'<meta name="history" content="off">')
        if self.local_assets:
            page = page.replace(assets.CDN.encode(), ASSETS_ROUTE.encode())
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.write(page)


class AssetHandler(tornado.web.StaticFileHandler):
    """assets/, Perspective's pinned browser code. The files never change for
    a version (it is in their path), so browsers may keep them a day."""

    async def get(self, path: str, include_body: bool = True):
        # Perspective's client also asks for the server's WebAssembly without
        # a version (@perspective-dev/server/dist/...): answer with the
        # pinned one rather than a 404 in the console.
        name, _, rest = path.partition("/")
        if name == "@perspective-dev" and "@" not in rest.partition("/")[0]:
            package, _, inner = rest.partition("/")
            path = f"{name}/{package}@{assets.VERSION}/{inner}"
        await super().get(path, include_body)

    def set_extra_headers(self, path):
        self.set_header("Cache-Control", "public, max-age=86400")

    def get_content_type(self):
        # Browsers compile WebAssembly as it streams only when it is served
        # as application/wasm; Python's mimetypes does not know .wasm.
        if self.absolute_path.endswith(".wasm"):
            return "application/wasm"
        return super().get_content_type()


ASSETS_ROUTE = "/assets/"


def make_app(feed: Feed | None, allowed_origins=(), limits: ViewerLimits = ViewerLimits(),
             history_server: history.History | None = None,
             tables=(connection.TABLE,), assets_folder: Path | None = assets.FOLDER) -> tornado.web.Application:
    """The page at /, the live rows at /feed; with `history_server`, the
    whole table of `tables` at /history (Perspective's protocol, checked and
    limited); Perspective's browser code at /assets/ once assets.py has put
    it in `assets_folder`."""
    origins = frozenset(allowed_origins)
    local_assets = assets_folder is not None and assets.installed(assets_folder)
    routes = [(r"/", IndexHandler, {"history": history_server is not None, "local_assets": local_assets})]
    if local_assets:
        routes.append((ASSETS_ROUTE + "(.*)", AssetHandler, {"path": str(assets_folder)}))
    if feed is not None:
        routes.append((r"/feed", FeedHandler, {"feed": feed, "allowed_origins": origins, "limits": limits}))
    if history_server is not None:
        routes.append((r"/history", ViewerHandler, {"perspective_server": history_server, "tables": tuple(tables),
                                                    "allowed_origins": origins, "limits": limits}))
    return tornado.web.Application(routes,
        # A history viewer's requests are a few hundred bytes, and the feed
        # takes none; nothing needs more.
        websocket_max_message_size=1 << 20,
        # Pings find viewers that vanished without closing (a laptop lid, a
        # dropped network), so their connection slots and views are freed.
        websocket_ping_interval=20,
    )


class Sync:
    """Moves new rows from the Tail into the Perspective table, and with a
    `feed`, on to every page; keeps figures."""

    def __init__(self, tail: Tail, table: perspective.Table, feed: Feed | None = None):
        self.tail = tail
        self.table = table
        self.feed = feed
        self.rows = 0
        self.lags_ms: list[np.ndarray] = []

    def push(self, rows: pa.Table) -> int:
        if rows.num_rows == 0:
            return 0
        cursors = rows.column(CURSOR).to_numpy()
        # Perspective takes the Arrow table itself and reads only the columns
        # its schema has: no IPC copy, and the cursor column is ignored.
        self.table.update(rows)
        if self.feed is not None:
            self.feed.publish(rows)  # on this thread, right behind the update: see feed.py
        # Freshness: from the moment ClickHouse stamped the row to now, when
        # the row is in the table that browsers read.
        self.lags_ms.append((time.time_ns() // 1000 - cursors) / 1000)
        self.rows += rows.num_rows
        return rows.num_rows

    def backfill(self, limit: int) -> int:
        """Loads the newest `limit` rows, one page while the next is read."""
        return sum(self.push(chunk) for chunk in read_ahead(self.tail.backfill(limit)))

    def poll(self) -> int:
        return self.push(self.tail.poll())

    def take_figures(self) -> tuple[int, np.ndarray]:
        rows, self.rows = self.rows, 0
        lags = np.concatenate(self.lags_ms) if self.lags_ms else np.array([])
        self.lags_ms = []
        return rows, lags


def read_ahead(chunks: Iterator[pa.Table], depth: int = 2) -> Iterator[pa.Table]:
    """Runs `chunks` on a thread, at most `depth` chunks ahead of the caller.

    ClickHouse (reading a page) and Perspective (loading the one before)
    both work outside Python's GIL, so a backfill of several pages takes
    about as long as loading them, not loading plus reading (bench/README.md).
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        ready.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as error:  # handed to the caller's thread
            if not stop.is_set():
                ready.put(error)

    reader = threading.Thread(target=produce, name="backfill-reader", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        reader.join()
        if hasattr(chunks, "close"):
            chunks.close()


async def wait_for_table(tail: Tail, run, stop: asyncio.Event, patience: float = 0) -> bool:
    """Waits for the producer to create the table, for `patience` seconds
    (0: for ever). False if the server is stopped meanwhile."""
    announced = False
    deadline = time.monotonic() + patience
    while not stop.is_set():
        try:
            await run(tail.describe)
            return True
        except TableNotFound as missing:
            if patience and time.monotonic() >= deadline:
                raise connection.SetupError(
                    f"{missing} after {patience:g} s: start producer.py, or name your table with "
                    "--table and its database with --ch-database") from None
            if not announced:
                log.info("%s; waiting for it (start producer.py, or name your table with --table and its "
                         "database with --ch-database)", missing)
                announced = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, patience) if patience else 1.0)
        except SchemaError as error:
            raise connection.SetupError(str(error)) from None
    return False


async def start_sync(tail: Tail, perspective_server: perspective.Server, settings: ServerSettings, run,
                     feed: Feed | None = None) -> Sync:
    """Creates the Perspective table from the described ClickHouse table, backfills
    it, then opens the `feed` to pages."""
    for name, clickhouse_type in tail.skipped:
        log.warning("column %s (%s) has no Perspective type; it is left out", name, clickhouse_type)
    for warning in await run(tail.layout_warnings):
        log.warning("%s", warning)
    empty = await run(tail.empty)
    table = perspective_server.new_local_client().table(to_ipc(empty), limit=settings.limit, name=settings.table)
    sync = Sync(tail, table)
    backfilled = await run(sync.backfill, settings.limit)
    log.info("backfilled %s rows into Perspective table %s", f"{backfilled:,}", settings.table)
    if feed is not None:
        sync.feed = feed.attach(table)
    return sync


async def sync_forever(sync: Sync, settings: ServerSettings, run, stop: asyncio.Event) -> None:
    outage_logged = False
    next_report = time.monotonic() + 10
    while not stop.is_set():
        started = time.monotonic()
        try:
            await run(sync.poll)
            if outage_logged:
                log.info("ClickHouse is back; resuming from the watermark")
                outage_logged = False
        except Exception as error:  # keep serving what we have; retry next tick
            if not outage_logged:
                log.warning("poll failed, retrying: %s", connection.short_reason(error))
                outage_logged = True
        if time.monotonic() >= next_report:
            rows, lags = sync.take_figures()
            lag = (f"lag p50 {np.percentile(lags, 50):.0f} ms / max {lags.max():.0f} ms" if len(lags)
                   else "no new rows")
            log.info("synced %s rows (%.0f rows/s), %s, %d viewer(s)%s", f"{rows:,}", rows / 10, lag, len(Viewers.open),
                     f", {Viewers.refused} write(s) refused" if Viewers.refused else "")
            next_report += 10
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, settings.interval - (time.monotonic() - started)))
        except asyncio.TimeoutError:
            pass


def serve_sql(ch: connection.ClickHouseSettings, port: int):
    """ClickHouse's HTTP interface on 127.0.0.1:`port`, in front of the embedded
    chDB (clickhouse_http.py), for programs other than this one."""
    path = ch.chdb_path if ch.chdb_path == connection.MEMORY else str(Path(ch.chdb_path).resolve())
    engine = clickhouse_http.Engine(path)
    try:
        server = clickhouse_http.application(engine, ch.username, ch.password).listen(port, "127.0.0.1")
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise connection.SetupError(f"--sql-port {port} is already in use: stop the other program or "
                                        "choose another port") from None
        raise connection.SetupError(f"cannot listen on 127.0.0.1:{port}: {error.strerror}") from None
    log.info("ClickHouse's HTTP interface for the embedded database: http://127.0.0.1:%d (user %s, "
             "database %s)", port, ch.username, ch.database)
    return server


def start_embedded_producer(ch: connection.ClickHouseSettings, table: str) -> tuple[threading.Event, threading.Thread]:
    """The producer on a thread: chDB lets only one process open its data folder."""
    client = connection.connect(ch)
    producer.create_table(client, table)
    stop = threading.Event()
    worker = producer.Producer(client, producer.ProducerSettings(table=table))

    def produce():
        try:
            worker.run(stop)
        except Exception as error:  # the server keeps serving what it has
            log.error("the embedded producer stopped: %s", connection.short_reason(error))

    thread = threading.Thread(target=produce, name="producer", daemon=True)
    thread.start()
    return stop, thread


async def serve(settings: ServerSettings, ch: connection.ClickHouseSettings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    # One worker thread: polls run one after another, never on the IOLoop.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    def run(function, *args):
        return loop.run_in_executor(executor, function, *args)

    client = await run(connection.connect, ch)
    producer_stop = producer_thread = None
    if ch.embedded and settings.table == connection.TABLE:
        producer_stop, producer_thread = await run(start_embedded_producer, ch, settings.table)
    elif ch.embedded:
        # The fake market has its own layout; it must never write into, or
        # create, a table of the user's.
        log.info("embedded: serving your table %s; the demo producer writes only %s, so it is not started",
                 settings.table, connection.TABLE)

    sql_server = serve_sql(ch, settings.sql_port) if settings.sql_port else None

    perspective_server = perspective.Server()
    hidden = (settings.key,) if settings.key and not settings.show_key else ()
    history_server = None
    if settings.history is not None:
        # Its own clients, one per history thread: a history query never
        # waits for a poll, nor a poll for a history query.
        history_server = history.History(lambda: connection.connect(ch), settings.table, settings.cursor,
                                          hidden, settings.history)
    feed = Feed(run, settings.limit)
    local_assets = assets.installed()
    app = make_app(feed, settings.allowed_origins, settings.limits, history_server, [settings.table],
                   assets.FOLDER if local_assets else None)
    try:
        http_server = app.listen(settings.port, settings.bind)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise connection.SetupError(f"port {settings.port} is already in use: stop the other "
                                        "program or choose another with --port") from None
        raise connection.SetupError(f"cannot listen on {settings.bind}:{settings.port}: {error.strerror}") from None
    log.info("serving http://%s:%d/", "localhost" if settings.bind == "127.0.0.1" else settings.bind, settings.port)
    if local_assets:
        log.info("the page loads Perspective's browser code from this server (%s/)", assets.FOLDER.name)
    else:
        log.info("the page loads Perspective's browser code from %s; where browsers cannot reach it, "
                 "run .venv/bin/python assets.py and restart", assets.CDN)

    tail = Tail(client, settings.table, settings.cursor, settings.key or None, settings.overlap, hidden,
                check_every=settings.check_every)
    if await wait_for_table(tail, run, stop, settings.table_wait):
        sync = await start_sync(tail, perspective_server, settings, run, feed)
        await sync_forever(sync, settings, run, stop)

    log.info("shutting down")
    http_server.stop()
    if sql_server is not None:
        sql_server.stop()
    Viewers.close_all()
    if producer_stop is not None:
        producer_stop.set()
        producer_thread.join(timeout=5)
    executor.shutdown(wait=True, cancel_futures=True)
    if history_server is not None:
        history_server.close()


def main(argv: list[str] | None = None) -> int:
    connection.setup_logging()
    settings, ch = parse_args(argv)
    log.info("%s; table %s (cursor %s, key %s); poll every %.2f s, overlap %.1f s checked every %.1f s, "
             "limit %s rows", ch.describe(), settings.table, settings.cursor, settings.key or "whole row",
             settings.interval, settings.overlap, settings.check_every, f"{settings.limit:,}")
    if settings.history:
        log.info("history at /history: each query up to %g s, %s rows, %d MB; split-by shows %d values",
                 settings.history.timeout, f"{settings.history.max_rows:,}", settings.history.max_memory >> 20,
                 settings.history.split_values)
    try:
        asyncio.run(serve(settings, ch))
    except connection.SetupError as error:
        print(f"perspective_server.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
