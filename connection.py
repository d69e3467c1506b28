"""Chapters 1 and 3: how producer.py and perspective_server.py reach ClickHouse.

producer.py and perspective_server.py share this module so that they agree on
where the database is and what the table is called. Everything here can be
set with a command-line flag, and each flag defaults to an environment
variable, so `./docker.sh`, the two scripts and your own deployment read the
same `CLICKHOUSE_*` names.

Two ways to reach ClickHouse:

* a server (the Docker container from `./docker.sh`, or your own) over HTTP;
* chDB, ClickHouse's engine inside this Python process (`--embedded`), for
  machines without Docker. chDB registers itself with clickhouse-connect, so
  the rest of the code uses the same client API and the same SQL either way.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError

log = logging.getLogger("connection")

TABLE = "stock_values"
MEMORY = ":memory:"


class SetupError(Exception):
    """An expected failure the user can fix; main() prints it as one line."""


@dataclass(frozen=True)
class ClickHouseSettings:
    host: str = "localhost"
    port: int = 8123
    username: str = "demo"
    password: str = "demo"
    database: str = "demo"
    secure: bool = False
    embedded: bool = False
    chdb_path: str = "chdb-data"
    wait: float = 15.0

    @property
    def address(self) -> str:
        if self.embedded:
            where = "in memory" if self.chdb_path == MEMORY else f"in {self.chdb_path}/"
            return f"embedded chDB ({where})"
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def describe(self) -> str:
        """One line for the start-up log; it never includes the password."""
        if self.embedded:
            return f"ClickHouse: {self.address}, database {self.database}"
        return f"ClickHouse: {self.address}, user {self.username}, database {self.database}"


def setup_logging() -> None:
    """Timestamped INFO logs; the driver's own retry chatter is left out
    because connect() and the scripts report failures in their own words."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("urllib3", "clickhouse_connect"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


ENVIRONMENT_HELP = """\
environment variables (each flag's default comes from one):
  CLICKHOUSE_URL       http://user:password@host:port/database, sets all of the below at once
  CLICKHOUSE_HOST      --ch-host (default localhost)
  CLICKHOUSE_PORT      --ch-port (default 8123)
  CLICKHOUSE_USER      --ch-user (default demo)
  CLICKHOUSE_PASSWORD  the password; there is no flag, so it never shows in ps or logs (default demo)
  CLICKHOUSE_DB        --ch-database (default demo)
  CLICKHOUSE_SECURE    --ch-secure when 1/true/yes
  CLICKHOUSE_WAIT      --wait (default 15)
"""
EMBEDDED_HELP = """\
  CHDB_PATH            --chdb-path (default chdb-data)
"""


def add_arguments(parser: argparse.ArgumentParser, embedded: bool = False) -> None:
    """Adds the connection flags; defaults come from CLICKHOUSE_* variables.

    `embedded` adds --embedded and --chdb-path, for the script that can host
    the whole demo in one process.
    """
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ENVIRONMENT_HELP + (EMBEDDED_HELP if embedded else "")
    group = parser.add_argument_group(
        "ClickHouse connection",
        "CLICKHOUSE_URL (e.g. http://user:pass@host:8123/db) sets all of these at once.",
    )
    url = _parse_url(os.environ.get("CLICKHOUSE_URL", ""))
    group.add_argument("--ch-host", dest="host", metavar="HOST", default=url.get("host") or _env("CLICKHOUSE_HOST", "localhost"),
                       help="server host (env CLICKHOUSE_HOST, default localhost)")
    group.add_argument("--ch-port", dest="ch_port", type=int, metavar="PORT",
                       default=str(url.get("port") or _env("CLICKHOUSE_PORT", "8123")),
                       help="server HTTP port (env CLICKHOUSE_PORT, default 8123)")
    group.add_argument("--ch-user", dest="user", metavar="USER", default=url.get("username") or _env("CLICKHOUSE_USER", "demo"),
                       help="user name (env CLICKHOUSE_USER, default demo)")
    # The password is read from the environment only, so it never shows up in
    # `ps`, shell history or --help output.
    group.add_argument("--ch-database", dest="database", metavar="DATABASE", default=url.get("database") or _env("CLICKHOUSE_DB", "demo"),
                       help="database (env CLICKHOUSE_DB, default demo)")
    group.add_argument("--ch-secure", dest="secure", action="store_true",
                       default=bool(url.get("secure")) or _env_bool("CLICKHOUSE_SECURE"),
                       help="use HTTPS (env CLICKHOUSE_SECURE)")
    group.add_argument("--wait", type=float, metavar="SECONDS", default=_env("CLICKHOUSE_WAIT", "15"),
                       help="seconds to keep retrying the first connection (default 15)")
    parser.set_defaults(_password=url.get("password") or _env("CLICKHOUSE_PASSWORD", "demo"),
                        embedded=False, chdb_path="chdb-data")
    if not embedded:
        return
    group.add_argument("--embedded", action="store_true",
                       help="run ClickHouse inside this process with chDB; no Docker needed")
    group.add_argument("--chdb-path", default=_env("CHDB_PATH", "chdb-data"),
                       help=f"with --embedded: data folder, or {MEMORY} to keep nothing "
                            "(env CHDB_PATH, default chdb-data)")


def _parse_url(url: str) -> dict:
    if not url:
        return {}
    parts = urlsplit(url)
    return {
        "host": parts.hostname,
        "port": parts.port,
        # Credentials with @ : / # must be percent-encoded in a URL.
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "database": parts.path.strip("/") or None,
        "secure": parts.scheme == "https",
    }


def settings_from_args(args: argparse.Namespace) -> ClickHouseSettings:
    if args.wait < 0:
        raise SetupError("--wait must be zero or more seconds")
    if not 0 < args.ch_port < 65536:
        raise SetupError(f"--ch-port {args.ch_port} is not a TCP port (1-65535)")
    return ClickHouseSettings(
        host=args.host,
        port=args.ch_port,
        username=args.user,
        password=args._password,
        database=args.database,
        secure=args.secure,
        embedded=args.embedded,
        chdb_path=args.chdb_path,
        wait=args.wait,
    )


def connect(settings: ClickHouseSettings) -> Client:
    """Returns a client for `settings.database`, creating that database if needed.

    A server that is not up yet is retried for `settings.wait` seconds, so the
    scripts can be started right after `./docker.sh`. Anything still wrong
    after that becomes a SetupError with one line that says what to change.
    """
    deadline = time.monotonic() + settings.wait
    announced = False
    while True:
        try:
            client = _open(settings)
            client.command(f"CREATE DATABASE IF NOT EXISTS `{settings.database}`")
            client.database = settings.database
            return client
        except SetupError:
            raise
        except Exception as error:  # clickhouse-connect wraps transport errors several ways
            problem = explain(error, settings)
            # chDB runs in this process: there is no server to wait for.
            if settings.embedded or not is_transient(error) or time.monotonic() >= deadline:
                raise SetupError(problem) from None
            if not announced:
                log.info("waiting for ClickHouse at %s ...", settings.address)
                announced = True
            time.sleep(0.5)


def _open(settings: ClickHouseSettings) -> Client:
    # autogenerate_session_id=False: a session id makes concurrent queries on
    # one client fail, and nothing here needs session state.
    if settings.embedded:
        dsn = "chdb://memory" if settings.chdb_path == MEMORY else f"chdb:///{os.path.abspath(settings.chdb_path)}"
        return clickhouse_connect.get_client(dsn=dsn)
    return clickhouse_connect.get_client(
        host=settings.host,
        port=settings.port,
        username=settings.username,
        password=settings.password,
        secure=settings.secure,
        autogenerate_session_id=False,
        connect_timeout=5,
        send_receive_timeout=30,
    )


def is_transient(error: Exception) -> bool:
    """True when retrying may help: the server is down or restarting."""
    if isinstance(error, DatabaseError) and _error_code(error) is not None:
        return False  # the server answered with a ClickHouse error: retrying will not fix it
    text = str(error).lower()
    return any(word in text for word in ("connection", "timed out", "timeout", "refused",
                                         "reset", "unavailable", "name or service", "resolve"))


def _error_code(error: Exception) -> int | None:
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return code
    text = str(error)
    marker = "Code: "
    if marker in text:
        digits = text.split(marker, 1)[1].split(".", 1)[0].strip()
        if digits.isdigit():
            return int(digits)
    return None


_REASONS = ("Connection refused", "Remote end closed connection", "Connection reset", "timed out",
            "Name or service not known", "Temporary failure in name resolution", "Connection aborted")


def short_reason(error: Exception) -> str:
    """A few words for a log line. The driver's own message for a network
    error quotes the whole request URL, statement and settings included."""
    text = str(error).strip()
    for reason in _REASONS:
        if reason.lower() in text.lower():
            return reason
    first_line = text.splitlines()[0] if text else type(error).__name__
    return first_line if len(first_line) <= 200 else first_line[:197] + "..."


def explain(error: Exception, settings: ClickHouseSettings) -> str:
    """Turns a connection failure into one line that names what to change."""
    code = _error_code(error)
    text = str(error)
    if code in (516, 192, 193, 194) or "authentication" in text.lower():
        return (f"ClickHouse at {settings.address} refused user '{settings.username}': "
                "check CLICKHOUSE_USER and CLICKHOUSE_PASSWORD")
    if code == 81:
        return f"database '{settings.database}' does not exist on {settings.address}: check --ch-database"
    if settings.embedded:
        if settings.chdb_path != MEMORY and _held_by_another_process(settings.chdb_path):
            return (f"{settings.chdb_path}/ is in use by another process (chDB lets one process open a data "
                    "folder): stop the other --embedded server, or choose another folder with --chdb-path")
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"embedded chDB failed to open {settings.chdb_path}: {first_line}"
    if is_transient(error):
        return (f"cannot reach ClickHouse at {settings.address}: start it with ./docker.sh, "
                "or run without Docker: .venv/bin/python perspective_server.py --embedded")
    if isinstance(error, ClickHouseError):
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"ClickHouse at {settings.address} said: {first_line}"
    return f"cannot use ClickHouse at {settings.address}: {type(error).__name__}: {text}"


def _held_by_another_process(folder: str) -> bool:
    """True when another process holds chDB's lock on `folder`.

    chDB (like clickhouse-server) keeps an exclusive flock on the folder's
    `status` file while it runs, and its own error for a second opener is only
    "Error initializing EmbeddedServer". Called after opening failed, so this
    process holds no lock of its own there.
    """
    status = os.path.join(folder, "status")
    try:
        with open(status, "rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(file, fcntl.LOCK_UN)
    except OSError:
        return False
    return False
