"""Part of ClickHouse's HTTP interface, in front of chDB.

chDB is ClickHouse's engine inside a Python process, and only one process
may open a chDB data folder. So while `perspective_server.py --embedded`
holds the folder, no other program can create a table or insert a row, and
an embedded table of your own could never grow. With `--sql-port PORT` the
server also answers ClickHouse's HTTP interface on 127.0.0.1:PORT from this
module, so producer.py, curl or your own clickhouse-connect writer can reach
the embedded database as if it were a ClickHouse server:

    .venv/bin/python perspective_server.py --embedded --table my_trades --sql-port 8123
    curl -u demo:demo http://127.0.0.1:8123/ --data-binary 'SELECT count() FROM demo.my_trades'

It is for trying things on one machine, not a server to deploy: one query at
a time, one user (CLICKHOUSE_USER and CLICKHOUSE_PASSWORD), no TLS, and it
listens on 127.0.0.1 only. The tests also run it in a process of its own
(tests/chdb_http.py), to run the three programs against one real engine.

What it implements:

* GET /ping (and / without a query) answers "Ok.".
* Queries from the `query` URL parameter and/or the POST body, run by chDB.
  The output format is the query's own FORMAT clause, else `default_format`,
  else TabSeparated, so Native, Arrow, ArrowStream, TSV, JSON... all work.
  `database` is the default database, `param_<name>` are bound parameters,
  every other URL parameter is applied as a ClickHouse setting for that
  request only (HTTP-only parameters such as session_id are ignored).
* `INSERT INTO t [(columns)] [SETTINGS ...] FORMAT F` followed by data (in the
  body, or the statement in `query` and the data in the body), with the body
  compressed or not (Content-Encoding lz4, zstd, gzip, deflate; br if the
  brotli package is installed). The data goes through a temporary file and
  `INSERT ... FROM INFILE`, so insert settings such as
  insert_deduplication_token apply as in ClickHouse.
* Credentials from X-ClickHouse-User/X-ClickHouse-Key, HTTP Basic auth or the
  user/password URL parameters, checked against the one user given on the
  command line; anything else is refused with ClickHouse's code 516.
* Errors as ClickHouse sends them: the status ClickHouse maps the error to,
  X-ClickHouse-Exception-Code, and a `Code: N. DB::Exception: ...` body.
* The headers clickhouse-connect reads: X-ClickHouse-Summary, -Format,
  -Timezone, -Query-Id and -Server-Display-Name.

What it does not: sessions (each request starts from defaults, so a SET does
not outlive its request), several users, grants, response compression (it
never compresses and never says it did; clients then read plain bytes),
ClickHouse's own compressed format (compress=1 / decompress=1), multipart
forms and external data, client_protocol_version (Native comes without block
info, so clickhouse-connect's probe falls back to protocol 0, as with its own
chdb:// backend), progress headers, streaming (results are buffered
whole), query cancellation, HTTPS, and concurrency (one query at a time).
The summary's written_rows counts the rows sent, including a batch that
deduplication dropped. Header names come out as Tornado spells them
(X-Clickhouse-Summary); HTTP header names are case-insensitive.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import re
import secrets
import tempfile
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import tornado.web

log = logging.getLogger("clickhouse_http")

# URL parameters that belong to the HTTP interface, not to the engine.
HTTP_ONLY = {"query", "database", "default_format", "query_id", "user", "password", "session_id",
             "session_timeout", "session_check", "wait_end_of_query", "buffer_size", "quota_key", "role",
             "client_protocol_version", "enable_http_compression", "send_progress_in_http_headers",
             "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
             "compress", "decompress"}

# ClickHouse's error-name -> HTTP status table (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp);
# anything not listed is 500.
HTTP_STATUS = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys("UNKNOWN_USER WRONG_PASSWORD AUTHENTICATION_FAILED SET_NON_GRANTED_ROLE "
                    "ACCESS_DENIED".split(), 403),
    **dict.fromkeys("BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE "
                    "CANNOT_PARSE_QUOTED_STRING CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER "
                    "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 "
                    "CANNOT_PARSE_INPUT_ASSERTION_FAILED CANNOT_PARSE_UUID DUPLICATE_COLUMN ILLEGAL_COLUMN "
                    "UNKNOWN_ELEMENT_IN_AST UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST TOO_BIG_AST "
                    "UNEXPECTED_AST_STRUCTURE SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH "
                    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE".split(), 400),
    **dict.fromkeys("UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE "
                    "UNKNOWN_DATABASE UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION "
                    "UNKNOWN_FORMAT UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE".split(), 404),
    "QUERY_IS_TOO_LARGE": 413, "NOT_IMPLEMENTED": 501, "SOCKET_TIMEOUT": 503, "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411, "TIMEOUT_EXCEEDED": 408, "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

# An insert whose data follows the statement: table, optional column list,
# optional SETTINGS, FORMAT name, then one newline (the data may itself
# start with whitespace bytes, so only one is taken).
INSERT_WITH_DATA = re.compile(
    rb"\s*(INSERT\s+INTO\s+(?:TABLE\s+)?[\w.`\"]+(?:\s*\([^)]*\))?)(\s+SETTINGS\s.*?)?"
    rb"\s+FORMAT\s+(\w+)[ \t]*(?:\r?\n|$)", re.IGNORECASE | re.DOTALL)
TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
RETURNS_ROWS = re.compile(r"^[\s(]*(SELECT|WITH|SHOW|DESC|DESCRIBE|EXPLAIN|EXISTS|CHECK|VALUES)\b", re.IGNORECASE)
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BINARY_FORMAT = re.compile(r"Native|Arrow|Parquet|ORC|Avro|RowBinary|MsgPack|Protobuf|CapnProto|BSON|Npy")


class ClickHouseError(Exception):
    def __init__(self, code: int, name: str, message: str):
        super().__init__(message)
        self.code, self.name = code, name

    @classmethod
    def from_engine(cls, text: str) -> "ClickHouseError":
        """Parses chDB's `Code: 60. DB::Exception: ... (UNKNOWN_TABLE)`."""
        text = text[text.find("Code: "):].strip() if "Code: " in text else text.strip()
        code = re.match(r"Code: (\d+)\.", text)
        names = re.findall(r"\(([A-Z][A-Z0-9_]+)\)", text)
        return cls(int(code.group(1)) if code else 1001, names[-1] if names else "STD_EXCEPTION", text)

    def body(self, version: str) -> str:
        message = str(self)
        if not message.startswith("Code: "):
            message = f"Code: {self.code}. DB::Exception: {message}. ({self.name})"
        return f"{message} (version {version})\n"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine:
    """The process's one chDB engine. Every call holds the lock."""

    def __init__(self, path: str):
        import chdb  # here, so that tests importing running() do not load it

        self._chdb, self.path = chdb, str(path)
        self.lock = threading.Lock()
        self._engine = chdb.connect(self.path)  # keeps the engine, and its folder lock, open
        info = self._engine.query("SELECT version(), timezone()", "TabSeparated").bytes().decode()
        self.version, self.timezone = info.split()

    def run(self, sql: str, fmt: str, database: str | None, settings: dict, params: dict):
        with self.lock:
            # A new handle per request: USE and SET are per handle, so a
            # request starts from the defaults, like an HTTP request to ClickHouse.
            conn = self._chdb.connect(self.path)
            try:
                if database:
                    conn.query("USE `" + database.replace("`", "\\`") + "`", "TabSeparated")
                for name, value in settings.items():
                    conn.query(f"SET {name} = {_quote(value)}", "TabSeparated")
                return conn.query(sql, fmt, params=params)
            except Exception as error:
                raise ClickHouseError.from_engine(str(error)) from None
            finally:
                conn.close()

    def close(self):
        with self.lock:
            self._engine.close()


def decompress(body: bytes, encoding: str | None) -> bytes:
    """Request bodies; clickhouse-connect writes one LZ4 frame per block, so
    the frames are read one after another."""
    encoding = (encoding or "identity").strip().lower()
    try:
        if encoding == "identity":
            return body
        if encoding == "lz4":
            import lz4.frame
            out = []
            while body:
                frame = lz4.frame.LZ4FrameDecompressor()
                out.append(frame.decompress(body))
                if not frame.eof:
                    raise ValueError("truncated LZ4 frame")
                body = frame.unused_data
            return b"".join(out)
        if encoding == "zstd":
            from clickhouse_connect.driver.compression import _zstd_decompress
            return _zstd_decompress(body)
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding == "br":
            import brotli
            return brotli.decompress(body)
    except ImportError as error:
        raise ClickHouseError(36, "BAD_ARGUMENTS", f"{encoding} is not available here: {error}") from None
    except Exception as error:
        raise ClickHouseError(271, "CANNOT_DECOMPRESS", f"Cannot decompress {encoding} body: {error}") from None
    raise ClickHouseError(36, "BAD_ARGUMENTS", f"Unknown HTTP Content-Encoding: {encoding}")


class PingHandler(tornado.web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish("Ok.\n")

    head = get


class QueryHandler(tornado.web.RequestHandler):
    def initialize(self, engine: Engine, executor: ThreadPoolExecutor, user: str, password: str):
        self.engine, self.executor, self.user, self.password = engine, executor, user, password

    def compute_etag(self):
        return None

    async def get(self):
        await self.answer()

    async def post(self):
        await self.answer()

    async def answer(self):
        args = {name: values[-1].decode() for name, values in self.request.query_arguments.items()}
        self.set_header("X-ClickHouse-Query-Id", args.get("query_id") or str(uuid.uuid4()))
        self.set_header("X-ClickHouse-Server-Display-Name", "chdb")
        self.set_header("X-ClickHouse-Timezone", self.engine.timezone)
        if self.request.method == "GET" and "query" not in args:
            return self.finish("Ok.\n")  # like /ping
        try:
            self.authenticate(args)
            for name in ("compress", "decompress"):
                if args.get(name, "0") not in ("0", ""):
                    raise ClickHouseError(48, "NOT_IMPLEMENTED", f"{name}=1 is not supported here")
            if self.request.headers.get("Content-Type", "").startswith("multipart/form-data"):
                raise ClickHouseError(48, "NOT_IMPLEMENTED", "multipart requests are not supported by this test harness")
            body = decompress(self.request.body, self.request.headers.get("Content-Encoding"))
            settings = {k: v for k, v in args.items() if k not in HTTP_ONLY and not k.startswith("param_")}
            for name in settings:
                if not SETTING_NAME.match(name):
                    raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
            params = {k[len("param_"):]: v for k, v in args.items() if k.startswith("param_")}
            loop = asyncio.get_running_loop()
            headers, output = await loop.run_in_executor(self.executor, self.execute, args, body, settings, params)
        except Exception as error:
            if not isinstance(error, ClickHouseError):
                log.exception("unexpected failure")
                error = ClickHouseError(1001, "STD_EXCEPTION", f"{type(error).__name__}: {error}")
            log.warning("%s", str(error).splitlines()[0])
            self.set_status(HTTP_STATUS.get(error.name, 500))
            self.set_header("X-ClickHouse-Exception-Code", str(error.code))
            self.set_header("Content-Type", "text/plain; charset=UTF-8")
            return self.finish(error.body(self.engine.version))
        for name, value in headers.items():
            self.set_header(name, value)
        self.finish(output)

    def authenticate(self, args: dict):
        headers = self.request.headers
        if "X-ClickHouse-User" in headers:
            user, password = headers["X-ClickHouse-User"], headers.get("X-ClickHouse-Key", "")
        elif headers.get("Authorization", "").startswith("Basic "):
            user, _, password = base64.b64decode(headers["Authorization"][6:]).decode().partition(":")
        else:
            user, password = args.get("user", "default"), args.get("password", "")
        if not (secrets.compare_digest(user.encode(), self.user.encode())
                and secrets.compare_digest(password.encode(), self.password.encode())):
            raise ClickHouseError(516, "AUTHENTICATION_FAILED", f"Code: 516. DB::Exception: {user}: Authentication "
                                  "failed: password is incorrect, or there is no user with such name. "
                                  "(AUTHENTICATION_FAILED)")

    def execute(self, args: dict, body: bytes, settings: dict, params: dict):
        """Runs the request on the executor thread; returns (headers, body)."""
        query, data = args.get("query", "").encode(), body
        if query:  # the statement is in the URL, the data (if any) is the body
            insert = INSERT_WITH_DATA.fullmatch(query.strip()) if body else None
        else:  # the statement, then the data, are the body
            insert = INSERT_WITH_DATA.match(body)
            data = body[insert.end():] if insert else body
        summary_extra, result_format = {}, None
        if insert:
            table, insert_settings, fmt = (group.decode() if group else "" for group in insert.groups())
            with tempfile.NamedTemporaryFile(prefix="chdb-http-", suffix="." + fmt) as file:
                file.write(data)
                file.flush()
                result = self.engine.run(f"{table} FROM INFILE {_quote(file.name)}{insert_settings} FORMAT {fmt}",
                                         "TabSeparated", args.get("database"), settings, params)
            summary_extra = {"written_rows": str(result.rows_written()), "written_bytes": str(len(data))}
        else:
            sql = "\n".join(part.decode("utf-8", "replace") for part in (query, body) if part)
            explicit = TRAILING_FORMAT.search(sql)
            result_format = explicit.group(1) if explicit else args.get("default_format") or "TabSeparated"
            result = self.engine.run(sql, result_format, args.get("database"), settings, params)
            if not (explicit or RETURNS_ROWS.match(sql)):
                result_format = None  # DDL and the like: ClickHouse names no format
        output = (result.bytes() or b"") if result_format else b""
        summary = {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read()),
                   "written_rows": str(result.rows_written()), "written_bytes": str(result.bytes_written()),
                   "result_bytes": str(len(output)), "elapsed_ns": str(int(result.elapsed() * 1e9)),
                   **summary_extra}
        binary = result_format and BINARY_FORMAT.match(result_format)
        headers = {"X-ClickHouse-Summary": json.dumps(summary),
                   "Content-Type": "application/octet-stream" if binary else "text/plain; charset=UTF-8"}
        if result_format:
            headers["X-ClickHouse-Format"] = result_format
        return headers, output


def application(engine: Engine, user: str, password: str) -> tornado.web.Application:
    """The interface's routes; queries run one at a time on a thread of their own."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb-http")
    context = {"engine": engine, "executor": executor, "user": user, "password": password}
    return tornado.web.Application([(r"/ping", PingHandler), (r"/.*", QueryHandler, context)])
