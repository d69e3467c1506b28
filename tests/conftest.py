"""Shared fixtures: a real ClickHouse engine for every integration test.

By default the engine is chDB (ClickHouse in this process, via
clickhouse-connect's chdb:// backend). Set CLICKHOUSE_URL, e.g.
http://demo:demo@localhost:8123, to run the same tests against a server.
chDB hosts one engine per process, so tests share it and each test gets a
database of its own.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit

import clickhouse_connect
import pytest

import servers


def _new_client():
    url = os.environ.get("CLICKHOUSE_URL")
    if not url:
        return clickhouse_connect.get_client(dsn="chdb://memory")
    parts = urlsplit(url)
    return clickhouse_connect.get_client(
        host=parts.hostname, port=parts.port or 8123, username=parts.username or "default",
        password=parts.password or "", secure=parts.scheme == "https", autogenerate_session_id=False)


@pytest.fixture
def database():
    """A fresh database name, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = _new_client()
    admin.command(f"CREATE DATABASE {name}")
    yield name
    admin.command(f"DROP DATABASE IF EXISTS {name}")
    admin.close()


@pytest.fixture
def new_client(database):
    """Opens clients on the test's database; one per thread, as the scripts do."""
    clients = []

    def open_client():
        client = _new_client()
        client.database = database
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


@pytest.fixture
def start_server(tmp_path):
    """Starts perspective_server.py --embedded subprocesses; stops them after the test."""
    yield from servers.server_factory(tmp_path)


@pytest.fixture(scope="session")
def local_assets():
    """Perspective's browser code in assets/, as the README's setup command
    leaves it (assets.py; it does nothing if the files are already there), so
    a server started after this serves the page's scripts itself."""
    import fcntl
    import tempfile
    from pathlib import Path

    import assets
    with open(Path(tempfile.gettempdir()) / "perspective-assets.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers run in parallel: one downloads, the others wait
        if not assets.installed():
            assets.install()
    return assets.FOLDER
