"""Which Perspective type each ClickHouse column becomes, and the SELECT that sends it.

Only the pure mapping is tested here; whether ClickHouse really returns
these Arrow types is checked against a running engine elsewhere.
"""

import pytest

from clickhouse_types import Column, column, map_columns, perspective_type

MAPPED = {
    "integer": ["Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"],
    "float": ["Float32", "Float64", "Decimal(18, 4)", "Decimal32(2)", "Decimal64(4)", "Decimal128(10)"],
    "boolean": ["Bool"],
    "string": ["String", "FixedString(16)", "Enum8('a' = 1, 'b' = 2)", "Enum16('x' = 1)", "UUID"],
    "date": ["Date", "Date32"],
    "datetime": ["DateTime", "DateTime('UTC')", "DateTime64(3)", "DateTime64(6, 'UTC')"],
}
WRAPPED = {
    "Nullable(Int32)": "integer",
    "LowCardinality(String)": "string",
    "LowCardinality(Nullable(String))": "string",
    "Nullable(DateTime64(3, 'UTC'))": "datetime",
}
UNMAPPED = ["Array(Int32)", "Map(String, Int32)", "Tuple(Int32, String)", "JSON"]


@pytest.mark.parametrize("clickhouse_type, expected",
                         [(t, kind) for kind, types in MAPPED.items() for t in types])
def test_each_clickhouse_type_maps_to_its_perspective_type(clickhouse_type, expected):
    assert perspective_type(clickhouse_type) == expected


@pytest.mark.parametrize("clickhouse_type, expected", WRAPPED.items())
def test_nullable_and_low_cardinality_keep_the_inner_mapping(clickhouse_type, expected):
    assert perspective_type(clickhouse_type) == expected


@pytest.mark.parametrize("clickhouse_type", UNMAPPED)
def test_types_without_a_perspective_equivalent_map_to_none(clickhouse_type):
    assert perspective_type(clickhouse_type) is None
    assert column("c", clickhouse_type) is None


def test_map_columns_skips_unmapped_columns_by_name_and_keeps_the_order_of_the_rest():
    described = [
        ("id", "UUID"),
        ("tags", "Array(Int32)"),
        ("price", "Float64"),
        ("attrs", "Map(String, Int32)"),
        ("pair", "Tuple(Int32, String)"),
        ("doc", "JSON"),
        ("ts", "DateTime64(3, 'UTC')"),
    ]
    mapped, skipped = map_columns(described)
    assert [(c.name, c.perspective_type) for c in mapped] == [
        ("id", "string"), ("price", "float"), ("ts", "datetime")]
    assert skipped == [("tags", "Array(Int32)"), ("attrs", "Map(String, Int32)"),
                       ("pair", "Tuple(Int32, String)"), ("doc", "JSON")]


def test_map_columns_of_an_empty_table_is_empty():
    assert map_columns([]) == ([], [])


def test_column_records_name_types_and_select():
    assert column("volume", "UInt32") == Column(
        name="volume", clickhouse_type="UInt32", perspective_type="integer",
        select="toInt64(`volume`) AS `volume`")


# --- the SELECT expression ---------------------------------------------------


@pytest.mark.parametrize("clickhouse_type", ["DateTime", "DateTime('UTC')", "DateTime64(6, 'UTC')",
                                             "Nullable(DateTime('Europe/Paris'))"])
def test_datetimes_are_sent_as_utc_milliseconds(clickhouse_type):
    assert column("ts", clickhouse_type).select == "toDateTime64(`ts`, 3, 'UTC') AS `ts`"


@pytest.mark.parametrize("clickhouse_type", ["FixedString(16)", "Nullable(FixedString(4))",
                                             "LowCardinality(FixedString(2))"])
def test_fixed_strings_drop_their_zero_padding(clickhouse_type):
    assert column("code", clickhouse_type).select == "toStringCutToZero(`code`) AS `code`"


@pytest.mark.parametrize("clickhouse_type, select", [
    ("Enum8('a' = 1, 'b' = 2)", "toString(`c`) AS `c`"),  # the label, not the number
    ("UUID", "toString(`c`) AS `c`"),
    ("Decimal(18, 4)", "toFloat64(`c`) AS `c`"),
    ("UInt64", "toInt64(`c`) AS `c`"),
    ("Date", "toDate32(`c`) AS `c`"),
])
def test_select_casts_to_a_type_perspective_reads(clickhouse_type, select):
    assert column("c", clickhouse_type).select == select


def test_a_column_sent_as_is_has_no_alias():
    assert column("active", "Bool").select == "`active`"


@pytest.mark.parametrize("name, quoted", [
    ("my column", "`my column`"),
    ("we`ird", "`we\\`ird`"),
    ("a\\b", "`a\\\\b`"),
    ("select", "`select`"),
])
def test_select_quotes_odd_column_names(name, quoted):
    assert column(name, "Int32").select == f"toInt64({quoted}) AS {quoted}"
    assert column(name, "Bool").select == quoted
