"""history.py's SQL builders, one Perspective idea each, on their SQL text;
and the few facts about ClickHouse they rely on, on the real engine."""

from __future__ import annotations

import pytest

import history
import history_expressions
import history_rollup
from clickhouse_types import column

CLOSE = column("close", "Nullable(Float64)")
TICKER = column("ticker", "String")
ID = column("id", "UUID")
WHEN = column("timestamp", "DateTime64(3, 'UTC')")
DAY = column("date", "Date")
FLAG = column("flag", "Bool")
COLUMNS = {c.name: c for c in (CLOSE, TICKER, ID, WHEN, DAY, FLAG)}


def test_a_filter_value_is_a_bound_parameter_never_sql_text():
    params = history.Params()
    sql = history.filter_sql(TICKER, "==", "x' OR 1=1 --", params)
    assert sql == "toString(`ticker`) = {p0:String}"
    assert params == {"p0": "x' OR 1=1 --"}


def test_each_filter_operator_becomes_its_where_term():
    params = history.Params()
    assert history.filter_sql(CLOSE, ">=", 2.5, params) == "toFloat64(`close`) >= {p0:Float64}"
    # Perspective keeps nulls for != and "not in".
    assert history.filter_sql(CLOSE, "!=", 1, params) == "toFloat64(`close`) IS NULL OR toFloat64(`close`) != {p1:Float64}"
    assert history.filter_sql(TICKER, "begins with", "AA", params) == "startsWith(toString(`ticker`), {p2:String})"
    assert history.filter_sql(TICKER, "contains", "AP", params) == "position(toString(`ticker`), {p3:String}) > 0"
    assert history.filter_sql(TICKER, "ends with", "L", params) == "endsWith(toString(`ticker`), {p4:String})"
    assert history.filter_sql(TICKER, "in", ["A", "B"], params) == "has({p5:Array(String)}, toString(`ticker`))"
    assert history.filter_sql(TICKER, "not in", ["A"], params) == "toString(`ticker`) IS NULL OR NOT has({p6:Array(String)}, toString(`ticker`))"
    assert history.filter_sql(ID, "is null", None, params) == "toString(`id`) IS NULL"
    assert history.filter_sql(WHEN, "<", 1704067200000, params) == (
        "toDateTime64(`timestamp`, 3, 'UTC') < fromUnixTimestamp64Milli(toInt64({p7:Float64}), 'UTC')")
    assert history.filter_sql(DAY, "==", "2024-01-31", params) == (
        "toDate32(`date`) = toDate32(parseDateTime64BestEffort({p8:String}, 3, 'UTC'))")
    assert history.filter_sql(FLAG, "==", True, params) == "`flag` = {p9:Bool}"
    assert history.filter_sql(TICKER, "==", "", params) is None  # the viewer's half-typed filter


def test_an_operator_the_viewer_does_not_offer_for_the_type_is_refused():
    with pytest.raises(history.Refused):
        history.filter_sql(CLOSE, "contains", "1", history.Params())
    with pytest.raises(history.Refused):
        history.filter_sql(CLOSE, "; DROP TABLE", 1, history.Params())
    with pytest.raises(history.Refused):
        history.filter_sql(CLOSE, "==", "1 OR 1", history.Params())  # a number column takes numbers


def test_an_aggregate_is_a_select_item_and_first_last_go_by_the_cursor():
    assert history.aggregate_sql(CLOSE, "sum", "`inserted_at`") == (
        "if(countIf(1) = 0, NULL, coalesce(sumIf(toFloat64(`close`), 1), 0))")
    assert history.aggregate_sql(CLOSE, "count", "`inserted_at`") == "countIf(1)"
    assert "argMaxIf(tuple(toFloat64(`close`)), `inserted_at`, 1).1" in history.aggregate_sql(
        CLOSE, "last", "`inserted_at`")
    assert "argMinIf(tuple(toFloat64(`close`)), `inserted_at`, 1).1" in history.aggregate_sql(
        CLOSE, "first", "`inserted_at`")


def test_a_split_is_conditional_aggregates_empty_where_the_group_has_no_such_rows():
    params = history.Params()
    condition = history.split_condition(TICKER, "AAPL", params)
    assert condition == "toString(`ticker`) = {p0:String}"
    cell = history.split_cell_sql(CLOSE, "max", "`inserted_at`", condition)
    assert cell.startswith("if(countIf(toString(`ticker`) = {p0:String}) = 0, NULL, ")
    assert "maxIf(toFloat64(`close`), toString(`ticker`) = {p0:String})" in cell
    assert history.split_condition(TICKER, None, params) == "toString(`ticker`) IS NULL"


def test_split_values_are_the_most_frequent_plus_one_to_see_if_some_were_left_out():
    sql = history.split_values_sql("stock_values", TICKER, "", 50)
    assert sql == ("SELECT toString(`ticker`) AS v FROM `stock_values` GROUP BY v "
                   "ORDER BY count() DESC, v ASC NULLS FIRST LIMIT 51")


def test_split_labels_are_perspectives_column_path_names():
    from datetime import date, datetime
    assert [history.split_label(v) for v in (None, True, 4.0, 1.5, "AAPL", 7)] == [
        "null", "true", "4", "1.5", "AAPL", "7"]
    assert history.split_label(datetime(2024, 1, 1, 9, 30, 0, 123000)) == "2024-01-01 09:30:00.123"
    assert history.split_label(date(2024, 1, 31)) == "2024-01-31"


def test_a_rollup_is_ordered_as_a_tree_by_the_sorted_aggregate_of_each_ancestor():
    windows, order = history.tree_order_sql(2, [("__s0", "desc")])
    assert windows == [
        "any(if(__depth = 1, __s0, NULL)) OVER (PARTITION BY __r0) AS __o1_0",
        "any(if(__depth = 2, __s0, NULL)) OVER (PARTITION BY __r0, __r1) AS __o2_0"]
    assert order == ["__depth >= 1", "__o1_0 DESC NULLS LAST", "__r0 ASC NULLS FIRST",
                     "__depth >= 2", "__o2_0 DESC NULLS LAST", "__r1 ASC NULLS FIRST"]
    assert history.depth_sql(["`a`", "`b`"]) == "2 - bitCount(grouping(`a`, `b`))"


def test_names_from_a_client_must_be_columns_of_the_table():
    good = {"columns": ["close"], "group_by": ["ticker"], "aggregates": {"close": "avg"}}
    assert history.checked_config(good, COLUMNS)["aggregates"] == {"close": "avg"}
    for bad in ({"columns": ['close" FROM system.users --']}, {"columns": ["close"], "group_by": ["`x`"]},
                {"columns": ["close"], "sort": [["nope", "asc"]]},
                {"columns": ["close"], "aggregates": {"close": "sum(1)"}},
                {"columns": ["close"], "split_by": ["ticker", "flag"]}):
        with pytest.raises(history.Refused):
            history.checked_config(bad, COLUMNS)


def expression(text, columns=COLUMNS):
    params = history.Params()
    made = history_expressions.expression_column("b", text, columns, params)
    return made.select, made.perspective_type, params


def test_a_time_bucket_is_clickhouse_sql_with_its_step_bound():
    ms = "toUnixTimestamp64Milli(toDateTime64(`timestamp`, 3, 'UTC'))"
    assert expression('bucket("timestamp", \'5m\')') == (
        f"fromUnixTimestamp64Milli({ms} - positiveModulo({ms}, {{p0:Int64}}), 'UTC') AS `b`", "datetime",
        {"p0": 300_000})
    assert expression('bucket("timestamp", \'h\')')[2] == {"p0": 3_600_000}
    day = "toDate32(toDateTime64(`timestamp`, 3, 'UTC'))"
    assert expression('bucket("timestamp", \'1D\')')[:2] == (f"{day} AS `b`", "date")
    assert expression('bucket("timestamp", \'W\')')[0] == f"({day} - (toDayOfWeek({day}) - 1)) AS `b`"
    assert expression('bucket("date", \'2M\')') == (
        "makeDate32(toYear(toDate32(`date`)), intDiv(toMonth(toDate32(`date`)) - 1, {p0:UInt16}) * {p0:UInt16}"
        " + 1, 1) AS `b`", "date", {"p0": 2})
    assert expression('bucket("date", \'3Y\')')[0] == \
        "makeDate32(intDiv(toYear(toDate32(`date`)), {p0:UInt16}) * {p0:UInt16}, 1, 1) AS `b`"
    # Perspective: a date is its own second, minute and hour.
    assert expression('bucket("date", \'10s\')')[:2] == ("toDate32(`date`) AS `b`", "date")


def test_arithmetic_is_floating_point_with_every_number_bound():
    sql, kind, params = expression('-"close" * 2.5 / ("close" - 1)')
    assert (kind, params) == ("float", {"p0": 2.5, "p1": 1.0})
    divisor = "(toFloat64(`close`) - {p1:Float64})"
    assert sql == f"if({divisor} = 0, NULL, ((-toFloat64(`close`)) * {{p0:Float64}}) / {divisor}) AS `b`"
    assert expression('"volume" + 1', {"volume": column("volume", "UInt32")})[0] == \
        "(toFloat64(toInt64(`volume`)) + {p0:Float64}) AS `b`"
    assert expression('-"close"')[:2] == ("(-toFloat64(`close`)) AS `b`", "float")


@pytest.mark.parametrize("text", [
    'bucket("timestamp", \'7m\')', 'bucket("timestamp", \'0Y\')', 'bucket("timestamp", \'1 m\')',
    'bucket("close", \'1m\')', 'bucket("timestamp" + 1, \'1m\')', 'bucket("timestamp", "timestamp")',
    '"ticker" + 1', 'bucket("timestamp", \'1m\') + 1', 'abs("close")', "'text'", '"nope" * 2',
    '"canary.secret"', 'bucket("timestamp", \'1m\\\'); DROP TABLE canary --\')', '"close"; DROP TABLE canary',
    '(SELECT secret FROM canary)', 'sleep(3)', "for (var i := 0; i < 9; i += 1) { 1 }", "while (true) { 1 }",
    'var x := 1; x', '"close" := 1'])
def test_anything_else_in_an_expression_is_refused_with_one_line(text):
    with pytest.raises(history.Refused) as refused:
        expression(text)
    assert "\n" not in str(refused.value)


def test_an_expression_cannot_take_a_column_name_nor_refer_to_another_expression():
    with pytest.raises(history.Refused, match="already a column"):
        history_expressions.expression_column("close", '"close" * 2', COLUMNS, history.Params())
    columns = {**COLUMNS, "b": history_expressions.expression_column("b", '"close" * 2', COLUMNS, history.Params())}
    with pytest.raises(history.Refused, match="not a column"):
        history_expressions.expression_column("c", '"b" + 1', columns, history.Params())


def test_a_bucket_of_whole_seconds_is_start_of_interval_and_agrees_with_the_epoch_arithmetic(new_client):
    """A DateTime (not DateTime64) is bucketed by toStartOfInterval, which is
    cheaper; it must give the epoch arithmetic's answer for every step the
    viewer offers, in any time zone the column is declared in."""
    client = new_client()
    for zone in ("UTC", "Asia/Kolkata", "America/St_Johns"):
        column = history.Column("at", f"DateTime('{zone}')", "datetime", "toDateTime64(`at`, 3, 'UTC') AS `at`")
        x = history.value_sql(column)
        for unit in ("s", "m", "h"):
            for count in history_expressions.BUCKETS[unit]:
                params = history.Params()
                fast, _ = history_expressions.bucket_sql(x, "datetime", count, unit, params, whole_seconds=True)
                exact, _ = history_expressions.bucket_sql(x, "datetime", count, unit, params)
                assert "toStartOfInterval" in fast and "toStartOfInterval" not in exact
                differ = client.command(
                    f"SELECT countIf({fast} != {exact}) + countIf(toTypeName({fast}) != 'DateTime64(3, \\'UTC\\')') "
                    f"FROM (SELECT toDateTime(rand32(number), '{zone}') AS `at` FROM numbers(20000))",
                    parameters=params)
                assert differ == 0, (zone, count, unit)
    minute = history_expressions.expression_column(
        "m", 'bucket("at", \'1m\')', {"at": history.Column("at", "Nullable(DateTime)", "datetime", "`at`")},
        history.Params())
    assert "toStartOfInterval" in minute.select


def test_a_view_groups_by_a_bucket_with_the_buckets_parameters_first():
    params = history.Params()
    columns = {**COLUMNS, **history_expressions.expression_columns(
        {"minute": 'bucket("timestamp", \'1m\')'}, COLUMNS, params)}
    config = history.checked_config({"columns": ["close"], "group_by": ["minute"],
                                     "filter": [["ticker", "==", "AAPL"]], "expressions": {}}, columns)
    view = history.view_query("stock_values", columns, "inserted_at", config, params=params)
    assert view.params == {"p0": 60_000, "p1": "AAPL"}
    assert "GROUP BY ROLLUP(fromUnixTimestamp64Milli(" in view.sql and "AAPL" not in view.sql


def test_a_view_is_one_select_with_no_ddl_and_pages_are_limit_offset():
    config = history.checked_config({"columns": ["close"], "group_by": ["ticker"], "sort": [["close", "desc"]],
                                     "filter": [["ticker", "!=", "X"]]}, COLUMNS)
    view = history.view_query("stock_values", COLUMNS, "inserted_at", config)
    assert view.sql.startswith("SELECT * FROM (SELECT *, any(")
    assert "GROUP BY ROLLUP(toString(`ticker`))" in view.sql and "CREATE" not in view.sql
    assert view.params == {"p0": "X"}
    assert history.page_sql(view, 100, 150).endswith(" LIMIT 50 OFFSET 100")
    # The count skips the ordering: the same groups, fewer steps.
    size = history.size_sql(view)
    assert size.startswith("SELECT count() FROM (SELECT ") and "GROUP BY ROLLUP" in size and "ORDER BY" not in size
    assert view.names == {"__c0": "close"} and view.kinds == {"__c0": "float"}


def test_a_flat_unsorted_view_groups_without_rollup_and_a_sorted_one_keeps_its_ancestors():
    flat = history.checked_config({"columns": ["close"], "group_by": ["ticker", "flag"],
                                   "group_rollup_mode": "flat"}, COLUMNS)
    view = history.view_query("stock_values", COLUMNS, "inserted_at", flat)
    assert "GROUP BY (toString(`ticker`), `flag`)" in view.sql and "ROLLUP" not in view.sql
    assert view.sql.endswith("GROUP BY (toString(`ticker`), `flag`) "
                             "ORDER BY __r0 ASC NULLS FIRST, __r1 ASC NULLS FIRST")
    flat["sort"] = [("close", "desc")]
    assert "GROUP BY ROLLUP(" in history.view_query("stock_values", COLUMNS, "inserted_at", flat).sql


def test_a_rollup_reads_plain_aggregates_over_every_row_and_if_forms_for_a_split():
    rollup = history_rollup.Rollup("t_by_minute", frozenset({"ticker"}), frozenset({("close", "first")}))
    assert rollup.aggregate_sql(CLOSE, "first") == "if(sum(`rows`) = 0, NULL, argMinMerge(`close__first`))"
    assert rollup.aggregate_sql(CLOSE, "first", "c = 1") == \
        "if(sumIf(`rows`, c = 1) = 0, NULL, argMinMergeIf(`close__first`, c = 1))"
    assert rollup.aggregate_sql(CLOSE, "count", "c = 1") == "sumIf(`rows`, c = 1)"


def test_grouping_marks_rolled_up_keys_on_the_real_engine(new_client):
    client = new_client()
    rows = client.query("SELECT a, 2 - bitCount(grouping(a, b)) AS depth FROM (SELECT 1 AS a, 2 AS b) "
                        "GROUP BY ROLLUP(a, b) ORDER BY depth").result_rows
    assert [depth for _, depth in rows] == [0, 1, 2]


def test_the_limits_are_enforced_by_clickhouse(new_client):
    client = new_client()
    limits = history.Limits(max_rows=10)
    with pytest.raises(Exception, match="TOO_MANY_ROWS|Limit for result"):
        client.query("SELECT number FROM numbers(100)", settings=limits.settings())
    with pytest.raises(Exception, match="READONLY|readonly"):
        client.query("CREATE TABLE t (x Int8) ENGINE = Memory", settings=limits.settings())
    assert client.query("SELECT count() FROM numbers(100)", settings=limits.settings()).result_rows == [(100,)]
    # History sends them in the SQL itself: the same limits.
    assert limits.clause() == (" SETTINGS readonly = 2, max_execution_time = 10.0, max_result_rows = 10, "
                               "result_overflow_mode = 'throw', max_memory_usage = 2147483648")
    with pytest.raises(Exception, match="TOO_MANY_ROWS|Limit for result"):
        client.query("SELECT number FROM numbers(100)" + limits.clause())
    with pytest.raises(Exception, match="READONLY|readonly"):
        client.query("CREATE TABLE t (x Int8) ENGINE = Memory" + limits.clause())


def _history_client(database, limits=history.Limits()):
    """A perspective.Client speaking the protocol to a history session, in process."""
    import clickhouse_connect
    import perspective

    def connect():
        client = clickhouse_connect.get_client(dsn="chdb://memory")
        client.database = database
        return client

    source = history.History(connect, "t", "inserted_at", limits=limits)
    session = source.new_session(callback=None)
    client = None
    client = perspective.Client(lambda request: client.handle_response(session._answer(request)))
    return source, client


def test_a_split_shows_the_most_frequent_values_up_to_the_limit(new_client, database):
    admin = new_client()
    admin.command("CREATE TABLE t (inserted_at DateTime64(6), ticker String, x Int32) ENGINE = MergeTree ORDER BY inserted_at")
    admin.command("INSERT INTO t SELECT now64(6) + toIntervalMicrosecond(number), "
                  "['A','B','B','C','C','C'][1 + number % 6], 1 FROM numbers(60)")
    source, client = _history_client(database, history.Limits(split_values=2))
    view = client.open_table("t").view(columns=["x"], split_by=["ticker"])
    # C (30 rows) and B (20) are kept, A (10) is left out; columns in Perspective's order.
    assert [name for name in view.to_columns(start_row=0, end_row=6)] == ["B|x", "C|x"]
    source.close()


def test_the_table_size_is_counted_again_on_every_request(new_client, database):
    admin = new_client()
    admin.command("CREATE TABLE t (inserted_at DateTime64(6), x Int32) ENGINE = MergeTree ORDER BY inserted_at")
    admin.command("INSERT INTO t SELECT now64(6), number FROM numbers(5)")
    source, client = _history_client(database)
    table = client.open_table("t")
    assert table.size() == 5
    admin.command("INSERT INTO t SELECT now64(6), number FROM numbers(3)")
    assert table.size() == 8
    view = table.view(columns=["x"], group_by=["x"])
    assert view.num_rows() == 1 + 5  # the total and five distinct values
    source.close()


def test_a_new_views_first_page_is_read_with_its_count_and_used_once(new_client, database):
    admin = new_client()
    admin.command("CREATE TABLE t (inserted_at DateTime64(6), x Int32) ENGINE = MergeTree ORDER BY inserted_at")
    admin.command("INSERT INTO t SELECT now64(6), number FROM numbers(40)")
    source, client = _history_client(database)
    asked = []  # the views' queries (not the table's size, which Perspective asks along)
    query = source.query
    source.query = lambda sql, *args, **kwargs: (
        sql == "SELECT count() FROM `t`" or asked.append(sql)) and None or query(sql, *args, **kwargs)
    view = client.open_table("t").view(columns=["x"], group_by=["x"], group_rollup_mode="flat")
    asked.clear()
    # The count and the first page (as many rows as a chart reads first), together.
    assert view.num_rows() == 40
    assert sorted(sql.startswith("SELECT count()") for sql in asked) == [False, True]
    assert any(sql.endswith(f" LIMIT {history.FIRST_PAGE_ROWS[1]} OFFSET 0") for sql in asked)
    asked.clear()
    assert view.to_columns(start_row=5, end_row=8)["x"] == [5, 6, 7]
    assert asked == []  # answered from the first page
    # Only once: later requests see rows that landed since.
    admin.command("INSERT INTO t SELECT now64(6), 100 + number FROM numbers(2)")
    assert view.num_rows() == 42 and asked[-1].startswith("SELECT count()")
    assert view.to_columns(start_row=40, end_row=42)["x"] == [100, 101]
    assert len(asked) == 2
    # A first page that does not hold what is asked is not used.
    admin.command("INSERT INTO t SELECT now64(6), 1000 + number FROM numbers(1500)")
    rows = client.open_table("t").view(columns=["x"])
    assert rows.num_rows() == 1542
    asked.clear()
    assert rows.to_columns(start_row=0, end_row=1200)["x"][1100] == 1000 + 1100 - 42 and len(asked) == 1
    source.close()


def test_history_flags(capsys):
    import perspective_server

    settings, _ = perspective_server.parse_args(["--history-timeout", "3", "--history-max-rows", "500",
                                                 "--history-max-memory", "64", "--history-split-values", "5"])
    assert settings.history == history.Limits(timeout=3, max_rows=500, max_memory=64 << 20, split_values=5)
    assert perspective_server.parse_args(["--no-history"])[0].history is None
    with pytest.raises(SystemExit) as exit_info:
        perspective_server.parse_args(["--history-max-rows", "0"])
    assert exit_info.value.code == 2
    assert "--history-max-rows" in capsys.readouterr().err


def test_a_query_over_a_limit_leaves_the_connection_usable(database):
    import clickhouse_connect

    def connect():
        client = clickhouse_connect.get_client(dsn="chdb://memory")
        client.database = database
        return client

    source = history.History(connect, "t", "inserted_at", limits=history.Limits(max_rows=10))
    with pytest.raises(Exception, match="TOO_MANY_ROWS|Limit for result"):
        source.query("SELECT number FROM numbers(100000)")
    # The same thread, so the same connection: its next answer is whole.
    assert source.count("SELECT count() FROM numbers(100000)") == 100000
    source.close()
