"""What a user sees when something is wrong: one line, a non-zero exit."""

from __future__ import annotations

import asyncio
import base64
import signal
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import producer
from perspective_server import wait_for_table
from servers import follow_feed
from tailer import SchemaError, TableNotFound, Tail

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args, timeout=60):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), "PYTHONPATH": str(ROOT)})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_lines(result) -> list[str]:
    """stderr without the log lines (they start with a timestamp)."""
    return [line for line in result.stderr.splitlines() if line and not line[:4].isdigit()]


@pytest.mark.parametrize("script", ["producer.py", "perspective_server.py"])
def test_unreachable_clickhouse_is_one_line_naming_the_address_and_the_fix(script):
    port = free_port()  # nothing listens there
    result = run_script(script, "--ch-port", str(port), "--wait", "0")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"{script}: cannot reach ClickHouse at http://localhost:{port}: start it with ./docker.sh, "
        "or run without Docker: .venv/bin/python perspective_server.py --embedded"]
    assert "Traceback" not in result.stderr


def test_the_server_says_when_its_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("perspective_server.py", "--embedded", "--chdb-path", ":memory:", "--port", str(port))
    assert result.returncode == 1
    assert error_lines(result) == [f"perspective_server.py: port {port} is already in use: stop the other "
                                   "program or choose another with --port"]


@pytest.mark.parametrize("script, flag, value", [
    ("producer.py", "--interval", "0"),
    ("producer.py", "--batch-size", "-3"),
    ("perspective_server.py", "--port", "70000"),
    ("perspective_server.py", "--limit", "0"),
    ("perspective_server.py", "--ch-port", "http"),
])
def test_bad_flags_get_an_argparse_error(script, flag, value):
    result = run_script(script, flag, value)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"{script}: error:")
    assert flag in result.stderr.splitlines()[-1]


def test_the_password_is_not_printed(tmp_path):
    secret = "pw-never-shown-4821"
    result = subprocess.run([sys.executable, "producer.py", "--ch-port", str(free_port()), "--wait", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "CLICKHOUSE_PASSWORD": secret})
    help_text = run_script("perspective_server.py", "--help").stdout
    assert result.returncode == 1
    assert secret not in result.stdout + result.stderr
    assert secret not in help_text


def test_the_server_waits_for_a_table_that_does_not_exist_yet(new_client, caplog):
    client = new_client()
    tail = Tail(client, "stock_values", "inserted_at", "id", 3.0)
    creator = threading.Timer(1.5, producer.create_table, args=(new_client(),))
    creator.start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="server"):
        found = asyncio.run(asyncio.wait_for(wait_for_table(tail, asyncio.to_thread, asyncio.Event()), timeout=30))
    assert found
    creator.join()
    assert time.monotonic() - started >= 1.0, "it returned before the table existed"
    assert f"no table stock_values in database {client.database} (it has no tables); waiting for it" in caplog.text
    assert tail.perspective_schema["close"] == "float"


def test_a_table_without_a_cursor_column_is_refused_with_the_readmes_whole_recipe(new_client):
    from test_own_table import recipe_statements

    client = new_client()
    client.command("CREATE TABLE trades (t DateTime, x Int32) ENGINE = MergeTree ORDER BY t")
    tail = Tail(client, "trades", "inserted_at", None, 3.0)
    with pytest.raises(SchemaError) as refused:
        tail.describe()
    message = str(refused.value)
    assert "\n" not in message
    for statement in recipe_statements():  # the README's recipe is written for a table named trades
        assert statement in message
    # A --cursor that names a column of another type: the recipe adds a new one.
    with pytest.raises(SchemaError, match="then --cursor inserted_at"):
        Tail(client, "trades", "x", None, 3.0).describe()


@pytest.fixture
def clickhouse_http(tmp_path):
    """A ClickHouse HTTP endpoint (the chDB test harness) with user demo / password demo."""
    import chdb_http

    with chdb_http.running(tmp_path / "engine") as harness:
        yield harness


def run_against(harness, script, *args, password="demo"):
    return subprocess.run(
        [sys.executable, script, "--ch-host", "127.0.0.1", "--ch-port", str(harness.port), "--wait", "0", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CLICKHOUSE_USER": "demo", "CLICKHOUSE_PASSWORD": password})


@pytest.mark.parametrize("script", ["producer.py", "perspective_server.py"])
def test_a_wrong_password_is_one_line_naming_the_settings(clickhouse_http, script):
    result = run_against(clickhouse_http, script, password="not-the-password")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"{script}: ClickHouse at http://127.0.0.1:{clickhouse_http.port} refused user 'demo': "
        "check CLICKHOUSE_USER and CLICKHOUSE_PASSWORD"]
    assert "not-the-password" not in result.stdout + result.stderr


def test_an_unknown_host_is_one_line_naming_it():
    result = run_script("producer.py", "--ch-host", "no-such-host.invalid", "--wait", "0")
    assert result.returncode == 1
    assert error_lines(result) == [
        "producer.py: cannot reach ClickHouse at http://no-such-host.invalid:8123: start it with ./docker.sh, "
        "or run without Docker: .venv/bin/python perspective_server.py --embedded"]


def test_a_missing_table_is_one_line_once_the_wait_is_over(clickhouse_http):
    result = run_against(clickhouse_http, "perspective_server.py", "--table", "no_such_table",
                         "--table-wait", "1", "--port", str(free_port()))
    assert result.returncode == 1
    assert "no table no_such_table in database demo (it has no tables); waiting for it" in result.stderr
    assert error_lines(result) == [
        "perspective_server.py: no table no_such_table in database demo (it has no tables) after 1 s: "
        "start producer.py, or name your table with --table and its database with --ch-database"]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
                          if len(address) == 8 else address)
    return found


def test_the_server_listens_on_loopback_only_and_keeps_the_password_to_itself(tmp_path):
    import urllib.request

    import chdb_http

    secret = "pw-4821-never-shown"
    port = free_port()
    with chdb_http.running(tmp_path / "engine", password=secret) as harness:
        log_path = tmp_path / "server.log"
        with open(log_path, "w") as log_file:
            server = subprocess.Popen(
                [sys.executable, "perspective_server.py", "--ch-host", "127.0.0.1", "--ch-port", str(harness.port),
                 "--port", str(port)],
                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin", "CLICKHOUSE_USER": "demo", "CLICKHOUSE_PASSWORD": secret})
            try:
                page = b""
                for _ in range(100):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                            page = response.read()
                        break
                    except OSError:
                        time.sleep(0.2)
                assert page, log_path.read_text()
                assert listening_addresses(port) == {"127.0.0.1"}
            finally:
                server.send_signal(signal.SIGINT)
                assert server.wait(timeout=10) == 0
    assert secret.encode() not in page
    assert secret not in log_path.read_text()


def _chdb(folder, sql: str) -> str:
    """Runs statements on an embedded chDB folder in a process of its own
    (chDB opens one folder per process, and this one already has an engine)."""
    script = ("import sys, clickhouse_connect\n"
              "client = clickhouse_connect.get_client(dsn='chdb:///' + sys.argv[1])\n"
              "client.command('CREATE DATABASE IF NOT EXISTS demo')\n"
              "client.database = 'demo'\n"
              "out = [client.command(s) for s in sys.argv[2].split(';') if s.strip()]\n"
              "print(out[-1])\n")
    result = run_script("-c", script, str(folder), sql)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_chdb_folder_in_use_is_one_line_naming_the_fix(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, clickhouse_connect\n"
         "engine = clickhouse_connect.get_client(dsn='chdb:///' + sys.argv[1])\n"
         "engine.command('SELECT 1')\n"
         "print('open', flush=True)\ntime.sleep(60)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        result = run_script("perspective_server.py", "--embedded", "--chdb-path", str(tmp_path),
                            "--port", str(free_port()))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"perspective_server.py: {tmp_path}/ is in use by another process (chDB lets one process open a data "
        "folder): stop the other --embedded server, or choose another folder with --chdb-path")
    assert "Traceback" not in result.stderr


def readme_embedded_own_table() -> tuple[list[str], list[str]]:
    """The README's embedded own-table commands: the server's arguments, and
    the SQL each `curl ... --data-binary "..."` sends."""
    readme = (ROOT / "README.md").read_text()
    server = re.search(r"^\.venv/bin/python perspective_server\.py (--embedded [^#\n]*--sql-port \d+)", readme, re.M)
    statements = re.findall(r"^curl -u demo:demo 'http://127\.0\.0\.1:\d+/' --data-binary \"(.+)\"$", readme, re.M)
    assert server and len(statements) == 2, "README.md lost its --sql-port example"
    return server.group(1).split(), statements


def test_the_readmes_embedded_own_table_grows_through_the_sql_port(tmp_path):
    # As the README has it, but on free ports and a folder of the test's:
    # the server holds the chDB folder, so the table is created and written
    # through --sql-port, with the README's own statements (sent as its curl
    # lines send them: POST, basic auth).
    arguments, (create, insert) = readme_embedded_own_table()
    port, sql_port = free_port(), free_port()
    arguments[arguments.index("--sql-port") + 1] = str(sql_port)
    table = arguments[arguments.index("--table") + 1]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "perspective_server.py", *arguments, "--chdb-path", str(tmp_path),
                                   "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_for_log(text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in log_path.read_text() and time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()
            time.sleep(0.2)
        assert text in log_path.read_text()

    def curl(sql: str) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{sql_port}/", data=sql.encode(), headers={
            "Authorization": "Basic " + base64.b64encode(b"demo:demo").decode()})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200

    async def rows_on_the_page(count: int) -> int:
        replica, follower = await follow_feed(port)
        deadline = time.monotonic() + 30
        while replica.table.size() < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        size = replica.table.size()
        replica.close()
        follower.cancel()
        return size

    try:
        wait_for_log(f"no table {table} in database demo")
        curl(create)
        curl(insert)
        wait_for_log(f"backfilled 1 rows into Perspective table {table}")
        assert "the demo producer writes only stock_values, so it is not started" in log_path.read_text()
        # New rows, while the server runs, reach the page.
        for key in (2, 3, 4):
            curl(insert.replace("VALUES (1,", f"VALUES ({key},"))
        assert asyncio.run(rows_on_the_page(4)) == 4
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0, log_path.read_text()
    assert _chdb(tmp_path, "SELECT count() FROM system.tables WHERE database = 'demo' AND name = 'stock_values'") == "0"
    assert _chdb(tmp_path, f"SELECT count() FROM {table}") == "4"


def test_sql_port_is_for_embedded_mode_only():
    result = run_script("perspective_server.py", "--sql-port", "8124")
    assert result.returncode == 2
    assert "--sql-port needs --embedded" in result.stderr and "Traceback" not in result.stderr


def test_help_names_the_environment_variables(capsys):
    for script in ("producer.py", "perspective_server.py"):
        result = run_script(script, "--help")
        assert result.returncode == 0
        for variable in ("CLICKHOUSE_URL", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_WAIT"):
            assert variable in result.stdout, f"{script} --help does not name {variable}"


def test_a_missing_table_names_the_database_looked_in_and_its_tables(new_client):
    client = new_client()
    client.command("CREATE TABLE trades (t DateTime64(6, 'UTC')) ENGINE = MergeTree ORDER BY t")
    with pytest.raises(TableNotFound, match=f"^no table t_default in database {client.database} "
                                            r"\(tables there: trades\)$"):
        Tail(client, "t_default", "inserted_at", None, 3.0).describe()
