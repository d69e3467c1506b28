"""Chapter 4 (all of history, pivoted inside ClickHouse): the per-minute rollup that answers some views.

A 1-minute candle chart of one ticker over 100 million rows is a scan of
ten million rows, every time the page refreshes. producer.py gives the demo
table a rollup (`<table>_by_minute`, an AggregatingMergeTree filled by a
materialized view on every insert) that holds, per ticker, client and
minute of `timestamp`, the row count and aggregate states of each price:
`<column>__first` (argMinState by `inserted_at`), `__last`, `__min`, `__max`,
`__sum`. A view that only groups, splits and filters by the stored
columns and by buckets of whole minutes (a minute bucket of the minute's
start is the minute bucket of the time), and only shows aggregates that
states can answer, reads the rollup: thousands of rows instead of millions.
Any other view reads the table itself, as before. Both give the same cells
(tests/test_history_rollup.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from clickhouse_types import Column, quote
from history_expressions import ExpressionColumn

TIME = "timestamp"   # the table's column the rollup buckets by minute
MINUTE = "minute"    # the rollup's column: toStartOfMinute(timestamp)
ROWS = "rows"        # the rollup's row count

# Perspective aggregate -> the states it needs, and how to read them
# ({first} is the `<column>__first` column; {If}{c} keep only the rows that
# meet a condition, and are left out when every row counts).
_READS = {
    "sum": (("sum",), "sum{If}({sum}{c})"),
    "avg": (("sum",), "sum{If}({sum}{c}) / sum{If}(`rows`{c})"),
    "mean": (("sum",), "sum{If}({sum}{c}) / sum{If}(`rows`{c})"),
    "min": (("min",), "min{If}({min}{c})"),
    "low": (("min",), "min{If}({min}{c})"),
    "max": (("max",), "max{If}({max}{c})"),
    "high": (("max",), "max{If}({max}{c})"),
    "high minus low": (("min", "max"), "max{If}({max}{c}) - min{If}({min}{c})"),
    "first": (("first",), "argMinMerge{If}({first}{c})"),
    "last": (("last",), "argMaxMerge{If}({last}{c})"),
}


@dataclass(frozen=True)
class Rollup:
    table: str
    dimensions: frozenset[str]              # the table's columns stored as they are
    states: frozenset[tuple[str, str]]      # (column, aggregate) pairs stored

    @classmethod
    def from_columns(cls, table: str, names: list[str], base: dict[str, Column]) -> "Rollup | None":
        """The rollup described by its column names, or None if it is not
        one (no minute or row count)."""
        if MINUTE not in names or ROWS not in names or TIME not in base:
            return None
        states = {tuple(name.rsplit("__", 1)) for name in names if "__" in name}
        return cls(table, frozenset(n for n in names if n in base and n != TIME),
                   frozenset((column, kind) for column, kind in states if column in base and kind in
                             {"first", "last", "min", "max", "sum"}))

    def source_columns(self, base: dict[str, Column]) -> dict[str, Column]:
        """The table's columns as the rollup holds them: dimensions as they
        are, the time as its minute (only ever read through a bucket),
        measures by name (only ever read through their states)."""
        columns = dict(base)
        columns[TIME] = Column(TIME, "DateTime('UTC')", "datetime",
                               f"toDateTime64({quote(MINUTE)}, 3, 'UTC') AS {quote(TIME)}")
        return columns

    def answers(self, config: dict, columns: dict[str, Column], aggregate_of: dict[str, str]) -> bool:
        """True if every cell of this checked config can come from the rollup."""
        group_by, split_by = config["group_by"], config["split_by"]
        if not group_by and config["group_rollup_mode"] != "total":
            return False  # a view of rows: only the table has them
        keys = group_by + split_by + [name for name, _, _ in config["filter"]]
        if not all(self._key(columns[name]) for name in keys):
            return False
        shown = set(config["columns"]) | {name for name, _ in config["sort"]}
        return all(self._measure(columns[name], aggregate_of[name]) for name in shown)

    def _key(self, column: Column) -> bool:
        if isinstance(column, ExpressionColumn):
            bucket = column.bucket
            return bucket is not None and bucket.column == TIME and bucket.unit != "s"
        return column.name in self.dimensions

    def _measure(self, column: Column, aggregate: str) -> bool:
        if aggregate == "count":
            return True
        if isinstance(column, ExpressionColumn) or aggregate not in _READS:
            return False
        if column.clickhouse_type.startswith("Nullable"):
            return False  # states skip nulls, where the table's first/last/avg/sum keep them
        return all((column.name, kind) in self.states for kind in _READS[aggregate][0])

    def rows_sql(self, condition: str) -> str:
        return f"sum({quote(ROWS)})" if condition == "1" else f"sumIf({quote(ROWS)}, {condition})"

    def aggregate_sql(self, column: Column, aggregate: str, condition: str = "1", some_rows: bool = False) -> str:
        """One aggregate over the rollup rows that meet `condition`: null
        where there are none (unless `some_rows` says there are), as on the
        table."""
        if aggregate == "count":
            return self.rows_sql(condition)
        _, template = _READS[aggregate]
        states = {kind: quote(f"{column.name}__{kind}") for kind in ("first", "last", "min", "max", "sum")}
        every = condition == "1"
        sql = template.format(If="" if every else "If", c="" if every else f", {condition}", **states)
        return sql if some_rows else f"if({self.rows_sql(condition)} = 0, NULL, {sql})"
