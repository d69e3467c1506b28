"""Chapter 4 (all of history, pivoted inside ClickHouse): who may connect, and what they may ask.

The History view (history.py) speaks Perspective's own protocol: the viewer
sends its pivot, the server answers with cells. This module is that
websocket's handler. It wraps the Perspective session with checks that
perspective-python's own Tornado handler does not make:

* same origin: a handshake from a page on another site gets 403, so a page
  elsewhere cannot use a visitor's browser to reach this dashboard;
* read-only: each request passes read_only.ViewerGate first, so a viewer can
  look at the hosted table but never change it;
* limits (ViewerLimits): looking can still cost the server a lot: a huge
  pivot, a flood of views or subscriptions, replies never read. So each
  limit below stops one way to do that, before the work is done, and
  answers the request with an error reply (its promise rejects) or closes
  that one connection.

Requests are handed to one worker thread per Perspective server, never run
on the IOLoop, and in order for each session.

The live feed (feed.py) shares the connection counts and the send-buffer
limit; it takes no requests at all, so it needs nothing else from here.
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import perspective
import tornado.ioloop
import tornado.websocket

import read_only

log = logging.getLogger("server")

@dataclass(frozen=True)
class ViewerLimits:
    """What one viewer may use; the defaults leave room to spare
    (docs/security.md). Connections and the send buffer apply to /feed too."""
    connections: int = 100               # open websockets, all addresses together
    connections_per_address: int = 8     # open websockets from one IP address (browser tabs)
    views: int = 16                      # live views per connection
    subscriptions: int = 4               # on_update subscriptions per view
    in_flight: int = 64                  # requests queued for Perspective per connection
    view_columns: int = 1_000            # columns a view may have after split_by
    view_cells: int = 20_000_000         # rows x columns a view may have
    read_cells: int = 1_000_000          # cells one read may return (a page of the view)
    send_buffer: int = 32 << 20          # bytes waiting to be sent before the socket is closed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --max-* flags of perspective_server.py, one per ViewerLimits field."""
    defaults = ViewerLimits()
    group = parser.add_argument_group("limits per viewer (each refusal is logged and answered with an error; "
                                      "connections and send buffer count live pages too)")
    for flag, field, text in (
        ("--max-connections", "connections", "open websockets in total"),
        ("--max-connections-per-address", "connections_per_address", "open websockets from one IP address"),
        ("--max-views", "views", "live views per connection"),
        ("--max-subscriptions", "subscriptions", "update subscriptions per view"),
        ("--max-in-flight", "in_flight", "requests waiting for Perspective per connection"),
        ("--max-view-columns", "view_columns", "columns a view may have (split_by multiplies them)"),
        ("--max-view-cells", "view_cells", "rows x columns a view may have"),
        ("--max-read-cells", "read_cells", "cells one read returns; larger reads get the first page"),
        ("--max-send-buffer", "send_buffer", "bytes queued for a viewer that does not read; then it is closed"),
    ):
        group.add_argument(flag, type=int, default=getattr(defaults, field), metavar="N", dest=f"limit_{field}",
                           help=f"{text} (default {getattr(defaults, field):,})")


def limits_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ViewerLimits:
    values = {name[len("limit_"):]: value for name, value in vars(args).items() if name.startswith("limit_")}
    for field, value in values.items():
        if value < 1:
            parser.error(f"--max-{field.replace('_', '-')} must be at least 1")
    return ViewerLimits(**values)


class Viewers:
    """Open websockets and refusals, for the log, the limits and shutdown."""
    open: set["ViewerHandler"] = set()
    by_address: collections.Counter = collections.Counter()
    refused = 0
    workers: dict[int, tuple[perspective.Server, ThreadPoolExecutor]] = {}
    _last_connection_log = 0.0

    @classmethod
    def worker(cls, server: perspective.Server) -> ThreadPoolExecutor:
        """The one thread that runs this Perspective server's requests."""
        if id(server) not in cls.workers:
            cls.workers[id(server)] = (server, ThreadPoolExecutor(1, thread_name_prefix="perspective"))
        return cls.workers[id(server)][1]

    @classmethod
    def admit(cls, address: str, limits: ViewerLimits) -> str | None:
        """None if one more websocket from `address` is within the limits, else why not."""
        if len(cls.open) >= limits.connections:
            return f"too many viewers connected (limit {limits.connections})"
        if cls.by_address[address] >= limits.connections_per_address:
            return f"too many viewers from {address} (limit {limits.connections_per_address})"
        return None

    @classmethod
    def refuse_connection(cls, reason: str) -> None:
        cls.refused += 1
        if time.monotonic() - cls._last_connection_log > 10:  # a flood is one line per 10 s
            cls._last_connection_log = time.monotonic()
            log.warning("refused a websocket: %s", reason)

    @classmethod
    def join(cls, handler) -> None:
        cls.open.add(handler)
        cls.by_address[handler.request.remote_ip] += 1

    @classmethod
    def leave(cls, handler) -> None:
        if handler in cls.open:
            cls.open.discard(handler)
            address = handler.request.remote_ip
            cls.by_address[address] -= 1
            if not cls.by_address[address]:
                del cls.by_address[address]

    @classmethod
    def close_all(cls) -> None:
        """Ends every viewer's Perspective session while the server still exists.

        A session left for garbage collection at exit can outlive the
        Perspective server it belongs to, and deleting its views then aborts
        the process ("View not found"). Each session closes on its worker,
        after the request it may be running.
        """
        for handler in list(cls.open):
            if isinstance(handler, ViewerHandler):
                handler.end_session()
            else:
                handler.close()
        for _, worker in cls.workers.values():
            worker.shutdown(wait=True)
        cls.workers.clear()


def _message_id(response: bytes) -> int | None:
    """Field 1 (msg_id) of a Perspective Response, read without a protobuf library."""
    try:
        return next((value for number, _, value in read_only.message_fields(response) if number == 1), 0)
    except read_only.MalformedRequest:
        return None


def _request(msg_id: int, view_id: bytes, kind: int) -> bytes:
    """A Request with an empty body, e.g. view_dimensions (12) or view_delete (11)."""
    return read_only.encode_message([(1, 0, msg_id), (2, 2, view_id), (kind, 2, b"")])


def _dimensions(response: bytes) -> tuple[int, int] | None:
    """(view rows, view columns) from a ViewDimensionsResp (Response field 12)."""
    for number, _, value in read_only.message_fields(response):
        if number == 12:
            fields = {n: v for n, _, v in read_only.message_fields(value)}
            return fields.get(3, 0), fields.get(4, 0)
    return None


class AdmittedSocket(tornado.websocket.WebSocketHandler):
    """A websocket that opens only for a page of this server's origin (or
    one named with --allow-origin), within the connection limits, and is
    closed once more than --max-send-buffer bytes wait to be sent to it: the
    base of History's socket here and of the live feed's (feed.py). A
    subclass's initialize() sets `allowed_origins` and `limits`; its drop()
    ends what the connection holds."""

    unsent = 0        # bytes written to the socket, not yet flushed
    kind = "viewer"    # the log line's name for the client
    behind = "behind"  # and for what it fell behind

    def check_origin(self, origin):
        # Tornado's own check: the Origin's host must equal the Host header.
        return origin in self.allowed_origins or super().check_origin(origin)

    async def get(self, *args, **kwargs):
        refusal = Viewers.admit(self.request.remote_ip, self.limits)
        if refusal is not None:
            Viewers.refuse_connection(refusal)
            self.set_status(503)
            self.finish(refusal)
            return
        await super().get(*args, **kwargs)

    def send(self, payload, binary: bool = True) -> None:
        """Writes `payload`, counted against --max-send-buffer until it is flushed."""
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        try:
            future = self.write_message(payload, binary=binary)
        except tornado.websocket.WebSocketClosedError:
            return self.drop()
        size = len(payload)
        future.add_done_callback(lambda done: self._flushed(done, size))
        self.count_unsent(size)

    def count_unsent(self, size: int) -> None:
        self.unsent += size
        if self.unsent > self.limits.send_buffer:
            log.warning("closed a %s at %s that fell %s bytes %s (--max-send-buffer)", self.kind,
                        self.request.remote_ip, f"{self.unsent:,}", self.behind)
            self.close(1008, "too far behind")
            self.drop()

    def _flushed(self, done, size: int) -> None:
        self.unsent -= size
        # Retrieve the error (the socket closed): otherwise asyncio logs
        # "Task exception was never retrieved" once per unsent message.
        if not done.cancelled():
            done.exception()

    def drop(self) -> None:
        raise NotImplementedError


class ViewerHandler(AdmittedSocket):
    """A websocket to the Perspective server: read-only, same-origin, limited.

    perspective-python's own PerspectiveTornadoHandler accepts any Origin and
    any request, so any page on the web could ask a visitor's browser to
    clear this table. Here a handshake from another origin gets 403, and
    requests that would change data, or cost more than the limits allow,
    are answered with an error instead of reaching the Perspective server.
    """

    def initialize(self, perspective_server: perspective.Server, tables=(), allowed_origins=frozenset(),
                   limits: ViewerLimits = ViewerLimits()):
        self.server = perspective_server
        self.loop = tornado.ioloop.IOLoop.current()
        self.tables = tables
        self.allowed_origins = allowed_origins
        self.limits = limits

    def open(self):
        limits = self.limits
        self.gate = read_only.ViewerGate(
            self.tables, max_views=limits.views, max_subscriptions=limits.subscriptions,
            max_read_cells=limits.read_cells)
        self.refused = 0
        self.in_flight = 0          # requests handed to the worker, not yet run
        self.size_checks: dict[int, tuple[bytes, int, bytes]] = {}  # own msg id -> (view, its msg id, request)
        self.held: dict[int, bytes] = {}                           # make_view replies awaiting their check
        self.own_ids: set[int] = set()
        self.address = self.request.remote_ip
        self.worker = Viewers.worker(self.server)
        # Perspective answers on the worker (or on the sync thread, for
        # updates); writes happen on the IOLoop.
        self.session = self.server.new_session(lambda response: self.loop.add_callback(self._send, response))
        Viewers.join(self)

    # --- requests: gate, limits, then the worker thread --------------------

    def on_message(self, message):
        if not isinstance(message, bytes) or self.session is None:
            return  # text frames mean nothing to Perspective; no session: closing
        if self.in_flight >= self.limits.in_flight:
            return self._refuse(message, f"too many requests in flight (limit {self.limits.in_flight})")
        if not self.gate.allows(message):
            return self._refuse(message, self.gate.reason)
        request = self.gate.request
        follow_up = None
        msg_id, _, kind, body = read_only.parse_request(request)
        if kind == read_only.MAKE_VIEW:
            # A view's size is known only once it exists: ask for its
            # dimensions right behind it, and hold the reply until then.
            view_id = next(value for number, _, value in read_only.message_fields(body) if number == 1)
            size_check = self._own_id()
            self.size_checks[size_check] = (view_id, msg_id, request)
            self.held[msg_id] = b""
            follow_up = _request(size_check, view_id, 12)
        self.in_flight += 1
        self.worker.submit(self._run, request, follow_up).add_done_callback(
            lambda _: self.loop.add_callback(self._ran))

    def _run(self, request: bytes, follow_up: bytes | None = None) -> None:
        """On the worker thread: one request, and maybe one of the handler's
        own right behind it on the same session."""
        session = self.session
        if session is None:  # the viewer left while this waited
            return
        session.handle_request(request)
        if follow_up is not None:
            session.handle_request(follow_up)

    def _ran(self):
        self.in_flight -= 1

    def _refuse(self, message: bytes, reason: str) -> None:
        if not self.refused:  # once per connection: enough to see who and why
            log.info("refused a request from %s: %s", self.address, reason)
        self.refused += 1
        Viewers.refused += 1
        reply = read_only.refusal(message, reason)
        if reply is not None:
            self.send(reply)

    def _own_id(self) -> int:
        """A message id for the handler's own requests. Perspective's clients
        pick random 32-bit ids; an id in use by this connection is skipped."""
        while (msg_id := random.getrandbits(32)) in self.held or msg_id in self.own_ids or msg_id == 0:
            pass
        self.own_ids.add(msg_id)
        return msg_id

    # --- responses: size checks, then the socket ---------------------------

    def _send(self, response: bytes):
        if self.session is None:
            return
        if self.own_ids or self.held:
            msg_id = _message_id(response)
            if msg_id in self.held:
                self.held[msg_id] = response  # sent once the view's size is known
                return
            if msg_id in self.own_ids:
                return self._own_reply(msg_id, response)
        self.send(response)

    def _own_reply(self, msg_id: int, response: bytes) -> None:
        self.own_ids.discard(msg_id)
        if msg_id not in self.size_checks:
            return  # the reply to a view_delete of our own
        view_id, view_msg_id, request = self.size_checks.pop(msg_id)
        created = self.held.pop(view_msg_id, b"")
        dimensions = _dimensions(response)
        if dimensions is None:  # the view was never made (e.g. a bad column): pass its error on
            # and give its slot back, or a viewer whose configs fail a few
            # times would be out of views (--max-views) until it reconnects.
            self.gate.close_view(view_id, "this view could not be made")
            self.send(created)
            return
        rows, columns = dimensions
        limits = self.limits
        if columns <= limits.view_columns and rows * columns <= limits.view_cells:
            self.gate.view_columns[view_id] = columns
            self.send(created)
            return
        reason = (f"view too large: {rows:,} rows x {columns:,} columns (limits {limits.view_columns:,} columns, "
                  f"{limits.view_cells:,} cells); group or filter more, or split by a column with fewer values")
        self.gate.close_view(view_id, reason)
        self.worker.submit(self._run, _request(self._own_id(), view_id, read_only.VIEW_DELETE))
        self._refuse(request, reason)

    # --- the end ----------------------------------------------------------

    def end_session(self):
        """Closes the Perspective session on the worker, after any request it runs."""
        session, self.session = getattr(self, "session", None), None
        if session is not None:
            self.worker.submit(session.close)
            Viewers.leave(self)

    drop = end_session

    def on_close(self):
        self.end_session()
