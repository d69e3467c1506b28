"""Chapter 2: reading each new ClickHouse row exactly once.

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
* The watermark is the largest cursor delivered so far. Each poll asks for
  `cursor >= watermark - overlap`: rows that committed late, with a cursor a
  little older than rows already delivered, are still inside the window.
* Re-reading the overlap returns rows that were already delivered, so the
  keys delivered inside the window are remembered and those rows dropped.

A row that becomes visible more than `overlap` seconds after its cursor was
stamped is missed. Raise --overlap if your inserts can take longer to commit.

`Cursor` is the pure bookkeeping (tested without a database); `Tail` is the
SQL around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_connect.driver.client import Client

from clickhouse_types import Column, map_columns, quote

KEY = "__key"
CURSOR = "__cursor"  # the cursor column as microseconds since the epoch


@dataclass
class Cursor:
    """Watermark plus the keys already delivered inside the overlap window."""

    overlap_us: int
    watermark: int | None = None
    delivered: pa.Table = field(default_factory=lambda: pa.table({KEY: pa.array([], pa.string()),
                                                                 CURSOR: pa.array([], pa.int64())}))

    @property
    def lower_bound(self) -> int | None:
        """The smallest cursor value the next poll must read, or None for all."""
        return None if self.watermark is None else self.watermark - self.overlap_us

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
        if fresh.num_rows:
            newest = pc.max(fresh.column(CURSOR)).as_py()
            self.watermark = newest if self.watermark is None else max(self.watermark, newest)
        # Remember every key read, with the newest cursor it was read at: a
        # second copy of a delivered row, stored later, must stay suppressed
        # for as long as a poll can read it, not only as long as the first.
        plain = pa.schema([(KEY, rows.schema.field(KEY).type), (CURSOR, pa.int64())])
        remembered = pa.concat_tables([self.delivered.cast(plain), rows.select([KEY, CURSOR]).cast(plain)])
        lower = self.lower_bound
        remembered = remembered.filter(pc.greater_equal(remembered.column(CURSOR), lower))
        newest_per_key = remembered.group_by(KEY, use_threads=False).aggregate([(CURSOR, "max")])
        self.delivered = pa.table({KEY: newest_per_key.column(KEY), CURSOR: newest_per_key.column(f"{CURSOR}_max")})
        return fresh


def _first_of_each_key(rows: pa.Table) -> pa.Table:
    if pc.count_distinct(rows.column(KEY)).as_py() == rows.num_rows:
        return rows
    indexed = rows.append_column("__row", pa.array(range(rows.num_rows), pa.int64()))
    first_rows = indexed.group_by(KEY, use_threads=False).aggregate([("__row", "min")]).column("__row_min")
    return rows.take(pc.take(first_rows, pc.sort_indices(first_rows)))


class TableNotFound(Exception):
    pass


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

    def __post_init__(self) -> None:
        self.cursor = Cursor(overlap_us=int(self.overlap_seconds * 1_000_000))

    def describe(self) -> None:
        """Loads the table's columns; raises TableNotFound or SchemaError."""
        described = self.client.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
            "AND table = {table:String} ORDER BY position",
            parameters={"table": self.table},
        ).result_rows
        if not described:
            raise TableNotFound(self.table)
        types = dict(described)
        cursor_type = types.get(self.cursor_column)
        if cursor_type is None or not cursor_type.replace("Nullable(", "").startswith("DateTime"):
            raise SchemaError(
                f"table {self.table} needs a DateTime64 column stamped at insert time to tail "
                f"(--cursor {self.cursor_column} is {cursor_type or 'missing'}); e.g. "
                f"ALTER TABLE {self.table} ADD COLUMN inserted_at DateTime64(6) DEFAULT now64(6)")
        if self.key_column and self.key_column not in types:
            raise SchemaError(f"table {self.table} has no column {self.key_column}: set --key to a "
                              "unique column, or --key '' to compare whole rows")
        self.columns, self.skipped = map_columns([(name, kind) for name, kind in described
                                                  if name not in self.hidden])
        self._all_columns = [name for name, _ in described]

    @property
    def perspective_schema(self) -> dict[str, str]:
        return {column.name: column.perspective_type for column in self.columns}

    def _select(self) -> str:
        cursor = self._cursor_column
        # The key travels as a 64-bit hash: comparing integers is several
        # times cheaper than comparing strings. Two different rows inside one
        # overlap window sharing a hash is a ~1e-11 chance at 10,000 rows.
        if self.key_column:
            key = f"cityHash64({quote(self.key_column)})"
        else:
            # No key: two rows are the same row when every column is equal.
            key = "cityHash64(" + ", ".join(quote(c) for c in self._all_columns) + ")"
        return ", ".join([column.select for column in self.columns]
                         + [f"{key} AS {KEY}",
                            f"toUnixTimestamp64Micro(toDateTime64({cursor}, 6, 'UTC')) AS {CURSOR}"])

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
        return f"{quote(self.table)}.{quote(self.cursor_column)}"

    def backfill(self, limit: int) -> pa.Table:
        """The newest `limit` rows, oldest first; sets the watermark."""
        rows = self.client.query_arrow(
            f"SELECT * FROM (SELECT {self._select()} FROM {quote(self.table)} "
            f"ORDER BY {self._cursor_column} DESC LIMIT {int(limit)}) ORDER BY {CURSOR}")
        return self._strip(self.cursor.accept(rows))

    def poll(self) -> pa.Table:
        """Rows that arrived since the last call (or all rows, the first time)."""
        lower = self.cursor.lower_bound
        where = "" if lower is None else (
            f"WHERE {self._cursor_column} >= fromUnixTimestamp64Micro({{lower:Int64}}, 'UTC')")
        rows = self.client.query_arrow(
            f"SELECT {self._select()} FROM {quote(self.table)} {where} ORDER BY {self._cursor_column}",
            parameters={"lower": lower} if lower is not None else None,
        )
        return self._strip(self.cursor.accept(rows))

    @staticmethod
    def _strip(rows: pa.Table) -> pa.Table:
        """Keeps the cursor for lag figures; the caller drops it before Perspective."""
        return rows.drop_columns([KEY])
