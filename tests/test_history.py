"""History (chapter 4) gives the same cells as Perspective's own engine.

The main test is differential: the same few thousand rows go into ClickHouse
(chDB) and into a plain perspective.Table; for hundreds of generated view
configs, the view that history.py computes in ClickHouse, read through a real
perspective.Client speaking Perspective's protocol to the VirtualServer, must
hold the same cells as Perspective's own view: integers and strings exactly,
floats within 1e-9 relative. Some configs carry computed columns (a time
bucket of every unit over datetime and date columns, or arithmetic), which
they group, split, filter and sort by like any column.

One difference is by design and is compared differently: `first` and `last`
are the earliest and latest row by the cursor column. On a leaf row, or in a
flat view, that is Perspective's answer too (the rows were loaded in cursor
order); on a row with children Perspective takes the first/last *child in
tree order*, so those cells are checked against the cursor instead.
"""

from __future__ import annotations

import math
import os
import random

import perspective
import pytest

import history
import history_data

CONFIGS = int(os.environ.get("HISTORY_CONFIGS", 520))
SEED = int(os.environ.get("HISTORY_SEED", 20241))

# Perspective 4.3.0's min/max family treats a null inconsistently (as 0 in
# max, as the smallest value in some rows' min and not in others); history
# skips nulls, as SQL does. These are compared on columns without nulls.
NULL_SENSITIVE = {"min", "max", "low", "high", "high minus low"}
NEVER_NULL = {"open", "volume", "small", "ticker", "inserted_at", "id"}
GROUPABLE = ["ticker", "client", "flag", "date", "small", "note", "timestamp"]
SPLITTABLE = ["ticker", "client", "flag", "date", "note"]
# Computed columns history builds in ClickHouse: time buckets of each unit
# over datetime and date columns, and arithmetic.
BUCKETED = ["timestamp", "inserted_at", "date"]
UNITS = ["10s", "1m", "5m", "1h", "1D", "1W", "2M", "1Y", "s", "30s", "15m", "M"]
ARITHMETIC = ['"close" * "volume"', '"open" - "small" / 2', '-"shares"', '"volume" / "small"', '("open" + 1) * -2.5']


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(Perspective's table, history's table through a Client, the columns)."""
    import clickhouse_connect
    import uuid
    database = f"test_{uuid.uuid4().hex[:12]}"
    admin = clickhouse_connect.get_client(dsn="chdb://memory")
    admin.command(f"CREATE DATABASE {database}")
    admin.database = database
    columns, local_table, local_server = history_data.load(admin, 2000)

    def connect():
        client = clickhouse_connect.get_client(dsn="chdb://memory")
        client.database = database
        return client

    source = history.History(connect, history_data.TABLE, "inserted_at")
    session = source.new_session(callback=None)
    client = None
    # The real protocol, in process: each request's bytes go through the
    # session's VirtualServer and the answer's bytes back to the client.
    client = perspective.Client(lambda request: client.handle_response(session._answer(request)))
    remote = client.open_table(history_data.TABLE)
    yield local_table, remote, {c.name: c for c in columns}
    session.close()
    source.close()
    admin.command(f"DROP DATABASE {database}")
    del local_server


def filter_value(rng, values):
    present = [v for v in values if v is not None]
    return rng.choice(present) if present else None


def random_expressions(rng: random.Random) -> dict:
    """Zero to two computed columns: most often a time bucket."""
    expressions = {}
    if rng.random() < 0.4:
        expressions["bucket"] = f'bucket("{rng.choice(BUCKETED)}", \'{rng.choice(UNITS)}\')'
    if rng.random() < 0.15:
        expressions["computed"] = rng.choice(ARITHMETIC)
    return expressions


def random_config(rng: random.Random, kinds: dict, samples: dict, computed: dict) -> dict:
    """`kinds` and `samples` are the table's column types and values;
    `computed` the same for each expression text (Perspective's answers)."""
    names = [n for n in kinds if n != "id"]
    config = {"columns": rng.sample(names, rng.randint(1, 4))}
    expressions = random_expressions(rng)
    if expressions:
        config["expressions"] = expressions
        config["columns"] += [name for name in expressions if rng.random() < 0.7]
        names = names + list(expressions)
        kinds = {**kinds, **{name: computed[text][0] for name, text in expressions.items()}}
        samples = {**samples, **{name: computed[text][1] for name, text in expressions.items()}}
    depth = rng.choice([0, 1, 1, 2, 2])
    if depth:
        config["group_by"] = rng.sample(GROUPABLE + ["bucket"] * 3 * ("bucket" in expressions), depth)
        config["group_by"] = list(dict.fromkeys(config["group_by"]))
    if rng.random() < 0.35:
        # A split by a bucket, when it has no more values than history shows
        # (--history-split-values, 50).
        few = "bucket" in expressions and computed[expressions["bucket"]][2] <= history.Limits().split_values
        config["split_by"] = [rng.choice(SPLITTABLE + ["bucket"] * 2 * few)]
    # Perspective 4.3.0 fills a sorted split-by without group-by with zeros
    # and blanks instead of the rows' values; that view is not compared.
    sortable = bool(config.get("group_by") or not config.get("split_by"))
    aggregates = {}
    for name in config["columns"]:
        if rng.random() < 0.8:
            offered = history.AGGREGATES_BY_TYPE[kinds[name]]
            if name not in NEVER_NULL:
                offered = [a for a in offered if a not in NULL_SENSITIVE]
            aggregates[name] = rng.choice(offered)
    if aggregates:
        config["aggregates"] = aggregates
    sort = []
    grouped = bool(config.get("group_by") or config.get("split_by"))
    for _ in range(rng.choice([0, 1, 1, 2]) if sortable else 0):
        name = rng.choice(config["columns"])
        if grouped and aggregates.get(name) in ("first", "last"):
            continue  # on parent rows these differ by design (see the docstring)
        sort.append([name, rng.choice(["asc", "desc"])])
    if sort:
        config["sort"] = sort
    filters = []
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        name = rng.choice(names)
        kind = kinds[name]
        op = rng.choice(history.FILTER_OPS[kind])
        if op in ("is null", "is not null"):
            filters.append([name, op, None])
        elif op in ("in", "not in"):
            filters.append([name, op, rng.sample(sorted({v for v in samples[name] if v is not None}), 2)])
        elif op in ("begins with", "contains", "ends with"):
            word = filter_value(rng, samples[name]) or "a"
            filters.append([name, op, word[:rng.randint(1, max(1, len(word)))]])
        else:
            value = filter_value(rng, samples[name])
            if value is None or value == "":
                continue  # Perspective 4.3.0 compares with "" in its own way
            filters.append([name, op, value])
    if filters:
        config["filter"] = filters
    if config.get("group_by") and rng.random() < 0.25:
        config["group_rollup_mode"] = rng.choice(["flat", "total"])
    return config


def leaves_nothing(local_table, config) -> bool:
    """True if the config's filter matches no row. Perspective 4.3.0 crashes
    (SIGSEGV) on some such views (split + sort, or a group-by with certain
    aggregates), so they are not sent to it; test_empty_filter covers them."""
    if not config.get("filter"):
        return False
    rows = local_table.view(columns=config["columns"][:1], filter=config["filter"],
                            expressions=config.get("expressions", {}))
    empty = rows.num_rows() == 0
    rows.delete()
    return empty


# What Perspective 4.3.0 shows for a null cell in a split view without
# group-by: the type's zero. History shows the null.
_PERSPECTIVE_SPLIT_NULLS = (0, 0.0, "", False, -62167305600000)


def samples_of(local_table, expressions: dict | None = None, every=False) -> dict:
    view = local_table.view(expressions=expressions or {})
    data = view.to_columns()
    view.delete()
    return {name: values if every else values[:200] for name, values in data.items()}


def computed_columns(local_table) -> dict:
    """Each expression the generator may use -> (Perspective's type for it,
    sample values, how many distinct values), as Perspective computes them."""
    texts = [f'bucket("{column}", \'{unit}\')' for column in BUCKETED for unit in UNITS] + ARITHMETIC
    expressions = {f"e{index}": text for index, text in enumerate(texts)}
    types = local_table.validate_expressions(expressions)["expression_schema"]
    values = samples_of(local_table, expressions, every=True)
    return {text: (types[name], values[name][:200], len(set(values[name]))) for name, text in expressions.items()}


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) or isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def differences(config, expected: dict, actual: dict) -> list[str]:
    """What differs between two to_columns() answers, in words."""
    rows = len(next(iter(expected.values()), []))
    if rows == 0 and not any(actual.values()):
        return []  # nothing matched, on both sides
    if config.get("group_by") and "__ROW_PATH__" not in actual and rows:
        actual = {**actual, "__ROW_PATH__": [[] for _ in range(rows)]}
    found = []
    if list(expected) != list(actual) and set(expected) != set(actual):
        found.append(f"columns {sorted(set(expected) ^ set(actual))}")
        return found
    aggregates = config.get("aggregates", {})
    leaf_depth = len(config.get("group_by", []))
    paths = expected.get("__ROW_PATH__")
    for name, values in expected.items():
        other = actual[name]
        if len(values) != len(other):
            found.append(f"{name}: {len(values)} rows, history {len(other)}")
            continue
        column = name.split("|")[-1]
        by_cursor = aggregates.get(column) in ("first", "last")
        flat_split = "|" in name and not config.get("group_by")
        for row, (a, b) in enumerate(zip(values, other)):
            if flat_split and b is None and a in _PERSPECTIVE_SPLIT_NULLS:
                continue
            if by_cursor and paths is not None and len(paths[row]) < leaf_depth:
                continue  # checked against the cursor in test_first_last_by_cursor
            if not same(a, b):
                found.append(f"{name}[{row}]: perspective {a!r}, history {b!r}")
                break
    return found


def test_history_matches_perspective(both, capsys):
    local, remote, columns = both
    samples = samples_of(local)
    computed = computed_columns(local)
    kinds = {name: column.perspective_type for name, column in columns.items()}
    rng = random.Random(SEED)
    failures, ran, computing = [], 0, 0
    for _ in range(CONFIGS):
        config = random_config(rng, kinds, samples, computed)
        if leaves_nothing(local, config):
            config.pop("filter")
        expected_view = local.view(**config)
        expected = expected_view.to_columns()
        expected_view.delete()
        view = remote.view(**config)
        actual = view.to_columns()
        assert view.num_rows() == len(next(iter(expected.values()), [])) or not expected
        view.delete()
        ran += 1
        computing += bool(config.get("expressions"))
        found = differences(config, expected, actual)
        if found:
            failures.append((config, found[:3]))
    with capsys.disabled():
        print(f"\nhistory vs Perspective: {ran} configs (seed {SEED}; {computing} with a bucket or "
              f"arithmetic column), {ran - len(failures)} identical")
    assert not failures, "\n".join(f"{c}\n    {f}" for c, f in failures[:15]) + f"\n({len(failures)} differ)"
