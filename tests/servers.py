"""perspective_server.py as a real subprocess, for tests that need the whole server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """perspective_server.py --embedded as a subprocess, logging to a file.

    A file, not a pipe: the server logs every few seconds and would block on
    a full pipe nobody reads.
    """

    def __init__(self, port: int, data_dir: Path, log_path: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # A fresh chDB folder per test: no file lock shared with a demo the
        # developer may be running, and the table starts small, so the row
        # count can still grow (the live table is capped at --limit rows).
        self.proc = subprocess.Popen(
            [sys.executable, "perspective_server.py", "--embedded", "--port", str(port),
             "--chdb-path", str(data_dir)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self):
        if serves(self.url, self.proc, STARTUP_TIMEOUT_S):
            return
        if self.proc.poll() is not None:
            pytest.fail(f"perspective_server.py exited early ({self.proc.returncode}):\n{self.log()}")
        pytest.fail(f"perspective_server.py did not answer {self.url} in {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> int:
        """SIGINT (Ctrl-C, as a user stops it) and wait; kill only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                pytest.fail(f"perspective_server.py ignored SIGINT for 30 s:\n{self.log()}")
        self._log.close()
        return self.proc.returncode


def server_factory(tmp_path):
    """Factory: start a server (optionally on a given port, e.g. to restart one)."""
    servers: list[Server] = []
    data_dir = tmp_path / "chdb-data"

    def start(port: int | None = None) -> Server:
        server = Server(port or free_port(), data_dir, tmp_path / "server.log")
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()




def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def open_viewer(port: int, origin: str | None = None, path: str = "/history"):
    """A Perspective client over a real websocket to History, as the page's History view is.

    Returns (client, socket, reader task); cancel the reader when done.
    """
    import asyncio

    import perspective
    import tornado.httpclient
    import tornado.websocket

    request = tornado.httpclient.HTTPRequest(
        f"ws://127.0.0.1:{port}{path}", headers={"Origin": origin or f"http://127.0.0.1:{port}"})
    socket = await tornado.websocket.websocket_connect(request)

    async def send(message):
        await socket.write_message(message, binary=True)

    client = perspective.AsyncClient(send)

    async def pump():
        while (message := await socket.read_message()) is not None:
            await client.handle_response(message)

    return client, socket, asyncio.ensure_future(pump())


async def follow_feed(port: int, patience: float = 60):
    """A copy of the live table that follows /feed, as a page does: (replica, its follow task).

    Retries while the server has no table yet (it closes the feed with 1013);
    a server without /feed (404) is an error at once.
    """
    import asyncio

    import perspective
    import tornado.httpclient

    from feed import FeedGap, Replica

    deadline = time.monotonic() + patience
    while True:
        try:
            replica = await Replica.connect(f"ws://127.0.0.1:{port}/feed", perspective.Server().new_local_client(),
                                            f"http://127.0.0.1:{port}")
            return replica, asyncio.ensure_future(replica.follow())
        except (FeedGap, OSError, tornado.httpclient.HTTPClientError) as error:
            if time.monotonic() > deadline or getattr(error, "code", None) == 404:
                raise  # out of patience, or a server with no /feed at all
            await asyncio.sleep(0.2)


def serves(url: str, proc, timeout: float) -> bool:
    """True once `url` answers 200; False if the process `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def wait_for_page(url: str, server: "Program", others: tuple["Program", ...] = ()) -> None:
    """Waits until perspective_server.py serves `url`; fails with every log if it never does."""
    if serves(url, server.proc, STARTUP_TIMEOUT_S):
        return
    pytest.fail(f"perspective_server.py never served {url}:\n" + "\n".join(p.log() for p in [server, *others]))


class Program:
    """`python <script> <args>` from the repository root, logging to a file."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], log_path: Path, start: bool = True):
        self.script, self.args, self.env, self.log_path = script, args, env, log_path
        self.proc = None
        if start:
            self.start()

    def start(self) -> None:
        # The user's CLICKHOUSE_URL and friends would override the test's own.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "CHDB_"))}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, self.script, *self.args], cwd=REPO,
                                         env={**base, **self.env}, stdout=log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log(self) -> str:
        return f"--- {self.script} (exit {self.proc and self.proc.poll()}):\n{self.text()}"

    def interrupt(self, timeout: float = 5) -> int | None:
        """Ctrl-C; the exit code, or None if it is still running after `timeout`."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
