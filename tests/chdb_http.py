"""A TEST HARNESS, NOT A CLICKHOUSE SERVER: chDB behind a small HTTP front.

This machine has no ClickHouse server and no Docker, only chDB (ClickHouse's
engine as a Python module, one process per data folder). To run producer.py
and perspective_server.py as separate processes against one real engine, as
the README's three-program setup does, this script hosts chDB in its own
process behind clickhouse_http.py (part of ClickHouse's HTTP interface,
enough for clickhouse-connect's HTTP client; its docstring lists what it
does and does not do):

    .venv/bin/python tests/chdb_http.py --port 8123 --path DATA_DIR --user demo --password demo

It prints "ready on http://127.0.0.1:PORT" once listening (--port 0 picks a
free port) and exits 0 on SIGINT or SIGTERM. It listens on 127.0.0.1 only.

`running()` at the bottom starts it as a subprocess for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import tornado.httpserver
import tornado.netutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from tests/

from clickhouse_http import Engine, application  # noqa: E402

async def serve(engine: Engine, port: int, user: str, password: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = application(engine, user, password)
    sockets = tornado.netutil.bind_sockets(port, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app, max_body_size=1 << 30)
    server.add_sockets(sockets)
    print(f"ready on http://127.0.0.1:{sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.stop()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), 2)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Test harness: chDB behind part of ClickHouse's HTTP interface.")
    parser.add_argument("--port", type=int, default=8123, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--path", required=True, help="chDB data folder")
    parser.add_argument("--user", default="demo")
    parser.add_argument("--password", default="demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # until the loop takes over
    try:
        engine = Engine(args.path)
        try:
            asyncio.run(serve(engine, args.port, args.user, args.password))
        finally:
            engine.close()
    except KeyboardInterrupt:
        pass
    except OSError as error:
        print(f"chdb_http.py: cannot listen on 127.0.0.1:{args.port}: {error.strerror}", file=sys.stderr)
        return 1
    except Exception as error:  # chDB refused the folder (locked by another process, ...)
        print(f"chdb_http.py: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


# --- for tests ---------------------------------------------------------------

class Harness:
    """This script as a subprocess, logging to a file; see running()."""

    def __init__(self, path: Path, port: int, user: str, password: str, log_path: Path):
        self.path, self.port, self.user, self.password, self.log_path = Path(path), port, user, password, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60) -> "Harness":
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--port", str(self.port), "--path", str(self.path),
                 "--user", self.user, "--password", self.password],
                stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chdb_http.py exited with {self.proc.returncode}:\n{self.log()}")
            ready = re.search(r"ready on http://127\.0\.0\.1:(\d+)", self.log()[offset:])
            if ready:
                self.port = int(ready.group(1))
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/ping", timeout=5) as answer:
                    if answer.read() == b"Ok.\n":
                        return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"chdb_http.py was not ready in {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5) -> int:
        """Sends `sig` and waits up to `timeout` s; returns the exit code (raises if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"chdb_http.py ignored signal {sig} for {timeout} s:\n{self.log()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean shutdown of the engine."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def restart(self) -> "Harness":
        """Stops it if running, then starts it on the same port and data folder."""
        if self.proc.poll() is None:
            self.stop()
        return self.start()

    def env(self) -> dict[str, str]:
        """CLICKHOUSE_* variables that point producer.py and perspective_server.py here."""
        return {"CLICKHOUSE_HOST": "127.0.0.1", "CLICKHOUSE_PORT": str(self.port),
                "CLICKHOUSE_USER": self.user, "CLICKHOUSE_PASSWORD": self.password}

    def client(self, **kwargs):
        import clickhouse_connect

        options = {"host": "127.0.0.1", "port": self.port, "username": self.user, "password": self.password}
        return clickhouse_connect.get_client(**{**options, **kwargs})


@contextlib.contextmanager
def running(path, port: int | None = None, user: str = "demo", password: str = "demo", log_path=None):
    """Starts the harness on `path` (a chDB folder) and stops it on exit.

    Yields a Harness with .port, .url, .stop(), .kill(), .restart(), .env()
    and .client(). `port` None picks a free one, kept across restarts.
    """
    path = Path(path)
    harness = Harness(path, port or 0, user, password, Path(log_path or f"{path}.chdb_http.log"))
    harness.start()
    try:
        yield harness
    finally:
        if harness.proc.poll() is None:
            try:
                harness.stop()
            except RuntimeError:
                pass


if __name__ == "__main__":
    sys.exit(main())
