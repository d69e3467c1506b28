"""Chapter 2: reading each new row exactly once.

ClickHouse has no change feed, so the server polls. The tempting query,
`WHERE timestamp >= now() - INTERVAL 1 SECOND`, is wrong twice over: every
row comes back on several polls (duplicates), and a row whose insert commits
after the window has moved past it never comes back (loss). Inserts are not
visible in the order of their timestamps: async inserts are buffered, and a
large insert commits in pieces.

What this module does instead:

* The table has a cursor column that ClickHouse stamps when a row arrives,
  `inserted_at DateTime64(6) DEFAULT now64(6)`, and the cursor leads the
  ORDER BY, so each poll is a range scan over the newest part of the index.
* The watermark is the largest cursor delivered so far. Rows that commit
  late, with a cursor a little older than rows already delivered, still
  fall inside the window `[watermark - overlap, watermark]`.
* The keys read inside that window are remembered. Once a second
  (--check-every), a poll first asks ClickHouse for one row: how many
  distinct keys the window holds now, and their XOR. If both match what was
  remembered, nothing committed late, and the poll fetches only
  `cursor > watermark`, as the polls between checks do. If not, it fetches
  the whole window again and drops the keys it already delivered. So a row
  is fetched once, not overlap / interval (30) times, and the check reads
  the window once a second, not ten times.
* The window a check compares starts `overlap` before the watermark of the
  last check that *succeeded*, not before today's watermark. Between two
  checks the watermark moves on (a second of new rows, or more: a slow poll,
  or an outage and the rows written after it), and a row that committed late
  meanwhile has a cursor older than the newer watermark allows. Anchored to
  the last good check, a failed or delayed check only makes the next one
  wider; it never lets a row fall out of it.
* The backfill (the newest --limit rows, at start) remembers the keys of
  every row in the window, including the ones it leaves out, so the first
  poll does not deliver them.

The guarantee: every row that becomes visible within `overlap` seconds of
its cursor is delivered exactly once. A row on time (cursor past the
watermark) arrives at the next poll; a late one at the first check that
succeeds after it commits: within --check-every plus a poll, or, after an
outage, at the first check once ClickHouse is back. A row that becomes
visible more than `overlap` seconds after its cursor was stamped is missed.
Raise --overlap if your inserts can take longer to commit.

Why anchoring is enough: a row not yet visible at the last good check
became visible after it, so after the watermark that check covered (that
watermark is the cursor of a row already read, stamped earlier still).
Visible within `overlap` of its cursor, its cursor is then later than that
watermark minus `overlap`: inside the next check's window.

`Cursor` is the pure bookkeeping (tested without a database); `Tail` is the
SQL around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_connect.driver.client import Client

from clickhouse_types import Column, map_columns, quote

KEY = "__key"
CURSOR = "__cursor"  # the cursor column as microseconds since the epoch


@dataclass
class Cursor:
    """Watermark plus the keys already read inside the overlap window."""

    overlap_us: int
    watermark: int | None = None
    # The watermark when the window was last compared, or read whole, and
    # found delivered: every row visible then, up to here, is delivered.
    checked_up_to: int | None = None
    delivered: pa.Table = field(default_factory=lambda: pa.table({KEY: pa.array([], pa.string()),
                                                                 CURSOR: pa.array([], pa.int64())}))

    @property
    def lower_bound(self) -> int | None:
        """The smallest cursor a row not yet read can have, or None for all:
        `overlap` before the last good check (module docstring)."""
        return None if self.checked_up_to is None else self.checked_up_to - self.overlap_us

    def accept(self, rows: pa.Table) -> pa.Table:
        """Returns the rows not delivered before and records them as delivered.

        `rows` must have a KEY column (any type, the same every time) and an
        int64 CURSOR column.
        """
        if rows.num_rows == 0:
            return rows
        if self.delivered.num_rows and self.delivered.schema.field(KEY).type != rows.schema.field(KEY).type:
            raise TypeError("the key column changed type between reads")
        fresh = rows
        if self.delivered.num_rows:
            known = self.delivered.column(KEY).combine_chunks()
            fresh = rows.filter(pc.invert(pc.is_in(rows.column(KEY), value_set=known)))
        # The same key twice in one read (a duplicate row in ClickHouse) is
        # still one row for the viewer.
        if fresh.num_rows:
            fresh = _first_of_each_key(fresh)
            self.advance(pc.max(fresh.column(CURSOR)).as_py())
        self.remember(rows)
        return fresh

    def start_at(self, watermark: int, window: pa.Table) -> None:
        """Starts from `watermark`, with `window` holding every key already in
        [watermark - overlap, watermark], one row each with its newest cursor
        (the backfill reads it grouped from ClickHouse)."""
        self.watermark = self.checked_up_to = watermark
        self.delivered = window

    def checked(self, up_to: int | None) -> None:
        """Records a check that succeeded: the window up to `up_to` (the
        watermark the check compared) holds only delivered keys. Keys below
        the new lower bound are forgotten: no check will compare them again.

        `up_to` None means a first read of the whole table: it covered
        everything it returned, up to the watermark it set.
        """
        self.checked_up_to = self.watermark if up_to is None else up_to
        if self.checked_up_to is not None:
            self.delivered = self.delivered.filter(pc.greater_equal(self.delivered.column(CURSOR),
                                                                    self.lower_bound))

    def advance(self, cursor_us: int) -> None:
        """Moves the watermark forward to `cursor_us` (never back)."""
        self.watermark = cursor_us if self.watermark is None else max(self.watermark, cursor_us)

    def remember(self, rows: pa.Table) -> None:
        """Records the keys of `rows` as read, whether they were delivered or
        deliberately left out (rows older than the backfill), and forgets keys
        that have fallen out of the window the next check compares.

        Each key is kept with the newest cursor it was read at: a second copy
        of a delivered row, stored later, must stay suppressed for as long as
        a poll can read it, not only as long as the first.
        """
        lower = self.lower_bound
        if lower is not None:
            rows = rows.filter(pc.greater_equal(rows.column(CURSOR), lower))
        plain = pa.schema([(KEY, rows.schema.field(KEY).type), (CURSOR, pa.int64())])
        remembered = pa.concat_tables([self.delivered.cast(plain), rows.select([KEY, CURSOR]).cast(plain)])
        if lower is not None:
            remembered = remembered.filter(pc.greater_equal(remembered.column(CURSOR), lower))
        if not _has_duplicate_keys(remembered.column(KEY)):
            self.delivered = remembered  # each key once already (the usual case, and cheaper to check than to group)
            return
        newest_per_key = remembered.group_by(KEY, use_threads=False).aggregate([(CURSOR, "max")])
        self.delivered = pa.table({KEY: newest_per_key.column(KEY), CURSOR: newest_per_key.column(f"{CURSOR}_max")})

    def fingerprint(self) -> tuple[int, int]:
        """(how many, XOR of) the integer keys read inside the window.

        If ClickHouse gives the same two figures for the distinct keys whose
        cursor lies in [lower_bound, watermark], nothing committed late into
        the window, and a poll only needs the rows after the watermark.
        """
        keys = self.delivered.column(KEY).to_numpy().astype(np.uint64, copy=False)
        return len(keys), int(np.bitwise_xor.reduce(keys)) if len(keys) else 0


def _first_of_each_key(rows: pa.Table) -> pa.Table:
    if not _has_duplicate_keys(rows.column(KEY)):
        return rows
    indexed = rows.append_column("__row", pa.array(range(rows.num_rows), pa.int64()))
    first_rows = indexed.group_by(KEY, use_threads=False).aggregate([("__row", "min")]).column("__row_min")
    return rows.take(pc.take(first_rows, pc.sort_indices(first_rows)))


def _has_duplicate_keys(keys: pa.ChunkedArray) -> bool:
    if pa.types.is_integer(keys.type) and keys.null_count == 0:
        # Sorting a million 64-bit hashes takes a fifth of the time of
        # counting them distinct with a hash table (0.08 s against 0.4 s).
        ordered = np.sort(keys.to_numpy())
        return bool((ordered[1:] == ordered[:-1]).any())
    return pc.count_distinct(keys).as_py() != len(keys)


class _KeySet:
    """The 64-bit key hashes a backfill has loaded so far, kept sorted.

    Duplicates across pages are rare, so the question asked of each page is
    first "any at all?": its keys sorted, then looked up in order, which
    keeps memory access sequential (looking a million keys up in their
    original, random order took 0.8 s against 4 million loaded keys).
    """

    def __init__(self):
        self.sorted = np.array([], dtype=np.uint64)
        self.pending: list[np.ndarray] = []  # merged in only if another page comes

    def drop_known(self, rows: pa.Table) -> pa.Table:
        if self.pending:
            self.sorted = np.sort(np.concatenate([self.sorted, *self.pending]))
            self.pending = []
        if not len(self.sorted) or not rows.num_rows:
            return rows
        keys = rows.column(KEY).to_numpy()
        ordered = np.sort(keys)
        at = np.minimum(np.searchsorted(self.sorted, ordered), len(self.sorted) - 1)
        if not (self.sorted[at] == ordered).any():
            return rows
        # Filtering copies every column, so only when something is dropped.
        return rows.filter(pa.array(~np.isin(keys, self.sorted)))

    def add(self, keys: pa.ChunkedArray) -> None:
        self.pending.append(keys.to_numpy())


def cursor_recipe(table: str, cursor: str) -> dict[str, str]:
    """The statements that give an existing table a cursor column, as the
    README's "Use it with your own table" explains them step by step."""
    index = f"{cursor}_minmax"
    return {
        "add column": f"ALTER TABLE {table} ADD COLUMN {cursor} DateTime64(6, 'UTC') DEFAULT now64(6, 'UTC')",
        "materialize column": f"ALTER TABLE {table} MATERIALIZE COLUMN {cursor} SETTINGS mutations_sync = 2",
        "add index": f"ALTER TABLE {table} ADD INDEX {index} {cursor} TYPE minmax GRANULARITY 1",
        "materialize index": f"ALTER TABLE {table} MATERIALIZE INDEX {index} SETTINGS mutations_sync = 2",
    }


class TableNotFound(Exception):
    """The table is not (yet) in the database; the message says where the server looked."""


class SchemaError(Exception):
    """The table cannot be tailed as configured; the message says what to change."""


@dataclass
class Tail:
    """Reads a ClickHouse table into Arrow batches, each row exactly once."""

    client: Client
    table: str
    cursor_column: str
    key_column: str | None
    overlap_seconds: float
    hidden: tuple[str, ...] = ()  # read for the key, but not sent on to Perspective
    columns: list[Column] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Seconds between checks of the window for late commits (0: every poll).
    # A late row waits for the next check; rows on time do not wait.
    check_every: float = 0.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.cursor = Cursor(overlap_us=int(self.overlap_seconds * 1_000_000))
        self._checked_at: float | None = None  # when the last check that succeeded started
        # Figures for the log and the benchmarks.
        self.polls = self.window_checks = self.window_rereads = self.rows_returned = 0

    def describe(self) -> None:
        """Loads the table's columns; raises TableNotFound or SchemaError."""
        described = self.client.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
            "AND table = {table:String} ORDER BY position",
            parameters={"table": self.table},
        ).result_rows
        if not described:
            database, tables = self.client.query(
                "SELECT currentDatabase(), arraySort(groupArray(name)) FROM system.tables "
                "WHERE database = currentDatabase()").result_rows[0]
            shown = ", ".join(tables[:10]) + (f" and {len(tables) - 10} more" if len(tables) > 10 else "")
            raise TableNotFound(f"no table {self.table} in database {database} "
                                f"({'tables there: ' + shown if tables else 'it has no tables'})")
        types = dict(described)
        cursor_type = types.get(self.cursor_column)
        if cursor_type is None or not cursor_type.replace("Nullable(", "").startswith("DateTime"):
            cursor = self.cursor_column if cursor_type is None else "inserted_at"
            raise SchemaError(
                f"table {self.table} needs a DateTime64 column stamped at insert time to tail "
                f"(--cursor {self.cursor_column} is {cursor_type or 'missing'}); add one with "
                f"{'; '.join(cursor_recipe(self.table, cursor).values())} (README, \"Use it with your own table\")"
                + ("" if cursor == self.cursor_column else f", then --cursor {cursor}"))
        if self.key_column and self.key_column not in types:
            raise SchemaError(f"table {self.table} has no column {self.key_column}: set --key to a "
                              "unique column, or --key '' to compare whole rows")
        self.columns, self.skipped = map_columns([(name, kind) for name, kind in described
                                                  if name not in self.hidden])
        self._all_columns = [name for name, _ in described]

    def layout_warnings(self) -> list[str]:
        """What makes polling this table wrong or slow, as actionable lines.

        Both checks are about a cursor column added to a table that already
        had rows (README, "Use it with your own table"):

        * A part written before `ADD COLUMN` does not store the column, so
          ClickHouse computes its DEFAULT, now64(), at every read: those rows
          look brand new at every poll.
        * A cursor that neither leads ORDER BY nor has a skip index cannot
          narrow a poll: every poll reads the whole table.
        """
        table = {"table": self.table}
        engine, sorting_key = self.client.query(
            "SELECT engine, sorting_key FROM system.tables WHERE database = currentDatabase() "
            "AND name = {table:String}", parameters=table).result_rows[0]
        if "MergeTree" not in engine:
            return []
        warnings = []
        parts, storing = self.client.query(
            "SELECT count(), countIf(has(columns, {cursor:String})) FROM (SELECT groupArray(column) AS columns "
            "FROM system.parts_columns WHERE database = currentDatabase() AND table = {table:String} "
            "AND active GROUP BY name)", parameters={**table, "cursor": self.cursor_column}).result_rows[0]
        recipe = cursor_recipe(self.table, self.cursor_column)
        if storing < parts:
            warnings.append(
                f"{parts - storing} of {parts} parts of {self.table} do not store {self.cursor_column}, so "
                f"ClickHouse computes its DEFAULT at every read and old rows look new at every poll: run "
                f"{recipe['materialize column']}")
        leads = sorting_key.split(",")[0].strip() in (self.cursor_column, quote(self.cursor_column))
        indexed = self.client.query(
            "SELECT count() FROM system.data_skipping_indices WHERE database = currentDatabase() "
            "AND table = {table:String} AND type = 'minmax' AND expr IN ({cursor:String}, {quoted:String})",
            parameters={**table, "cursor": self.cursor_column, "quoted": quote(self.cursor_column)},
        ).result_rows[0][0]
        if not leads and not indexed:
            warnings.append(
                f"{self.cursor_column} neither leads the ORDER BY of {self.table} nor has a minmax index, so "
                f"every poll reads the whole table: run {recipe['add index']}, then {recipe['materialize index']}")
        return warnings

    @property
    def perspective_schema(self) -> dict[str, str]:
        return {column.name: column.perspective_type for column in self.columns}

    def _select(self) -> str:
        return ", ".join([column.select for column in self.columns]
                         + [f"{self._key()} AS {KEY}", f"{self._cursor_micros()} AS {CURSOR}"])

    def empty(self) -> pa.Table:
        """No rows, but the exact Arrow schema every later batch will have.

        Creating the Perspective table from this, rather than from a dict of
        type names, keeps 64-bit integers 64-bit: a dict's "integer" is 32-bit.
        """
        rows = self.client.query_arrow(f"SELECT {self._select()} FROM {quote(self.table)} LIMIT 0")
        return rows.drop_columns([KEY, CURSOR])

    @property
    def _cursor_column(self) -> str:
        """The cursor, qualified with the table's name. The SELECT list casts
        each column under its own name (`toDateTime64(inserted_at, 3, 'UTC')
        AS inserted_at`), and ClickHouse reads a bare `inserted_at` in WHERE
        and ORDER BY as that alias: the primary key goes unused and every poll
        scans the whole table (bench/poll_cost.py: 10M rows of history, 108 ms
        and 10M rows read per poll). The qualified name is the table's column.
        """
        return self._qualified(self.cursor_column)

    def _key(self) -> str:
        # The key travels as a 64-bit hash: comparing integers is several
        # times cheaper than comparing strings. Two different rows inside one
        # overlap window sharing a hash is a ~1e-11 chance at 10,000 rows.
        # Columns are qualified for the reason _cursor_column gives: a bare
        # `id` would be the SELECT list's `toString(id) AS id`, and the hash
        # would differ between a poll and the window check.
        if self.key_column:
            return f"cityHash64({self._qualified(self.key_column)})"
        # No key: two rows are the same row when every column is equal.
        return "cityHash64(" + ", ".join(self._qualified(c) for c in self._all_columns) + ")"

    def _qualified(self, column: str) -> str:
        return f"{quote(self.table)}.{quote(column)}"

    def backfill(self, limit: int, chunk_rows: int = 1_000_000) -> Iterator[pa.Table]:
        """The newest `limit` rows, oldest first, in pages; sets the watermark.

        The hand-over to the first poll must be exact: every row inside the
        overlap window below the watermark is either shown now or remembered
        as deliberately left out, or the first poll would deliver it again.

        1. The newest cursor value becomes the watermark, and ClickHouse
           counts the rows inside the window below it.
        2. Only if the window holds more rows than `limit` (a burst, or an
           `ALTER ... MATERIALIZE` that gave many rows one cursor value) are
           the keys of *every* row in it read, grouped in ClickHouse, so the
           rows the backfill leaves out are remembered too. Otherwise every
           window row is among the ones read, and remembering those is
           enough: one read of the window saved.
        3. The newest `limit` rows up to the watermark are read in pages of
           about `chunk_rows` (a query each, see _pages), so the caller can
           load one page into Perspective while ClickHouse reads the next.
        """
        newest = self.client.query(
            f"SELECT toUnixTimestamp64Micro(toDateTime64(maxOrNull({self._cursor_column}), 6, 'UTC')) "
            f"FROM {quote(self.table)}").result_rows[0][0]
        if newest is None:
            return  # an empty table: the first poll reads everything
        newest = int(newest)
        window = {"lower": newest - self.cursor.overlap_us, "upper": newest}
        in_window = self.client.query(
            f"SELECT count() FROM {quote(self.table)} WHERE {self._between('lower', 'upper')}",
            parameters=window).result_rows[0][0]
        if in_window > limit:
            # Grouped in ClickHouse, so the keys arrive distinct, each with
            # its newest cursor: exactly what Cursor keeps.
            self.cursor.start_at(newest, self.client.query_arrow(
                f"SELECT {self._key()} AS {KEY}, max({self._cursor_micros()}) AS {CURSOR} "
                f"FROM {quote(self.table)} WHERE {self._between('lower', 'upper')} GROUP BY {KEY}",
                parameters=window))
        else:
            self.cursor.start_at(newest, self.cursor.delivered.slice(0, 0))
        # A row that committed between the reads is on screen, so it must
        # not come back as a late commit: the keys of every row read inside
        # the window are remembered, once, at the end.
        lower = self.cursor.lower_bound
        read_in_window = []
        loaded = _KeySet()
        for where, parameters, take_newest in self._pages(newest, limit, chunk_rows):
            rows = f"SELECT {self._select()} FROM {quote(self.table)} WHERE {where}"
            if take_newest is None:
                select = f"{rows} ORDER BY {self._cursor_column}"
            else:
                select = (f"SELECT * FROM ({rows} ORDER BY {self._cursor_column} DESC LIMIT {int(take_newest)}) "
                          f"ORDER BY {CURSOR}")
            page = self.client.query_arrow(select, parameters=parameters)
            keys = page.select([KEY, CURSOR])
            read_in_window.append(keys.filter(pc.greater_equal(keys.column(CURSOR), lower)))
            # A key stored twice is still one row for the viewer. (Python
            # does this faster than ClickHouse's LIMIT 1 BY, which doubled
            # the query's time on a million rows.)
            page = _first_of_each_key(loaded.drop_known(page))
            loaded.add(page.column(KEY))
            yield self._strip(page)
        if read_in_window:
            self.cursor.remember(pa.concat_tables(read_in_window))

    def _pages(self, newest: int, limit: int, chunk_rows: int) -> Iterator[tuple[str, dict, int | None]]:
        """Splits the newest `limit` rows up to `newest` into cursor ranges of
        about `chunk_rows` rows, oldest first: (WHERE, parameters, and how
        many of the range's newest rows to take, or None for all of them).

        One page needs no planning. For more, ClickHouse returns the cursor
        of every row to load (8 bytes each), and the pages start at every
        `chunk_rows`-th distinct value: each page is then a plain range, and
        only the oldest takes part of its rows (those sharing the oldest
        cursor value may be more than the limit leaves room for).
        """
        upper = f"{self._cursor_column} <= fromUnixTimestamp64Micro({{upper:Int64}}, 'UTC')"
        if limit <= chunk_rows:
            yield upper, {"upper": newest}, limit
            return
        cursors = self.client.query_arrow(
            f"SELECT {self._cursor_micros()} AS {CURSOR} FROM {quote(self.table)} WHERE {upper} "
            f"ORDER BY {self._cursor_column} DESC LIMIT {int(limit)}", parameters={"upper": newest})
        ascending = cursors.column(CURSOR).to_numpy()[::-1]
        starts = np.unique(ascending[chunk_rows::chunk_rows])
        starts = starts[starts > ascending[0]] if len(ascending) else starts
        if not len(starts):
            yield upper, {"upper": newest}, limit
            return
        in_range = f"{self._cursor_column} >= fromUnixTimestamp64Micro({{lower:Int64}}, 'UTC') AND "
        below = f"{self._cursor_column} < fromUnixTimestamp64Micro({{upper:Int64}}, 'UTC')"
        oldest = int(np.searchsorted(ascending, starts[0]))
        yield in_range + below, {"lower": int(ascending[0]), "upper": int(starts[0])}, oldest
        for start, end in zip(starts[:-1], starts[1:]):
            yield in_range + below, {"lower": int(start), "upper": int(end)}, None
        yield in_range + upper, {"lower": int(starts[-1]), "upper": newest}, None

    def poll(self) -> pa.Table:
        """Rows that arrived since the last call (or all rows, the first time).

        Re-reading the whole overlap window on every poll would return each
        row about overlap / interval times (30 at the defaults). Instead, one
        cheap aggregate asks whether the window still holds exactly the keys
        already read; only when it does not (a late commit) is the window
        read again. Otherwise the poll asks for rows past the watermark alone.

        A check counts only once the whole poll has succeeded: a check that
        fails (ClickHouse down) is tried again on the next poll, and the
        window stays anchored where the last good check left it.
        """
        self.polls += 1
        watermark, lower = self.cursor.watermark, self.cursor.lower_bound
        started = self.clock()
        checking = lower is None or self._check_due(started)
        if lower is None:
            rows = self._read("", {})
        elif not checking or self._window_unchanged():
            rows = self._read(f"WHERE {self._cursor_column} > fromUnixTimestamp64Micro({{upper:Int64}}, 'UTC')",
                              {"upper": watermark})
        else:
            self.window_rereads += 1
            rows = self._read(f"WHERE {self._cursor_column} >= fromUnixTimestamp64Micro({{lower:Int64}}, 'UTC')",
                              {"lower": lower})
        self.rows_returned += rows.num_rows
        fresh = self.cursor.accept(rows)
        if checking:
            self.cursor.checked(watermark)
            self._checked_at = started
        return self._strip(fresh)

    def _check_due(self, now: float) -> bool:
        return self._checked_at is None or now - self._checked_at >= self.check_every

    def _window_unchanged(self) -> bool:
        self.window_checks += 1
        count, xor = self.client.query(
            f"SELECT uniqExact({self._key()}), groupBitXorDistinct({self._key()}) FROM {quote(self.table)} "
            f"WHERE {self._between('lower', 'upper')}",
            parameters={"lower": self.cursor.lower_bound, "upper": self.cursor.watermark}).result_rows[0]
        return (int(count), int(xor)) == self.cursor.fingerprint()

    def _read(self, where: str, parameters: dict) -> pa.Table:
        return self.client.query_arrow(
            f"SELECT {self._select()} FROM {quote(self.table)} {where} ORDER BY {self._cursor_column}",
            parameters=parameters or None)

    def _between(self, lower: str, upper: str) -> str:
        return (f"{self._cursor_column} >= fromUnixTimestamp64Micro({{{lower}:Int64}}, 'UTC') "
                f"AND {self._cursor_column} <= fromUnixTimestamp64Micro({{{upper}:Int64}}, 'UTC')")

    def _cursor_micros(self) -> str:
        return f"toUnixTimestamp64Micro(toDateTime64({self._cursor_column}, 6, 'UTC'))"

    @staticmethod
    def _strip(rows: pa.Table) -> pa.Table:
        """Keeps the cursor for lag figures; the caller drops it before Perspective."""
        return rows.drop_columns([KEY])
