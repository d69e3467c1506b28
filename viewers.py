"""Who may connect, and what a connection may ask: the viewers' websocket.

Every browser that opens the page holds one websocket to the server. This
module is that websocket's handler. It wraps Perspective's server session
with two checks that perspective-python's own Tornado handler does not make:

* same origin: a handshake from a page on another site gets 403, so a page
  elsewhere cannot use a visitor's browser to reach this dashboard;
* read-only: each request passes read_only.ViewerGate first, so a viewer can
  look at the hosted table but never change it.
"""

from __future__ import annotations

import logging

import perspective
import tornado.ioloop
import tornado.websocket

import read_only

log = logging.getLogger("server")


class Viewers:
    """Open websockets and refused writes, for the log and for shutdown."""
    open: set["ViewerHandler"] = set()
    refused = 0

    @classmethod
    def close_all(cls) -> None:
        """Ends every viewer's Perspective session while the server still exists.

        A session left for garbage collection at exit can outlive the
        Perspective server it belongs to, and deleting its views then aborts
        the process ("View not found").
        """
        for handler in list(cls.open):
            handler.end_session()


class ViewerHandler(tornado.websocket.WebSocketHandler):
    """A websocket to the Perspective server, read-only and same-origin.

    perspective-python's own PerspectiveTornadoHandler accepts any Origin and
    any request, so any page on the web could ask a visitor's browser to
    clear this table. Here a handshake from another origin gets 403, and
    requests that would change data are answered with an error instead of
    reaching the Perspective server.
    """

    def initialize(self, perspective_server: perspective.Server, tables=(), allowed_origins=frozenset()):
        self.server = perspective_server
        self.loop = tornado.ioloop.IOLoop.current()
        self.tables = tables
        self.allowed_origins = allowed_origins

    def check_origin(self, origin):
        # Tornado's own check: the Origin's host must equal the Host header.
        return origin in self.allowed_origins or super().check_origin(origin)

    def open(self):
        self.gate = read_only.ViewerGate(self.tables)
        self.refused = 0
        # Perspective may answer from another thread; writes happen on the IOLoop.
        self.session = self.server.new_session(lambda response: self.loop.add_callback(self._send, response))
        Viewers.open.add(self)

    def _send(self, response: bytes):
        try:
            self.write_message(response, binary=True)
        except tornado.websocket.WebSocketClosedError:
            self.end_session()

    def on_message(self, message):
        if not isinstance(message, bytes) or not hasattr(self, "session"):
            return  # text frames mean nothing to Perspective; no session: shutting down
        if not self.gate.allows(message):
            if not self.refused:  # once per connection: enough to see who and why
                log.info("refused a request from %s: %s", self.request.remote_ip, self.gate.reason)
            self.refused += 1
            Viewers.refused += 1
            reply = read_only.refusal(message)
            if reply is not None:
                self.write_message(reply, binary=True)
            return
        self.session.handle_request(message)

    def end_session(self):
        if hasattr(self, "session"):
            self.session.close()
            del self.session
        Viewers.open.discard(self)

    def on_close(self):
        self.end_session()
