"""Chapter 4: all of history, pivoted inside ClickHouse.

The live view (chapter 3) holds the newest --limit rows in a Perspective
table in the server's memory. That cannot grow to the whole ClickHouse
table: ten million rows would not fit in a browser, and barely in the server.
But a pivot of ten million rows is small: a group-by ticker is ten rows.
So for history the pivot runs where the rows are, in ClickHouse, and only
the few cells the viewer shows travel.

Perspective 4.3.0 has the hook for this: `perspective.VirtualServer(handler)`
speaks Perspective's websocket protocol and asks a handler, in Perspective's
terms, for a table's schema and size, to make a view from a config (group-by,
split-by, filter, sort, aggregates), and for a rectangle of a view's cells.
This module is that handler for ClickHouse. Each Perspective idea becomes
one small piece of SQL:

* a filter becomes a WHERE term whose value is a bound query parameter
  (`{p0:String}`), never text pasted into the SQL;
* an aggregate becomes a SELECT item: `sum` -> `sumIf(x, cond)`, `first`
  and `last` -> `argMinIf`/`argMaxIf` by the cursor column (the earliest and
  latest row by `inserted_at`, not whichever row ClickHouse read first);
* a group-by becomes `GROUP BY ROLLUP(...)`, whose `grouping()` bits say
  how deep each row is (the total row is depth 0);
* a split-by becomes conditional aggregates, one set per split value
  (`sumIf(close, ticker = {p1:String})`), for at most --history-split-values
  values: the most frequent ones;
* a sort becomes ORDER BY keys that keep the tree: children stay under their
  parent, siblings ordered by the sorted aggregate.

A view is only SQL held in memory: nothing is created in ClickHouse (no
CREATE VIEW, so the account needs no DDL rights), and every request re-runs
its query, so a new view always sees the newest rows. Every query runs with
ClickHouse's own limits (readonly, time, result rows, memory); a query that
breaks one gets an error in the viewer and costs nothing else.

Only names of the table's columns are accepted from a client, and they are
quoted. The viewer's computed columns never reach ClickHouse as text:
history_expressions.py builds SQL for the few it knows (time buckets and
arithmetic) from the gate's parse of them, and they then group, split,
filter and sort like any column. A view by whole-minute buckets, ticker and
client reads a per-minute rollup instead of the table when one exists
(history_rollup.py), with the same answers.

What Perspective cannot show (Array, Map, ...) is left out, as in the live
view. Known differences from Perspective's own engine are listed in the
docs/history.md: `first`/`last` on rows with children, and view schemas
of columns whose name contains `_`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime

import perspective
import pyarrow as pa
import pyarrow.compute as pc

import read_only
from clickhouse_types import Column, map_columns, quote
from history_expressions import Refused, expression_column, expression_columns
from history_rollup import Rollup

log = logging.getLogger("history")


@dataclass(frozen=True)
class Limits:
    """What one history query may cost. ClickHouse enforces each one."""
    timeout: float = 10.0            # seconds: max_execution_time
    max_rows: int = 100_000          # rows in one answer: max_result_rows
    max_memory: int = 2 << 30        # bytes: max_memory_usage
    split_values: int = 50           # columns sets of a split-by
    threads: int = 2                 # history queries at once

    def settings(self) -> dict:
        # readonly=2: no writes and no DDL, but settings may still be passed
        # with the query (readonly=1 would refuse the limits below).
        return {"readonly": 2, "max_execution_time": self.timeout, "max_result_rows": self.max_rows,
                "result_overflow_mode": "throw", "max_memory_usage": self.max_memory}

    def clause(self) -> str:
        """The same settings as the query's own SETTINGS clause. Passed beside
        the query, chDB's client applies each with SET and restores it after:
        ten more engine calls, about 6 ms per query; in the SQL, none."""
        return " SETTINGS " + ", ".join(f"{name} = {value!r}" if isinstance(value, str) else f"{name} = {value}"
                                        for name, value in self.settings().items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Chapter 4's flags: the whole table at /history, pivoted in ClickHouse."""
    group = parser.add_argument_group("history (the whole table at /history, pivoted inside ClickHouse)")
    group.add_argument("--no-history", action="store_true", help="do not serve /history")
    group.add_argument("--history-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="longest a history query may run (default 10)")
    group.add_argument("--history-max-rows", type=int, default=100_000, metavar="ROWS",
                       help="most rows one history answer may hold (default 100,000)")
    group.add_argument("--history-max-memory", type=int, default=2048, metavar="MB",
                       help="memory one history query may use in ClickHouse (default 2048 MB)")
    group.add_argument("--history-split-values", type=int, default=50, metavar="N",
                       help="a split-by shows its N most frequent values (default 50)")


def limits_from_args(args, parser: argparse.ArgumentParser) -> Limits | None:
    if args.no_history:
        return None
    if args.history_timeout <= 0 or args.history_max_rows < 1 or args.history_max_memory < 1 \
            or args.history_split_values < 1:
        parser.error("--history-timeout, --history-max-rows, --history-max-memory and "
                     "--history-split-values must be more than 0")
    return Limits(args.history_timeout, args.history_max_rows, args.history_max_memory << 20,
                          args.history_split_values)


# ---------------------------------------------------------------------------
# What the viewer may ask for, by Perspective column type.

_COMPARE = ["==", "!=", ">", ">=", "<", "<="]
_NULLS = ["is null", "is not null"]
FILTER_OPS = {
    "string": _COMPARE + ["begins with", "contains", "ends with", "in", "not in"] + _NULLS,
    "integer": _COMPARE + _NULLS, "float": _COMPARE + _NULLS, "boolean": _COMPARE + _NULLS,
    "date": _COMPARE + _NULLS, "datetime": _COMPARE + _NULLS,
}

# Aggregate name -> (SQL template, result type or None for "the column's
# type"). In a template {x} is the column, {c} the condition a row must meet
# (a split value, or 1) and {t} the cursor column. Nulls are skipped, as in
# SQL, except where a comment says otherwise.
_SUM = "coalesce(sumIf({x}, {c}), 0)"  # Perspective: the sum of only nulls is 0
AGGREGATES = {
    "sum": (_SUM, None),
    "count": ("countIf({c})", "integer"),  # rows, null or not (as Perspective)
    "avg": ("avgIf({x}, {c})", "float"),
    "mean": ("avgIf({x}, {c})", "float"),
    "min": ("minIf({x}, {c})", None),
    "max": ("maxIf({x}, {c})", None),
    "low": ("minIf({x}, {c})", None),
    "high": ("maxIf({x}, {c})", None),
    "high minus low": ("maxIf({x}, {c}) - minIf({x}, {c})", None),
    # The earliest and latest row by the cursor column. The tuple keeps that
    # row's value even when it is null, as Perspective does.
    "first": ("argMinIf(tuple({x}), {t}, {c}).1", None),
    "last": ("argMaxIf(tuple({x}), {t}, {c}).1", None),
    # Perspective counts null as one more distinct value.
    "distinct count": ("uniqExactIf({x}, {c}) + (countIf({c} AND {x} IS NULL) > 0)", "integer"),
    "sum abs": ("coalesce(sumIf(abs({x}), {c}), 0)", None),
    "abs sum": ("abs(" + _SUM + ")", None),
}
# Aggregates with an answer for no rows at all; the others are null then.
_DEFINED_ON_NOTHING = {"count", "distinct count"}
_NUMBER_AGGREGATES = ["sum", "count", "avg", "mean", "min", "max", "low", "high", "high minus low",
                      "first", "last", "distinct count", "sum abs", "abs sum"]
_OTHER_AGGREGATES = ["count", "distinct count", "first", "last"]
AGGREGATES_BY_TYPE = {
    "integer": _NUMBER_AGGREGATES, "float": _NUMBER_AGGREGATES, "string": _OTHER_AGGREGATES,
    "boolean": _OTHER_AGGREGATES,
    "date": _OTHER_AGGREGATES + ["min", "max", "low", "high"],
    "datetime": _OTHER_AGGREGATES + ["min", "max", "low", "high"],
}


def features() -> dict:
    """What the viewer offers for history: everything above, and expressions
    (the few that history_expressions computes in ClickHouse)."""
    return {"group_by": True, "split_by": True, "sort": True, "expressions": True,
            "group_rollup_mode": ["rollup", "flat", "total"],
            "filter_ops": FILTER_OPS, "aggregates": AGGREGATES_BY_TYPE}


def default_aggregate(kind: str) -> str:
    return "sum" if kind in ("integer", "float") else "count"


# ---------------------------------------------------------------------------
# Pure SQL builders: config in, SQL text (and its parameters) out.

class Params(dict):
    """Query parameters: each value gets a name; the SQL holds only the name."""

    def bind(self, value, clickhouse_type: str) -> str:
        name = f"p{len(self)}"
        self[name] = value
        return "{" + name + ":" + clickhouse_type + "}"


def value_sql(column: Column) -> str:
    """The column as Perspective sees it (e.g. a UUID as a String), unaliased."""
    return column.select.removesuffix(f" AS {quote(column.name)}")


def _bind_scalar(column: Column, value, params: Params) -> str:
    """One filter value as a bound parameter of the column's Perspective type."""
    kind = column.perspective_type
    if kind == "string":
        return params.bind(str(value), "String")
    if kind == "boolean":
        if isinstance(value, str):
            value = value.strip().lower() in ("true", "1", "yes")
        return params.bind(bool(value), "Bool")
    if kind in ("integer", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Refused(f"filter on {column.name} needs a number")
        return params.bind(float(value), "Float64")
    # date and datetime: milliseconds since the epoch (as Perspective sends
    # them), or text such as 2024-01-31 or 2024-01-31 09:30:00 (read as UTC).
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        moment = f"fromUnixTimestamp64Milli(toInt64({params.bind(float(value), 'Float64')}), 'UTC')"
    elif isinstance(value, str):
        moment = f"parseDateTime64BestEffort({params.bind(value, 'String')}, 3, 'UTC')"
    else:
        raise Refused(f"filter on {column.name} needs a date or time")
    return f"toDate32({moment})" if kind == "date" else moment


def filter_sql(column: Column, op: str, value, params: Params) -> str | None:
    """One Perspective filter as a WHERE term, or None if it filters nothing
    (the viewer sends a filter with no value while the user is typing)."""
    if op not in FILTER_OPS[column.perspective_type]:
        raise Refused(f"filter {op!r} is not offered for {column.perspective_type} column {column.name}")
    x = value_sql(column)
    if op == "is null":
        return f"{x} IS NULL"
    if op == "is not null":
        return f"{x} IS NOT NULL"
    if value is None or value == "" or value == []:
        return None
    if op in ("in", "not in"):
        values = value if isinstance(value, list) else [value]
        bound = params.bind([str(v) for v in values], "Array(String)")
        if op == "in":
            return f"has({bound}, {x})"
        return f"{x} IS NULL OR NOT has({bound}, {x})"  # Perspective: a null is "not in"
    if op in ("begins with", "contains", "ends with"):
        function = {"begins with": "startsWith", "contains": "position", "ends with": "endsWith"}[op]
        term = f"{function}({x}, {_bind_scalar(column, value, params)})"
        return f"{term} > 0" if op == "contains" else term
    if op == "!=":
        return f"{x} IS NULL OR {x} != {_bind_scalar(column, value, params)}"  # Perspective: null != anything
    return f"{x} {'=' if op == '==' else op} {_bind_scalar(column, value, params)}"


def where_sql(columns: dict[str, Column], filters, reducer: str, params: Params) -> str:
    terms = [term for name, op, *value in filters
             if (term := filter_sql(columns[name], op, value[0] if value else None, params)) is not None]
    if not terms:
        return ""
    return " WHERE " + f" {'OR' if reducer == 'or' else 'AND'} ".join(f"({term})" for term in terms)


def aggregate_sql(column: Column, aggregate: str, cursor: str, condition: str = "1",
                  rollup: Rollup | None = None, some_rows: bool = False) -> str:
    """One aggregate over the rows that meet `condition`, as a SELECT item
    (over the rollup's stored states, with `rollup`). It is null where no
    row meets it, unless the caller knows some do (`some_rows`: a GROUP BY
    group always has rows), which saves ClickHouse the test."""
    if rollup is not None:
        return rollup.aggregate_sql(column, aggregate, condition, some_rows)
    template, _ = AGGREGATES[aggregate]
    sql = template.format(x=value_sql(column), c=condition, t=cursor)
    if aggregate in _DEFINED_ON_NOTHING or some_rows:
        return sql
    return f"if(countIf({condition}) = 0, NULL, {sql})"


def aggregate_type(column: Column, aggregate: str) -> str:
    return AGGREGATES[aggregate][1] or column.perspective_type


def split_cell_sql(column: Column, aggregate: str, cursor: str, condition: str,
                   rollup: Rollup | None = None) -> str:
    """A split cell: the aggregate of the group's rows with this split value,
    NULL when the group has none (Perspective leaves that cell empty)."""
    rows = rollup.rows_sql(condition) if rollup else f"countIf({condition})"
    return f"if({rows} = 0, NULL, {aggregate_sql(column, aggregate, cursor, condition, rollup, some_rows=True)})"


def split_values_sql(table: str, split: Column, where: str, limit: int, rows: str = "count()") -> str:
    """The split column's most frequent values (one more than the limit, so
    the caller knows whether some were left out). `rows` counts a group's
    rows (in a rollup, the sum of its row counts)."""
    return (f"SELECT {value_sql(split)} AS v FROM {quote(table)}{where} "
            f"GROUP BY v ORDER BY {rows} DESC, v ASC NULLS FIRST LIMIT {int(limit) + 1}")


def split_condition(split: Column, value, params: Params) -> str:
    if value is None:
        return f"{value_sql(split)} IS NULL"
    kind = {"string": "String", "integer": "Int64", "float": "Float64", "boolean": "Bool",
            "date": "Date32", "datetime": "DateTime64(3, 'UTC')"}[split.perspective_type]
    return f"{value_sql(split)} = {params.bind(value, kind)}"


def split_label(value) -> str:
    """A split value as Perspective names it in a column path."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def order_direction(direction: str) -> str:
    # Perspective puts nulls first when ascending and last when descending.
    return "DESC NULLS LAST" if "desc" in direction else "ASC NULLS FIRST"


def depth_sql(group_keys: list[str]) -> str:
    """How many group-by levels a ROLLUP row has: grouping() sets a bit for
    each key that was rolled up, so the total row has all bits set."""
    return f"{len(group_keys)} - bitCount(grouping({', '.join(group_keys)}))"


def tree_order_sql(levels: int, sorts: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """How to list a rollup as a tree: the total first, each group right after
    its parent, siblings by the sorted aggregates, then by their key.

    `sorts` are (SELECT alias, direction) pairs of the sorted aggregates.
    Returns (window items that give each row its ancestors' sorted values,
    ORDER BY keys).
    """
    windows, keys = [], []
    for level in range(1, levels + 1):
        keys.append(f"__depth >= {level}")
        path = ", ".join(f"__r{i}" for i in range(level))
        for index, (alias, direction) in enumerate(sorts):
            name = f"__o{level}_{index}"
            windows.append(f"any(if(__depth = {level}, {alias}, NULL)) OVER (PARTITION BY {path}) AS {name}")
            keys.append(f"{name} {order_direction(direction)}")
        keys.append(f"__r{level - 1} ASC NULLS FIRST")
    return windows, keys


# ---------------------------------------------------------------------------
# A view: a checked config and the SQL that answers it.

@dataclass
class ViewQuery:
    """One Perspective view as ClickHouse SQL; held in memory, never created."""
    sql: str                      # every row of the view, in the view's order
    params: Params
    kinds: dict[str, str]         # output alias -> Perspective type, in column order
    names: dict[str, str]         # output alias -> column path the viewer sees
    schema: dict[str, str]        # view_schema for Perspective (see view_query)
    group_levels: int = 0         # len(group_by) when rows carry row paths
    count_sql: str = ""           # its row count, when cheaper than counting `sql`
    # Kept for the viewer's next request (HistoryHandler.view_size):
    sized: bool = False           # its row count was asked
    first_page: pa.Table | None = None  # its first rows, read beside that count, until used


def checked_config(config: dict, columns: dict[str, Column]) -> dict:
    """The config with every client-chosen name checked against the table."""
    def known(name, what):
        if not isinstance(name, str) or name not in columns:
            raise Refused(f"{what} {name!r} is not a column of this table")
        return name

    chosen = [known(c, "column") for c in config.get("columns", []) if c is not None]
    group_by = [known(c, "group by") for c in config.get("group_by", [])]
    split_by = [known(c, "split by") for c in config.get("split_by", [])]
    if len(split_by) > 1:
        raise Refused("history splits by one column at a time")
    # "col asc"/"col desc" order the split-by columns, not the rows: history
    # keeps split values in Perspective's default order, so those are ignored.
    sort = [(known(name, "sort"), str(direction)) for name, direction in config.get("sort", [])
            if str(direction) != "none" and not str(direction).startswith("col")]
    filters = []
    for name, op, *value in config.get("filter", []):
        filters.append((known(name, "filter"), str(op), value[0] if value else None))
    aggregates = {}
    for name, aggregate in (config.get("aggregates") or {}).items():
        known(name, "aggregate column")
        if isinstance(aggregate, (list, tuple)):
            aggregate = aggregate[0] if aggregate else None
        if aggregate not in AGGREGATES_BY_TYPE[columns[name].perspective_type]:
            raise Refused(f"aggregate {aggregate!r} is not offered for column {name}")
        aggregates[name] = aggregate
    mode = config.get("group_rollup_mode") or "rollup"
    if mode not in ("rollup", "flat", "total"):
        raise Refused(f"group_rollup_mode {mode!r} is unknown")
    return {"columns": chosen, "group_by": group_by, "split_by": split_by, "sort": sort,
            "filter": filters, "filter_op": config.get("filter_op") or "and", "aggregates": aggregates,
            "group_rollup_mode": mode}


def aggregates_of(config: dict, columns: dict[str, Column]) -> dict[str, str]:
    """Each column's aggregate: the config's, or the type's default."""
    return {name: config["aggregates"].get(name) or default_aggregate(columns[name].perspective_type)
            for name in columns}


def view_query(table: str, columns: dict[str, Column], cursor: str, config: dict,
               split_values: list | None = None, params: Params | None = None,
               rollup: Rollup | None = None) -> ViewQuery:
    """The SQL for a checked config. `split_values` (the chosen values of the
    split-by column) is required when the config splits; `params` holds those
    the view's expression columns already bound. With `rollup` (one that
    answers this config), the view reads it instead of the table."""
    params = Params(params or {})
    where = where_sql(columns, config["filter"], config["filter_op"], params)
    chosen, group_by, split_by = config["columns"], config["group_by"], config["split_by"]
    mode = config["group_rollup_mode"]
    aggregate_of = aggregates_of(config, columns)
    cursor_sql = quote(cursor)
    source = quote(rollup.table if rollup else table)
    # No group-by: each row shows its own values, not aggregates.
    per_row = not group_by and mode != "total"
    # Every group of a GROUP BY has rows (ClickHouse's ROLLUP makes no total
    # row of no rows); only a total over no rows aggregates nothing.
    groups_have_rows = bool(group_by)

    def cell(name: str, condition: str | None) -> tuple[str, str]:
        """One column's SQL and Perspective type; `condition` picks a split value."""
        column = columns[name]
        if per_row:
            value = value_sql(column)
            return (value if condition is None else f"if({condition}, {value}, NULL)"), column.perspective_type
        aggregate = aggregate_of[name]
        sql = (split_cell_sql(column, aggregate, cursor_sql, condition, rollup) if condition is not None
               else aggregate_sql(column, aggregate, cursor_sql, rollup=rollup, some_rows=groups_have_rows))
        return sql, aggregate_type(column, aggregate)

    items, kinds, names, schema = [], {}, {}, {}
    if split_by:
        split = columns[split_by[0]]
        for index, value in enumerate(split_values or []):
            condition = split_condition(split, value, params)
            for position, name in enumerate(chosen):
                alias = f"__c{index}_{position}"
                sql, kinds[alias] = cell(name, condition)
                items.append(f"{sql} AS {alias}")
                names[alias] = f"{split_label(value)}|{name}"
                # Perspective's VirtualServer names schema entries by the text
                # after the last "_": "<value>_<column>" gives the column.
                schema[f"{split_label(value)}_{name}"] = kinds[alias]
    else:
        for position, name in enumerate(chosen):
            alias = f"__c{position}"
            sql, kinds[alias] = cell(name, None)
            items.append(f"{sql} AS {alias}")
            names[alias] = name
            schema[name] = kinds[alias]
    select = ", ".join(items) if items else "1 AS __none"
    view = ViewQuery("", params, kinds, names, schema)

    if mode == "total":
        view.sql = f"SELECT {select} FROM {source}{where}"
        return view

    if not group_by:
        # Rows of the table, sorted by their own values, oldest first on ties.
        order = ", ".join([f"{value_sql(columns[name])} {order_direction(direction)}"
                           for name, direction in config["sort"]] + [f"{cursor_sql} ASC"])
        view.sql = f"SELECT {select} FROM {source}{where} ORDER BY {order}"
        return view

    # Sorted aggregates ride along as hidden columns.
    sorts = []
    for index, (name, direction) in enumerate(config["sort"]):
        items.append(f"{aggregate_sql(columns[name], aggregate_of[name], cursor_sql, rollup=rollup, some_rows=True)} "
                     f"AS __s{index}")
        sorts.append((f"__s{index}", direction))
    keys = []
    for name in group_by:
        key = value_sql(columns[name])
        # ROLLUP merges keys with the same SQL (`date`, and a bucket of it
        # that keeps the date as it is): identity() keeps each level apart.
        while key in keys:
            key = f"identity({key})"
        keys.append(key)
    key_items = ", ".join(f"{key} AS __r{i}" for i, key in enumerate(keys))
    # Flat and unsorted (a chart): only the leaves, so no ROLLUP at all. A
    # sorted flat view still needs its ancestors' values to order by.
    leaves = mode == "flat" and not sorts
    grouping = f"({', '.join(keys)})" if leaves else f"ROLLUP({', '.join(keys)})"
    # Without ROLLUP every row is a leaf: its depth is known, not computed.
    depth = str(len(keys)) if leaves else depth_sql(keys)
    grouped = (f"SELECT {depth} AS __depth, {key_items}, {', '.join(items) or '1 AS __none'} "
               f"FROM {source}{where} GROUP BY {grouping}")
    leaves_only = f" WHERE __depth = {len(keys)}" if mode == "flat" else ""
    # Counting groups needs their keys, not their aggregates: a flat view
    # has a row per group of its keys, a rollup also one per ancestor.
    view.count_sql = (f"SELECT count() FROM (SELECT 1 FROM {source}{where} GROUP BY "
                      f"{'(' + ', '.join(keys) + ')' if mode == 'flat' else grouping})")
    windows, order = tree_order_sql(len(keys), sorts)
    view.group_levels = len(keys)
    if leaves:
        # Every row is a leaf: ordered by its keys, with nothing to filter.
        order = [key for key in order if not key.startswith("__depth")]
        view.sql = f"{grouped} ORDER BY {', '.join(order)}"
        return view
    if windows:
        grouped = f"SELECT *, {', '.join(windows)} FROM ({grouped})"
    view.sql = f"SELECT * FROM ({grouped}){leaves_only} ORDER BY {', '.join(order)}"
    return view


def page_sql(view: ViewQuery, start: int, end: int | None) -> str:
    """The view's rows [start, end) as one query."""
    limit = "" if end is None else f" LIMIT {max(0, int(end) - int(start))}"
    return f"{view.sql}{limit} OFFSET {int(start)}"


def size_sql(view: ViewQuery) -> str:
    return view.count_sql or f"SELECT count() FROM ({view.sql})"


# A new view's first page is read beside its row count (HistoryHandler.
# view_size): what a viewer asks first. A chart reads up to 4,000 cells
# before "Render all points", a grid a screenful of rows. At most 1,000 rows:
# up to there ClickHouse 26.9 finds the first rows of a sorted GROUP BY
# without sorting every group (query_plan_max_limit_for_top_k_optimization);
# 1,000 rows of 1-minute candles took 9 ms, 1,001 rows 23 ms.
FIRST_PAGE_CELLS = 4_000
FIRST_PAGE_ROWS = (100, 1_000)


def first_page_rows(view: ViewQuery) -> int:
    low, high = FIRST_PAGE_ROWS
    return max(low, min(high, math.ceil(FIRST_PAGE_CELLS / max(1, len(view.kinds)))))


# ---------------------------------------------------------------------------
# Answers: ClickHouse results pushed into Perspective's cells.

def _cells(column, kind: str) -> tuple[str, list]:
    """An Arrow column as (the set_col type, Python values) for Perspective."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_timestamp(column.type):
        return "datetime", pc.cast(column.cast(pa.timestamp("ms", column.type.tz)), pa.int64()).to_pylist()
    if pa.types.is_date(column.type):
        days = pc.cast(column.cast(pa.date32()).cast(pa.int32()), pa.int64())
        return "datetime", pc.multiply(days, 86_400_000).to_pylist()
    values = column.to_pylist()
    if kind in ("integer", "float") or pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in values]
        # Perspective's integer cells are 32-bit; wider values travel as
        # float, exact up to 2**53.
        if all(v is None or (isinstance(v, int) and -2**31 <= v < 2**31) for v in values):
            return "integer", values
        return "float", [None if v is None else float(v) for v in values]
    if kind == "boolean" or pa.types.is_boolean(column.type):
        return "boolean", values
    return "string", [None if v is None else str(v) for v in values]


class HistoryHandler:
    """Perspective's VirtualServer handler for one viewer session: its views
    are this session's, the table and the clients are shared (History)."""

    def __init__(self, history: "History"):
        self.history = history
        self.views: dict[str, ViewQuery] = {}
        self.made: set[str] = set()  # view ids the VirtualServer holds (made, not deleted)
        self.failure: str | None = None  # why the last request failed, in our words

    def _table(self, name: str) -> dict[str, Column]:
        if name != self.history.table:
            raise Refused(f"no table named {name!r} here")
        return self.history.columns()

    def get_features(self):
        return features()

    def get_hosted_tables(self):
        return [self.history.table]

    def table_schema(self, table_name):
        return {name: column.perspective_type for name, column in self._table(table_name).items()}

    def table_size(self, table_name):
        self._table(table_name)
        return self.history.count(f"SELECT count() FROM {quote(self.history.table)}")

    def table_make_view(self, table_name, view_name, config):
        self.made.add(view_name)  # the VirtualServer keeps it, even if it fails here
        table, params = self._table(table_name), Params()
        columns = {**table, **expression_columns(config.get("expressions"), table, params)}
        checked = checked_config(config, columns)
        aggregate_of = aggregates_of(checked, columns)
        rollup = next((r for r in self.history.rollups() if r.answers(checked, columns, aggregate_of)), None)
        if rollup is not None:
            # The same expressions, over the rollup's minutes.
            params, stored = Params(), rollup.source_columns(table)
            columns = {**stored, **expression_columns(config.get("expressions"), stored, params)}
        values = self.history.split_values(columns, checked, params, rollup) if checked["split_by"] else []
        self.views[view_name] = view_query(self.history.table, columns, self.history.cursor, checked, values,
                                           params, rollup)
        return view_name

    def table_validate_expression(self, table_name, expression):
        """The Perspective type of one expression. A Refused raised here is
        the VirtualServer's answer for this expression alone: the viewer's
        editor shows its one line under it."""
        return expression_column("expression", expression, self._table(table_name), Params()).perspective_type

    def _view(self, view_name) -> ViewQuery:
        view = self.views.get(view_name)
        if view is None:
            raise Refused("this view is gone; open it again")
        return view

    def view_schema(self, view_name, config=None):
        return self._view(view_name).schema

    def view_column_size(self, view_name, config=None):
        return len(self._view(view_name).kinds)

    def view_size(self, view_name):
        view = self._view(view_name)
        if view.sized:
            return self.history.count(size_sql(view), view.params)
        # A new view: the viewer asks for its first page next, so that page
        # is read now, beside the count, and kept for that request. This
        # session then has two queries running, never more: both end here.
        view.sized = True
        page = self.history.beside.submit(self.history.query, page_sql(view, 0, first_page_rows(view)),
                                          view.params)
        try:
            return self.history.count(size_sql(view), view.params)
        finally:
            with contextlib.suppress(Exception):  # a failed page is read again, and reported, if asked for
                view.first_page = page.result()

    def view_delete(self, view_name):
        self.views.pop(view_name, None)
        self.made.discard(view_name)

    def _rows(self, view: ViewQuery, start: int, end: int | None) -> pa.Table:
        """The view's rows [start, end): from its first page if that holds
        them (once: a later request reads ClickHouse again), else queried."""
        rows, view.first_page = view.first_page, None
        if rows is not None:
            asked = first_page_rows(view)
            if rows.num_rows < asked or (end is not None and end <= asked):  # all rows, or enough
                stop = rows.num_rows if end is None else min(end, rows.num_rows)
                return rows.slice(start, max(0, stop - start))
        try:
            return self.history.query(page_sql(view, start, end), view.params)
        except Exception as error:
            # A chart reads every row of its view: say what to change.
            if "TOO_MANY_ROWS" in str(error):
                raise Refused(f"this view has more than {self.history.limits.max_rows:,} rows "
                              f"(--history-max-rows): choose a larger bucket, or filter") from None
            raise

    def view_get_data(self, view_name, config, schema, viewport, data):
        view = self._view(view_name)
        start, end = viewport.get("start_row") or 0, viewport.get("end_row")
        rows = self._rows(view, start, end)
        if view.group_levels:
            depths = rows.column("__depth").to_pylist()
            for level in range(view.group_levels):
                kind, keys = _cells(rows.column(f"__r{level}"), "")
                for index, (depth, key) in enumerate(zip(depths, keys)):
                    if level < depth:
                        data.set_col(kind, f"__ROW_PATH_{level}__", index, key)
        aliases = list(view.kinds)[viewport.get("start_col") or 0:viewport.get("end_col")]
        for alias in aliases:
            kind, values = _cells(rows.column(alias), view.kinds[alias])
            for index, value in enumerate(values):
                data.set_col(kind, view.names[alias], index, value)


def _answers_in_our_words(method, fallback):
    """Wraps a handler method so that a failure is remembered as one short
    line, which the session sends to the viewer. The method then returns a
    placeholder rather than raising: Perspective would put a raised
    exception's traceback in its answer and in the server's log."""
    def wrapped(self, *args):
        try:
            return method(self, *args)
        except Refused as error:
            self.failure = str(error)
        except Exception as error:
            self.failure = _clickhouse_reason(error)
            log.info("%s", self.failure)
        return fallback
    wrapped.__name__ = method.__name__
    return wrapped


for _name, _fallback in (("table_schema", {}), ("table_size", 0), ("table_make_view", ""), ("view_schema", {}),
                         ("view_column_size", 0), ("view_size", 0), ("view_delete", None),
                         ("view_get_data", None)):
    setattr(HistoryHandler, _name, _answers_in_our_words(getattr(HistoryHandler, _name), _fallback))


def _clickhouse_reason(error: Exception) -> str:
    """ClickHouse's own words for a failed query, without the query itself."""
    text = str(error)
    match = re.search(r"DB::Exception: (.*?)(?: \(([A-Z_]+)\))?(?:\. Stack trace|$| \(version)", text, re.S)
    reason = (match.group(1) if match else text.splitlines()[0] if text else type(error).__name__).strip()
    if match and match.group(2):
        reason += f" ({match.group(2)})"
    return "history query failed: " + reason[:300]


class HistorySession:
    """One viewer's connection: its requests run in order on the shared pool,
    never on the IOLoop; `callback` gets each answer (from a pool thread)."""

    def __init__(self, history: "History", callback):
        self.history = history
        self.callback = callback
        self.handler = HistoryHandler(history)
        self.server = perspective.VirtualServer(self.handler)
        self.pending: collections.deque[bytes] = collections.deque()
        self.lock = threading.Lock()
        self.busy = False
        self.closed = False

    def handle_request(self, message: bytes) -> None:
        with self.lock:
            if self.closed:
                return
            self.pending.append(message)
            if self.busy:
                return  # the running drain picks it up: one request at a time per session
            self.busy = True
        self.history.pool.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self.lock:
                if self.closed or not self.pending:
                    self.busy = False
                    return
                message = self.pending.popleft()
            try:
                answer = self._answer(message)
            except BaseException:
                with self.lock:
                    self.busy = False
                raise
            if answer is not None and not self.closed:
                self.callback(answer)

    def _answer(self, message: bytes) -> bytes | None:
        self.handler.failure = None
        try:
            _, entity, _, _ = read_only.parse_request(message)
        except read_only.MalformedRequest as error:
            return read_only.refusal(message, f"bad request: {error}")
        # Perspective's VirtualServer panics on a request about a view it
        # does not hold (never made, or deleted): answer those here.
        if entity and entity.decode() != self.history.table and entity.decode() not in self.handler.made:
            return read_only.refusal(message, "this view is gone; open it again")
        try:
            answer = self.server.handle_request(message)
        except BaseException as error:  # noqa: BLE001 - a Rust panic arrives as a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return read_only.refusal(message, self.handler.failure or f"bad request: {type(error).__name__}")
        if self.handler.failure:
            return read_only.refusal(message, self.handler.failure)
        return answer

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.pending.clear()
        self.handler.views.clear()


class History:
    """The whole table, served to viewers as a Perspective virtual table.

    `connect` opens a ClickHouse client; each pool thread opens its own.
    Pass it as `perspective_server` to viewers.ViewerHandler.
    """

    def __init__(self, connect, table: str, cursor: str, hidden=(), limits: Limits = Limits(),
                 use_rollup: bool = True):
        self.connect = connect
        self.table = table
        self._rollups: list[Rollup] | None = None if use_rollup else []
        self.cursor = cursor
        self.hidden = tuple(hidden)
        self.limits = limits
        self.pool = ThreadPoolExecutor(max_workers=limits.threads, thread_name_prefix="history")
        # A session's second query: a new view's first page, beside its count.
        self.beside = ThreadPoolExecutor(max_workers=limits.threads, thread_name_prefix="history-page")
        self._local = threading.local()
        self._columns: dict[str, Column] | None = None
        self._clients = []
        self._clients_lock = threading.Lock()

    def new_session(self, callback) -> HistorySession:
        return HistorySession(self, callback)

    def client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.connect()
            with self._clients_lock:
                self._clients.append(client)
        return client

    def query(self, sql: str, params: dict | None = None, arrow: bool = True):
        """Runs one history query with the limits; returns an Arrow table
        (or, with arrow=False, clickhouse-connect's result)."""
        client = self.client()
        try:
            if arrow:
                return client.query_arrow(sql + self.limits.clause(), parameters=params or None)
            return client.query(sql + self.limits.clause(), parameters=params or None)
        except Exception:
            # chDB in-process: after a query fails part way through its
            # result, the next query on that connection reads the rest and
            # fails too. A throwaway query takes that (over HTTP it is only
            # a cheap query).
            with contextlib.suppress(Exception):
                client.command("SELECT 1")
            raise

    def count(self, sql: str, params: dict | None = None) -> int:
        return int(self.query(sql, params).column(0)[0].as_py())

    def columns(self) -> dict[str, Column]:
        """The table's columns as Perspective sees them; read once, when the
        table exists. Warns about columns left out, as the live view does."""
        if self._columns is None:
            described = self.client().query(
                "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                "AND table = {table:String} ORDER BY position",
                parameters={"table": self.table}, settings=self.limits.settings()).result_rows
            if not described:
                raise Refused(f"table {self.table} does not exist yet")
            if self.cursor not in dict(described):
                raise Refused(f"table {self.table} has no cursor column {self.cursor}")
            mapped, skipped = map_columns([(name, kind) for name, kind in described if name not in self.hidden])
            for name, kind in skipped:
                log.warning("column %s (%s) has no Perspective type; it is left out of history", name, kind)
            self._columns = {column.name: column for column in mapped}
        return self._columns

    def rollups(self) -> list[Rollup]:
        """The table's per-minute rollups (AggregatingMergeTree tables named
        `<table>_by_...`, as producer.py makes), smallest first; read once."""
        if self._rollups is None:
            described = self.client().query(
                "SELECT table, name FROM system.columns WHERE database = currentDatabase() AND table IN ("
                "SELECT name FROM system.tables WHERE database = currentDatabase() AND "
                "startsWith(name, {prefix:String}) AND engine LIKE '%AggregatingMergeTree') ORDER BY table, position",
                parameters={"prefix": f"{self.table}_by_"}, settings=self.limits.settings()).result_rows
            tables = collections.defaultdict(list)
            for table, name in described:
                tables[table].append(name)
            found = [Rollup.from_columns(table, names, self.columns()) for table, names in tables.items()]
            self._rollups = sorted((r for r in found if r), key=lambda r: (len(r.dimensions), r.table))
            if self._rollups:
                log.info("history reads %s for views by whole minutes", ", ".join(r.table for r in self._rollups))
            else:
                log.info("no rollup %s_by_...: history reads every row of %s for each view "
                         "(docs/history.md shows how to add one)", self.table, self.table)
        return self._rollups

    def split_values(self, columns: dict[str, Column], config: dict, params: Params | None = None,
                     rollup: Rollup | None = None) -> list:
        """The split-by values to show as columns: the `limits.split_values`
        most frequent, in Perspective's order (ascending, null first). The
        others are left out, and the log says so. `params` are those of the
        view's expression columns; `rollup`, the rollup the view reads."""
        params = Params(params or {})
        where = where_sql(columns, config["filter"], config["filter_op"], params)
        split = columns[config["split_by"][0]]
        sql = (split_values_sql(rollup.table, split, where, self.limits.split_values, rollup.rows_sql("1"))
               if rollup else split_values_sql(self.table, split, where, self.limits.split_values))
        values = [row[0] for row in self.query(sql, params, arrow=False).result_rows]
        if len(values) > self.limits.split_values:
            values = values[:self.limits.split_values]
            log.info("split by %s: showing the %d most frequent values; the rest are left out",
                     config["split_by"][0], self.limits.split_values)
        has_null = None in values
        ordered = sorted(v for v in values if v is not None)
        return ([None] if has_null else []) + ordered

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.beside.shutdown(wait=True, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
