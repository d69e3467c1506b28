"""Chapter 3 (ClickHouse rows, live in every browser): the live feed, the same rows to every page.

Each page holds a Perspective table of its own, in the browser, and computes
its views there. The server's job is only to keep that table equal to its
own, so it sends the same bytes to every page:

* when a page connects, a hello (the table's name, its --limit and the
  sequence number the snapshot is at), then the snapshot: every row of the
  server's table, as Arrow;
* after each poll that found rows, those rows as Arrow, behind an 8-byte
  sequence number. The bytes are made once per poll, whatever the number of
  pages; each page adds only a websocket write.

A Perspective table with a `limit` is a ring that drops its oldest rows
first. A page that starts from the snapshot and then applies the same
batches in the same order as the server's table ends with the same rows,
eviction included. So the one thing to get right is that no batch falls
between the snapshot and the stream, and none is in both: the snapshot and
the sequence number are taken on the thread that updates the table
(`Feed.snapshot` runs where `Sync.push` runs), and a joining page collects
the batches broadcast meanwhile, then keeps those numbered after its snapshot.

A page whose socket does not drain is closed once --max-send-buffer bytes
wait for it: the others never wait for it. The feed is listen-only: a page
sends nothing, so any message from a client closes its connection.
"""

from __future__ import annotations

import json
import struct

import perspective
import pyarrow as pa
import tornado.httpclient
import tornado.ioloop
import tornado.websocket

from viewers import AdmittedSocket, ViewerLimits, Viewers

SEQUENCE = struct.Struct(">Q")  # the 8 bytes in front of each batch


def to_ipc(rows: pa.Table) -> bytes:
    """Arrow IPC stream bytes: what Perspective's table() and update() read, in Python and in the browser."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


class Feed:
    """The batches applied to the live Perspective table, numbered, and the pages that follow them.

    Made before the table exists (pages that come early are told to retry);
    `attach` gives it the table once the backfill is in.
    """

    def __init__(self, run, limit: int):
        self.run = run               # runs a function on the thread that updates the table
        self.limit = limit
        self.loop = tornado.ioloop.IOLoop.current()
        self.table: perspective.Table | None = None
        self.sequence = 0            # batches applied so far; only the updating thread changes it
        self.pages: set[FeedHandler] = set()
        self._snapshot: tuple[int, bytes] | None = None

    def attach(self, table: perspective.Table) -> "Feed":
        self.name, self.columns = table.get_name(), list(table.columns())
        self.table = table
        return self

    # --- on the thread that updates the table ------------------------------

    def publish(self, rows: pa.Table) -> None:
        """Broadcast `rows`, just applied to the table; call only from the updating thread."""
        self.sequence += 1
        message = SEQUENCE.pack(self.sequence) + to_ipc(rows.select(self.columns))
        self.loop.add_callback(self._broadcast, self.sequence, message)

    def snapshot(self) -> tuple[int, bytes]:
        """(sequence number, every row as Arrow IPC); call only from the updating thread.

        Pages that join between two polls share one snapshot: a burst of
        reconnecting pages costs one read of the table, not one each.
        """
        if self._snapshot is None or self._snapshot[0] != self.sequence:
            view = self.table.view()
            try:
                self._snapshot = (self.sequence, view.to_arrow())
            finally:
                view.delete()
        return self._snapshot

    # --- on the IOLoop ----------------------------------------------------

    def _broadcast(self, sequence: int, message: bytes) -> None:
        for page in list(self.pages):
            page.deliver(sequence, message)


class FeedHandler(AdmittedSocket):
    """One page's websocket: a snapshot, then every batch, in order; nothing from the page."""

    kind, behind = "page", "behind the feed"

    def initialize(self, feed: Feed, allowed_origins=frozenset(), limits: ViewerLimits = ViewerLimits()):
        self.source = feed
        self.allowed_origins = allowed_origins
        self.limits = limits
        self.feed = None

    async def open(self):
        feed = self.source
        if feed.table is None:
            self.close(1013, "the server has no table yet; try again")
            return
        self.feed = feed
        self.after: int | None = None   # the snapshot's sequence number, once it is sent
        self.waiting: list[tuple[int, bytes]] = []   # batches broadcast while the snapshot is taken
        Viewers.join(self)
        feed.pages.add(self)
        sequence, snapshot = await feed.run(feed.snapshot)
        if self.feed is None:
            return  # closed meanwhile
        self._write(json.dumps({"table": feed.name, "limit": feed.limit, "sequence": sequence}), binary=False)
        self._write(snapshot)
        self.after = sequence
        waiting, self.waiting = self.waiting, []
        self.unsent -= sum(len(message) for _, message in waiting)  # counted again as they are written
        for batch_sequence, message in waiting:
            self.deliver(batch_sequence, message)

    def deliver(self, sequence: int, message: bytes) -> None:
        if self.after is None:
            self.waiting.append((sequence, message))
            self.count_unsent(len(message))
        elif sequence > self.after:  # older batches are in the snapshot already
            self._write(message)

    def on_message(self, message):
        self.close(1003, "this feed is listen-only")

    def _write(self, payload, binary: bool = True) -> None:
        if self.feed is not None:
            self.send(payload, binary)

    def leave(self) -> None:
        feed, self.feed = self.feed, None
        if feed is not None:
            feed.pages.discard(self)
            Viewers.leave(self)

    drop = leave

    def on_close(self):
        self.leave()


class FeedGap(RuntimeError):
    """A batch arrived out of order: the copy no longer matches; start over from a snapshot."""


class Replica:
    """A copy of the live table in this process, kept in step over /feed.

    What the page does, in Python: a table from the snapshot with the
    server's limit, then every batch in order. Handy in a notebook, and it is
    how the tests and the fan-out bench check what pages receive.
    """

    def __init__(self, socket, table: perspective.Table, sequence: int):
        self.socket, self.table, self.sequence = socket, table, sequence

    @classmethod
    async def connect(cls, url: str, client: perspective.Client, origin: str | None = None) -> "Replica":
        """Joins the feed at `url` (ws://host:port/feed); `client` makes the table, e.g.
        perspective.Server().new_local_client()."""
        request = tornado.httpclient.HTTPRequest(url, headers={"Origin": origin} if origin else {})
        socket = await tornado.websocket.websocket_connect(request)
        hello = await socket.read_message()
        # After a close, read_message() would wait for ever: check each one.
        snapshot = hello and await socket.read_message()
        if snapshot is None:
            raise FeedGap(f"the feed closed before its snapshot ({socket.close_reason})")
        hello = json.loads(hello)
        return cls(socket, client.table(snapshot, limit=hello["limit"]), hello["sequence"])

    def apply(self, message: bytes) -> None:
        (sequence,) = SEQUENCE.unpack_from(message)
        if sequence != self.sequence + 1:
            raise FeedGap(f"batch {sequence} arrived, {self.sequence + 1} was next")
        self.table.update(message[SEQUENCE.size:])
        self.sequence = sequence

    async def follow(self) -> None:
        """Applies batches until the server closes the feed."""
        while (message := await self.socket.read_message()) is not None:
            self.apply(message)

    def close(self) -> None:
        self.socket.close()
