"""Chapter 4 (all of history, pivoted inside ClickHouse): computed columns, computed in ClickHouse.

The viewer's "New Column" editor sends an expression such as
`bucket("timestamp", '1m')` with the view config. The live page computes it
in Perspective; history must compute it in ClickHouse, over every row. The
text never reaches ClickHouse. A small parser (below) reads it into a tree,
refusing anything outside a tiny grammar, and this module builds SQL from
that tree, node by node, from a short list of what it knows:

* `bucket("col", 'N unit')` over a date or datetime column, with the units
  and counts Perspective 4.3.0 itself accepts (BUCKETS below). Its answers
  are Perspective's, computed in UTC: seconds, minutes and hours are counted
  from the epoch (on a date column they leave the date as it is, as
  Perspective does); a day is the UTC date, a week starts on Monday, N months
  start in a month whose number within the year is a multiple of N, N years
  in a year that is a multiple of N. A datetime bucketed by s/m/h stays a
  datetime, anything else is a date;
* `+ - * /` over numeric columns and numbers, as Perspective computes them:
  in floating point (a sign alone keeps the type), null in, null out, and
  null for a division by zero.

Everything else (abs, min, hour_of_day, ExprTK's variables and loops, ...)
is refused with one line. A column is looked up among the table's columns and
then quoted; every number, and a bucket's step, is a bound parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clickhouse_types import Column, quote, type_name

# unit -> counts Perspective 4.3.0 accepts ('7m' is an error there).
BUCKETS = {
    "s": (1, 5, 10, 15, 20, 30), "m": (1, 5, 10, 15, 20, 30), "h": (1, 2, 3, 4, 6, 12),
    "D": (1,), "W": (1,), "M": (1, 2, 3, 4, 6), "Y": tuple(range(1, 101)),
}
_MILLISECONDS = {"s": 1_000, "m": 60_000, "h": 3_600_000}
_UNIT = re.compile(r"'(\d*)([smhDWMY])'")
MAX_LENGTH = 500      # characters in one expression
MAX_EXPRESSIONS = 32  # expressions in one view
MAX_NESTING = 16      # parentheses and signs inside one another


class Refused(ValueError):
    """A request the history server will not run; the message says why."""


# --- The grammar -------------------------------------------------------------
#
#     expression := term (("+" | "-") term)*
#     term       := factor (("*" | "/") factor)*
#     factor     := ("+" | "-") factor | number | 'string' | "column"
#                 | "(" expression ")" | bucket "(" expression "," expression ")"
#
# The tree: ("number" | "string" | "column", token text), ("sign", "+" | "-",
# tree), ("binary", operator, left, right), ("call", "bucket", [arguments]).
# A word that is not `bucket` is refused here, before any SQL is built.

_TOKEN = re.compile(r"""
    (?P<space>\s+|//[^\n]*)
  | (?P<column>"(?:[^"\\\n]|\\.)*")
  | (?P<string>'(?:[^'\\\n]|\\.)*')
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<symbol>[-+*/(),])
""", re.VERBOSE)


class _Parser:
    """Recursive descent over the grammar above; raises Refused."""

    def __init__(self, text: str):
        self.tokens, at = [], 0
        while at < len(text):
            match = _TOKEN.match(text, at)
            if match is None:
                raise Refused(f"expression refused: {text[at:at + 10]!r} is not allowed in an expression")
            if match.lastgroup != "space":
                self.tokens.append((match.lastgroup, match.group()))
            at = match.end()
        self.at, self.depth = 0, 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.at] if self.at < len(self.tokens) else ("end", "")

    def take(self, text: str) -> None:
        if self.peek()[1] != text:
            raise Refused(f"expression refused: expected {text!r}, found {self.peek()[1] or 'the end'!r}")
        self.at += 1

    def nested(self, rule):
        # A bound on nesting keeps Python's stack safe.
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise Refused("expression refused: nested too deeply")
        tree = rule()
        self.depth -= 1
        return tree

    def expression(self):
        return self._chain(self.term, ("+", "-"))

    def term(self):
        return self._chain(self.factor, ("*", "/"))

    def _chain(self, operand, operators):
        """operand (operator operand)*, grouped from the left."""
        tree = operand()
        while (operator := self.peek()[1]) in operators:
            self.at += 1
            tree = ("binary", operator, tree, operand())
        return tree

    def factor(self):
        kind, text = self.peek()
        self.at += 1
        if text in ("+", "-"):
            return ("sign", text, self.nested(self.factor))
        if kind in ("number", "string", "column"):
            return (kind, text)
        if text == "(":
            tree = self.nested(self.expression)
            self.take(")")
            return tree
        if kind == "name" and text == "bucket":
            self.take("(")
            arguments = [self.nested(self.expression)]
            self.take(",")
            arguments.append(self.nested(self.expression))
            self.take(")")
            return ("call", text, arguments)
        if kind == "name":
            raise Refused(f"{text}() is not available on history (bucket() and + - * / are)")
        raise Refused(f"expression refused: unexpected {text or 'end of expression'!r}")


def parse(text: str):
    """The tree of one expression's text; raises Refused outside the grammar."""
    if len(text) > MAX_LENGTH:
        raise Refused(f"expression refused: longer than {MAX_LENGTH} characters")
    parser = _Parser(text)
    tree = parser.expression()
    if parser.at != len(parser.tokens):
        raise Refused(f"expression refused: unexpected {parser.peek()[1]!r}")
    return tree


@dataclass(frozen=True)
class Bucket:
    """What a bucket() column is, for a source that stores rows pre-bucketed."""
    column: str
    count: int
    unit: str


@dataclass(frozen=True)
class ExpressionColumn(Column):
    """A computed column: its `select` is SQL built here, `bucket` says which
    bucket it is (None for arithmetic)."""
    bucket: Bucket | None = None


def bucket_sql(x: str, kind: str, count: int, unit: str, params, whole_seconds: bool = False) -> tuple[str, str]:
    """The start of the bucket that `x` (a date or datetime column, as
    Perspective sees it) falls in, and its Perspective type. `whole_seconds`:
    ClickHouse stores the column as a DateTime (seconds since 1970)."""
    if unit in _MILLISECONDS:
        if kind == "date":
            return x, "date"  # Perspective: a date is already its own second, minute, hour
        if whole_seconds:
            # Never before 1970, where toStartOfInterval agrees with the
            # epoch arithmetic below (every step Perspective offers divides a
            # day), and it is cheaper: 1-minute candles group about 1 ms faster.
            seconds = params.bind(count * _MILLISECONDS[unit] // 1000, "UInt32")
            return f"toDateTime64(toStartOfInterval({x}, toIntervalSecond({seconds})), 3, 'UTC')", "datetime"
        step = params.bind(count * _MILLISECONDS[unit], "Int64")
        # positiveModulo floors before 1970 too, where toStartOfInterval clamps.
        ms = f"toUnixTimestamp64Milli({x})"
        return f"fromUnixTimestamp64Milli({ms} - positiveModulo({ms}, {step}), 'UTC')", "datetime"
    day = f"toDate32({x})"
    if unit == "D":
        return day, "date"
    if unit == "W":
        return f"({day} - (toDayOfWeek({day}) - 1))", "date"
    n = params.bind(count, "UInt16")
    if unit == "M":
        return f"makeDate32(toYear({x}), intDiv(toMonth({x}) - 1, {n}) * {n} + 1, 1)", "date"
    return f"makeDate32(intDiv(toYear({x}), {n}) * {n}, 1, 1)", "date"


def parse_unit(token: str) -> tuple[int, str]:
    """'5m' -> (5, 'm'); refuses counts Perspective does not offer."""
    match = _UNIT.fullmatch(token)
    if match is None:
        raise Refused(f"bucket() unit {token} is not a count and one of s m h D W M Y")
    count = int(match.group(1) or 1)
    if count not in BUCKETS[match.group(2)]:
        offered = BUCKETS[match.group(2)]
        shown = f"{offered[0]}-{offered[-1]}" if len(offered) > 10 else ", ".join(map(str, offered))
        raise Refused(f"bucket() counts for '{match.group(2)}' are {shown}")
    return count, match.group(2)


def column_name(token: str) -> str:
    """The name inside a "column" token, unescaped as Perspective reads it."""
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def _value_sql(column: Column) -> str:
    return column.select.removesuffix(f" AS {quote(column.name)}")


def tree_sql(tree, columns: dict[str, Column], params) -> tuple[str, str, Bucket | None]:
    """(SQL, Perspective type, bucket or None) of one parsed expression."""
    node = tree[0]
    if node == "column":
        name = column_name(tree[1])
        column = columns.get(name)
        if column is None or isinstance(column, ExpressionColumn):
            raise Refused(f"{name!r} is not a column of this table")
        return _value_sql(column), column.perspective_type, None
    if node == "number":
        return params.bind(float(tree[1]), "Float64"), "float", None
    if node == "sign":
        sql, kind, _ = _number(tree[2], columns, params)
        return (f"(-{sql})" if tree[1] == "-" else sql), kind, None
    if node == "binary":
        left, right = (_number(side, columns, params) for side in tree[2:])
        # Perspective computes in floating point: so does ClickHouse, then.
        left, right = (sql if kind == "float" else f"toFloat64({sql})" for sql, kind, _ in (left, right))
        if tree[1] == "/":
            return f"if({right} = 0, NULL, {left} / {right})", "float", None
        return f"({left} {tree[1]} {right})", "float", None
    if node == "call" and tree[1] == "bucket":
        source, unit = tree[2]
        if source[0] != "column" or unit[0] != "string":
            raise Refused('bucket() takes a column and a unit: bucket("timestamp", \'1m\')')
        x, kind, _ = tree_sql(source, columns, params)
        if kind not in ("date", "datetime"):
            raise Refused(f"bucket() needs a date or datetime column, not {column_name(source[1])!r}")
        count, unit = parse_unit(unit[1])
        stored = type_name(columns[column_name(source[1])].clickhouse_type)
        sql, result = bucket_sql(x, kind, count, unit, params, whole_seconds=stored == "DateTime")
        return sql, result, Bucket(column_name(source[1]), count, unit)
    what = f"{tree[1]}()" if node == "call" else "text"
    raise Refused(f"{what} is not available on history (bucket() and + - * / are)")


def _number(tree, columns, params) -> tuple[str, str, None]:
    sql, kind, bucket = tree_sql(tree, columns, params)
    if kind not in ("integer", "float") or bucket is not None:
        raise Refused("+ - * / take numbers and numeric columns")
    return sql, kind, None


def expression_column(name, text, columns: dict[str, Column], params) -> ExpressionColumn:
    """One named expression of a view config as a column of the view."""
    if not isinstance(name, str) or not isinstance(text, str) or not name:
        raise Refused("an expression needs a name and a text")
    if name in columns:
        raise Refused(f"expression name {name!r} is already a column")
    sql, kind, bucket = tree_sql(parse(text), columns, params)
    return ExpressionColumn(name, "", kind, f"{sql} AS {quote(name)}", bucket)


def expression_columns(expressions, columns: dict[str, Column], params) -> dict[str, ExpressionColumn]:
    """A config's `expressions` (name -> text) as columns, checked one by one."""
    if not expressions:
        return {}
    if not isinstance(expressions, dict):
        raise Refused("expressions must map a name to a text")
    if len(expressions) > MAX_EXPRESSIONS:
        raise Refused(f"at most {MAX_EXPRESSIONS} expressions in one view")
    return {name: expression_column(name, text, columns, params) for name, text in expressions.items()}
