"""Chapter 3 (ClickHouse rows, live in every browser): ClickHouse's column types as Perspective's.

Perspective has six column types: string, integer, float, boolean, date and
datetime. For each ClickHouse column this module picks one, plus the SQL
expression that makes ClickHouse send the column in an Arrow type Perspective
reads. The conversion happens in the SELECT, not in Python, for two reasons:
it costs nothing extra per row, and ClickHouse's Arrow output needs it (a
DateTime arrives as a plain UInt32, an Enum as its number, a UUID as an
extension type Perspective cannot load).

A column with no sensible mapping (Array, Map, Tuple, JSON, ...) is left out,
and the caller logs a warning that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INTEGERS = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"}
# Too wide for Perspective's 64-bit integers; float keeps the magnitude.
_WIDE_INTEGERS = {"Int128", "Int256", "UInt128", "UInt256"}
_FLOATS = {"Float32", "Float64", "BFloat16"}
_STRINGS = {"String", "UUID", "IPv4", "IPv6"}


@dataclass(frozen=True)
class Column:
    name: str
    clickhouse_type: str
    perspective_type: str
    select: str  # SQL that yields the column in an Arrow type Perspective reads


def quote(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def unwrap(clickhouse_type: str) -> str:
    """Strips Nullable(...) and LowCardinality(...), which do not change the kind."""
    while True:
        match = re.fullmatch(r"(?:Nullable|LowCardinality)\((.*)\)", clickhouse_type.strip())
        if not match:
            return clickhouse_type.strip()
        clickhouse_type = match.group(1)


def type_name(clickhouse_type: str) -> str:
    """The type's name, unwrapped and without its parameters: "DateTime64"
    for Nullable(DateTime64(6, 'UTC'))."""
    return unwrap(clickhouse_type).split("(", 1)[0]


def perspective_type(clickhouse_type: str) -> str | None:
    """The Perspective type for a ClickHouse type, or None if there is none."""
    name = type_name(clickhouse_type)
    if name in _INTEGERS:
        return "integer"
    if name in _FLOATS or name in _WIDE_INTEGERS or name.startswith("Decimal"):
        return "float"
    if name == "Bool":
        return "boolean"
    if name in _STRINGS or name in ("FixedString", "Enum8", "Enum16", "Enum"):
        return "string"
    if name in ("Date", "Date32"):
        return "date"
    if name in ("DateTime", "DateTime64"):
        return "datetime"
    return None


_CASTS = {
    "integer": "toInt64({})",
    "float": "toFloat64({})",
    "boolean": "{}",
    "string": "toString({})",
    "date": "toDate32({})",
    # Perspective keeps datetimes as UTC milliseconds.
    "datetime": "toDateTime64({}, 3, 'UTC')",
}


def column(name: str, clickhouse_type: str) -> Column | None:
    kind = perspective_type(clickhouse_type)
    if kind is None:
        return None
    cast = _CASTS[kind]
    if unwrap(clickhouse_type).startswith("FixedString"):
        cast = "toStringCutToZero({})"  # toString would keep the zero padding
    expression = cast.format(quote(name))
    if expression != quote(name):
        expression += f" AS {quote(name)}"
    return Column(name, clickhouse_type, kind, expression)


def map_columns(described: list[tuple[str, str]]) -> tuple[list[Column], list[tuple[str, str]]]:
    """Splits (name, type) pairs into mapped columns and skipped ones."""
    mapped, skipped = [], []
    for name, clickhouse_type in described:
        result = column(name, clickhouse_type)
        if result is None:
            skipped.append((name, clickhouse_type))
        else:
            mapped.append(result)
    return mapped, skipped
