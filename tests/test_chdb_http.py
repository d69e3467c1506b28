"""The chDB HTTP test harness (tests/chdb_http.py), driven by clickhouse-connect.

These tests check the harness itself: that clickhouse-connect's real HTTP
client, with its default settings (compression on, a session id), gets what
it needs from it. The harness runs as a subprocess on a free port with its
own data folder. With CLICKHOUSE_URL set the suite runs against a real
server and never uses the harness, so these tests are skipped.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import signal
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from urllib.parse import urlencode

import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.summary import QuerySummary

import chdb_http

pytestmark = pytest.mark.skipif(bool(os.environ.get("CLICKHOUSE_URL")),
                                reason="tests the chDB test harness, which is not used with CLICKHOUSE_URL")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with chdb_http.running(tmp_path_factory.mktemp("harness") / "data") as running:
        yield running


@pytest.fixture
def database(harness):
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = harness.client()
    admin.command(f"CREATE DATABASE {name}")
    yield name
    admin.command(f"DROP DATABASE {name}")
    admin.close()


@pytest.fixture
def client(harness, database):
    """A default clickhouse-connect HTTP client whose requests carry `database`."""
    client = harness.client(database=database)
    yield client
    client.close()


def post(harness, sql: str, headers: dict | None = None, **params):
    """A plain HTTP request, for what clickhouse-connect hides: (status, headers, body).

    The headers are looked up case-insensitively, as HTTP wants; the harness
    (Tornado) spells them X-Clickhouse-..., ClickHouse X-ClickHouse-...
    """
    request = urllib.request.Request(f"{harness.url}/?{urlencode(params)}", data=sql.encode(),
                                     headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_ping_answers_ok(harness):
    with urllib.request.urlopen(f"{harness.url}/ping", timeout=5) as response:
        assert (response.status, response.read()) == (200, b"Ok.\n")
    assert harness.client().ping()


def test_command_returns_values_or_a_summary(client):
    assert client.command("SELECT 1") == 1
    assert client.command("SELECT 'a', 2") == ["a", "2"]
    assert client.command("SELECT version()").count(".") >= 2
    assert isinstance(client.command("CREATE TABLE t (x Int32) ENGINE = Memory"), QuerySummary)
    assert client.command("SELECT x FROM t") == ""  # a result, with no rows


TYPES = {
    "i8": ("Int8", -128), "i64": ("Int64", -2**63), "u64": ("UInt64", 2**64 - 1), "i128": ("Int128", -2**100),
    "f32": ("Float32", 1.5), "f64": ("Float64", 3.141592653589793), "dec": ("Decimal(18, 4)", Decimal("-1234.5678")),
    "b": ("Bool", True), "s": ("String", "héllo 'quoted' \t\n"), "fs": ("FixedString(3)", b"ab\x00"),
    "lc": ("LowCardinality(String)", "low"), "n": ("Nullable(Int32)", None),
    "d": ("Date", dt.date(2024, 2, 29)), "d32": ("Date32", dt.date(1900, 1, 1)),
    "t": ("DateTime('UTC')", dt.datetime(2024, 1, 2, 3, 4, 5)),
    "t64": ("DateTime64(6, 'UTC')", dt.datetime(2024, 1, 2, 3, 4, 5, 123456)),
    "id": ("UUID", uuid.UUID("12345678-1234-5678-1234-567812345678")), "e": ("Enum8('a' = 1, 'b' = 2)", "b"),
    "arr": ("Array(Int32)", [1, 2, 3]), "m": ("Map(String, Int32)", {"k": 1}), "tup": ("Tuple(Int32, String)", (7, "x")),
    "ip": ("IPv4", ipaddress.IPv4Address("10.1.2.3")),
}


def test_native_insert_and_query_round_trip_many_types(client):
    columns = ", ".join(f"{name} {type_}" for name, (type_, _) in TYPES.items())
    client.command(f"CREATE TABLE types ({columns}) ENGINE = MergeTree ORDER BY tuple()")
    row = [value for _, value in TYPES.values()]
    summary = client.insert("types", [row, row], column_names=list(TYPES))
    assert summary.written_rows == 2
    result = client.query("SELECT * FROM types")
    assert result.column_names == tuple(TYPES)
    # clickhouse-connect names DateTime('UTC') plain DateTime (the chdb:// backend does the same).
    expected_types = [type_.replace("DateTime('UTC')", "DateTime") for type_, _ in TYPES.values()]
    assert [type_.name for type_ in result.column_types] == expected_types
    assert result.result_rows == [tuple(row), tuple(row)]


@pytest.mark.parametrize("compress", ["lz4", "zstd", "gzip", False])
def test_compressed_native_inserts_are_decoded(harness, database, compress):
    client = harness.client(database=database, compress=compress)
    client.command("CREATE TABLE c (x UInt32, s String) ENGINE = MergeTree ORDER BY x")
    # Many blocks: clickhouse-connect compresses each block on its own.
    rows = [[i, f"row {i}" * 3] for i in range(200_000)]
    client.insert("c", rows)
    assert client.query("SELECT count(), sum(x), max(s) FROM c").result_rows == [
        (200_000, sum(range(200_000)), max(s for _, s in rows))]


def test_query_arrow_returns_an_arrow_table(client):
    table = client.query_arrow("SELECT number AS n, toString(number) AS s, toDateTime64(number, 3, 'UTC') AS t "
                               "FROM numbers(3)")
    assert table.schema.field("n").type == pa.uint64()
    assert table.column("n").to_pylist() == [0, 1, 2]
    assert table.column("s").to_pylist() == ["0", "1", "2"]
    assert pa.types.is_timestamp(table.schema.field("t").type)


def test_insert_arrow_stores_the_rows(client):
    client.command("CREATE TABLE a (x Int64, s String, at DateTime64(6, 'UTC') DEFAULT now64(6, 'UTC')) "
                   "ENGINE = MergeTree ORDER BY x")
    rows = pa.table({"x": pa.array(range(1000), pa.int64()), "s": [f"s{i}" for i in range(1000)]})
    summary = client.insert_arrow("a", rows)
    assert summary.written_rows == 1000
    assert client.query("SELECT count(), sum(x), min(at) > 0 FROM a").result_rows == [(1000, sum(range(1000)), True)]


def test_parameters_are_bound_by_the_engine(client):
    result = client.query("SELECT {x:Int64} + 1, {s:String}, {a:Array(UInt8)}",
                          parameters={"x": 41, "s": "it's", "a": [1, 2]})
    assert result.result_rows == [(42, "it's", [1, 2])]


def test_database_param_is_the_default_database(harness):
    admin = harness.client()
    names = [f"test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    try:
        for value, name in enumerate(names):
            admin.command(f"CREATE DATABASE {name}")
            admin.command(f"CREATE TABLE {name}.same (v Int32) ENGINE = Memory")
            admin.command(f"INSERT INTO {name}.same VALUES ({value})")
        for value, name in enumerate(names):
            assert harness.client(database=name).command("SELECT v FROM same") == value
        status, headers, body = post(harness, "SELECT 1", basic("demo", "demo"), database="no_such_db")
        assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "81"), body
    finally:
        for name in names:
            admin.command(f"DROP DATABASE IF EXISTS {name}")


def test_settings_apply_to_their_request_only(client):
    default = client.command("SELECT getSetting('max_block_size')")
    assert client.command("SELECT getSetting('max_block_size')", settings={"max_block_size": 1234}) == 1234
    assert client.command("SELECT getSetting('max_block_size')") == default != 1234
    with pytest.raises(DatabaseError) as error:
        client.command("SELECT 1", settings={"no_such_setting_here": 1})
    assert error.value.code == 115


@pytest.mark.parametrize("how", ["insert_arrow", "insert"])
def test_insert_deduplication_token_stores_a_retried_batch_once(client, how):
    # The producer's table settings and insert settings (producer.py).
    client.command("CREATE TABLE d (x Int64) ENGINE = MergeTree ORDER BY x "
                   "SETTINGS non_replicated_deduplication_window = 1000")
    batch = pa.table({"x": pa.array(range(100), pa.int64())})

    def send(token):
        settings = {"insert_deduplication_token": token, "async_insert_deduplicate": 1}
        if how == "insert_arrow":
            client.insert_arrow("d", batch, settings=settings)
        else:
            client.insert("d", [[x] for x in range(100)], column_names=["x"], settings=settings)

    send("batch-1")
    send("batch-1")  # a retry after a lost reply
    assert client.command("SELECT count() FROM d") == 100
    send("batch-2")  # same rows, another batch: stored again
    assert client.command("SELECT count() FROM d") == 200


def test_wrong_password_is_code_516(harness):
    with pytest.raises(DatabaseError) as error:
        harness.client(password="wrong")
    assert error.value.code == 516 and "Authentication failed" in str(error.value)
    status, headers, body = post(harness, "SELECT 1", basic("demo", "wrong"))
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (403, "516")
    assert body.decode().startswith("Code: 516. DB::Exception: demo: Authentication failed: password is incorrect, "
                                    "or there is no user with such name. (AUTHENTICATION_FAILED)")


def test_credentials_from_headers_basic_auth_or_url(harness):
    assert post(harness, "SELECT 1", {"X-ClickHouse-User": "demo", "X-ClickHouse-Key": "demo"})[::2] == (200, b"1\n")
    assert post(harness, "SELECT 1", basic("demo", "demo"))[::2] == (200, b"1\n")
    assert post(harness, "SELECT 1", user="demo", password="demo")[::2] == (200, b"1\n")
    status, headers, body = post(harness, "SELECT 1")  # no credentials: user default, no password
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (403, "516")
    assert body.startswith(b"Code: 516. DB::Exception: default: Authentication failed")


def test_unknown_table_is_code_60(client, harness, database):
    with pytest.raises(DatabaseError) as error:
        client.query("SELECT * FROM no_such_table")
    assert error.value.code == 60 and "UNKNOWN_TABLE" in str(error.value)
    status, headers, body = post(harness, "SELECT * FROM no_such_table", basic("demo", "demo"), database=database)
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "60")
    assert body.startswith(b"Code: 60. DB::Exception: ")
    status, headers, _ = post(harness, "SELEC 1", basic("demo", "demo"))
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (400, "62")


def test_response_headers_clickhouse_connect_reads(harness):
    status, headers, body = post(harness, "SELECT 1 FORMAT JSONEachRow", basic("demo", "demo"), query_id="q-1")
    assert (status, body) == (200, b'{"1":1}\n')
    assert headers["X-ClickHouse-Format"] == "JSONEachRow"
    assert headers["X-ClickHouse-Query-Id"] == "q-1"
    assert headers["X-ClickHouse-Timezone"] and headers["X-ClickHouse-Server-Display-Name"]
    assert "read_rows" in headers["X-ClickHouse-Summary"]
    assert "Content-Encoding" not in headers


def test_killed_and_restarted_on_the_same_folder_keeps_its_data(tmp_path):
    with chdb_http.running(tmp_path / "data") as harness:
        port = harness.port
        harness.client().command("CREATE TABLE default.k (x Int32) ENGINE = MergeTree ORDER BY x")
        harness.client().insert("default.k", [[1], [2]])
        harness.kill()
        assert harness.proc.returncode == -signal.SIGKILL
        harness.restart()
        assert harness.port == port
        assert harness.client().command("SELECT sum(x) FROM default.k") == 3
        assert harness.stop(signal.SIGTERM) == 0
        harness.restart()
        assert harness.client().command("SELECT count() FROM default.k") == 2
        assert harness.stop(signal.SIGINT) == 0


def test_a_second_harness_on_a_locked_folder_fails(harness):
    with pytest.raises(RuntimeError, match="exited with 1"):
        with chdb_http.running(harness.path, log_path=harness.path.parent / "second.log"):
            pass
