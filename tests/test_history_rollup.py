"""The per-minute rollup gives the same cells as the table it summarises.

producer.py creates two rollups with the table (AggregatingMergeTrees filled
by materialized views): `stock_values_by_minute` per ticker and minute, and
`stock_values_by_client_minute` per ticker, client and minute. Two history servers read the same
rows: one may use the rollup, the other never does (its answers are checked
against Perspective's own engine in test_history.py). For generated views
that group, split, filter and sort by buckets of whole minutes, ticker and
client, both must hold the same cells; the smallest rollup that has the
view's keys must be the one read; and
after more rows land while views are being read, the same again.
"""

from __future__ import annotations

import random
import threading

import perspective

import history
import producer
from test_history import same

TABLE = "stock_values"
# Thirty hours of rows (several a minute), each with its own `inserted_at`
# (so first and last by it have one answer), ten tickers, four clients.
FILL = f"""
INSERT INTO {TABLE} (inserted_at, id, timestamp, ticker, client, open, high, low, close, volume, date)
SELECT toDateTime64('2024-03-01 00:00:00', 6, 'UTC') + toIntervalMicrosecond({{start:UInt64}} + number),
       generateUUIDv4(number), toDateTime64('2024-03-01 00:00:00', 3, 'UTC')
           + toIntervalMillisecond(({{start:UInt64}} + number) * 8641 % 108000000),
       ['AAPL','AMZN','GOOG','META','MSFT','NFLX','NVDA','ORCL','TSLA','UBER']
           [1 + cityHash64(number, {{start:UInt64}}) % 10],
       ['Alpha Capital','Birch Fund','Cobalt Partners','Delta Advisors'][1 + cityHash64(number, 7) % 4],
       100 + (cityHash64(number, 1) % 1000) / 10, 150 + (cityHash64(number, 2) % 1000) / 10,
       50 + (cityHash64(number, 3) % 1000) / 10, 100 + (cityHash64(number, 4) % 1000) / 10,
       toUInt32(cityHash64(number, 5) % 10000), toDate('2024-03-01')
FROM numbers({{rows:UInt64}})
"""
UNITS = ["1m", "5m", "30m", "1h", "3h", "12h", "1D", "1W", "1M", "1Y", "m", "D"]
MEASURES = ["open", "high", "low", "close", "volume"]
AGGREGATES = ["first", "last", "min", "max", "low", "high", "sum", "avg", "count", "high minus low"]


def random_config(rng: random.Random) -> dict:
    """A view the rollup can answer: keys are ticker, client and a bucket of
    whole minutes; cells are aggregates it stores."""
    config = {"expressions": {"b": f'bucket("timestamp", \'{rng.choice(UNITS)}\')'},
              "columns": rng.sample(MEASURES, rng.randint(1, 4))}
    # The rollup keeps no first or last volume: those views read the table.
    config["aggregates"] = {name: rng.choice(AGGREGATES[2:] if name == "volume" else AGGREGATES)
                            for name in config["columns"]}
    config["group_by"] = rng.choice([["b"], ["ticker", "b"], ["b", "client"], ["ticker"], []])
    if rng.random() < 0.4:
        config["split_by"] = [rng.choice(["ticker", "client"] + ["b"] * ("b" in config["group_by"]))]
    if not config["group_by"]:
        config["group_rollup_mode"] = "total"
    elif rng.random() < 0.3:
        config["group_rollup_mode"] = rng.choice(["flat", "total"])
    filters = []
    if rng.random() < 0.5:
        filters.append(["ticker", rng.choice(["==", "!=", "in"]), ["AAPL", "MSFT"] if rng.random() < 0.3 else "AAPL"])
    if rng.random() < 0.3:
        filters.append(["b", rng.choice([">=", "<"]), "2024-03-02 00:00:00"])
    for name, op, value in filters:
        if op != "in" and isinstance(value, list):
            value = value[0]
        config.setdefault("filter", []).append([name, op, value])
    if config["group_by"] and rng.random() < 0.4:
        name = rng.choice(config["columns"])
        if config["aggregates"][name] not in ("first", "last"):
            config["sort"] = [[name, rng.choice(["asc", "desc"])]]
    return config


def open_table(source: history.History):
    session = source.new_session(callback=None)
    client = None
    client = perspective.Client(lambda request: client.handle_response(session._answer(request)))
    return session, client.open_table(TABLE)


def expected_rollup(config) -> str:
    keys = config.get("group_by", []) + config.get("split_by", []) + [f[0] for f in config.get("filter", [])]
    return f"`{TABLE}_by_client_minute`" if "client" in keys else f"`{TABLE}_by_minute`"


def compare(rolled, plain, sessions, configs) -> tuple[int, list]:
    """(views the expected rollup answered, differences) over `configs`."""
    answered, failures = 0, []
    for config in configs:
        expected_view = plain.view(**config)
        expected = expected_view.to_columns()
        expected_view.delete()
        view = rolled.view(**config)
        actual = view.to_columns()
        made = list(sessions[0].handler.views.values())[-1]
        answered += f"FROM {expected_rollup(config)}" in made.sql
        view.delete()
        # Both read first/last by the cursor, so every cell must match,
        # parent rows too.
        found = [name for name in expected if len(expected[name]) != len(actual.get(name, []))
                 or not all(same(a, b) for a, b in zip(expected[name], actual[name]))]
        if found or set(expected) != set(actual):
            failures.append((config, found or sorted(set(expected) ^ set(actual))))
    return answered, failures


def test_the_rollup_gives_the_tables_cells_also_while_rows_land(new_client):
    admin = new_client()
    producer.create_table(admin, TABLE)
    admin.command(FILL, parameters={"start": 0, "rows": 20_000})
    with_rollup = history.History(new_client, TABLE, "inserted_at", hidden=("id",))
    without = history.History(new_client, TABLE, "inserted_at", hidden=("id",), use_rollup=False)
    rolled_session, rolled = open_table(with_rollup)
    plain_session, plain = open_table(without)
    rng = random.Random(11)
    configs = [random_config(rng) for _ in range(30)]
    answered, failures = compare(rolled, plain, [rolled_session], configs)
    assert not failures, "\n".join(f"{c}\n    {f}" for c, f in failures[:10])
    assert answered == len(configs), "some views read the table, not the rollup"

    # Views that need rows read the table, and still answer.
    for config in ({"columns": ["close"], "group_by": ["b"], "expressions": {"b": 'bucket("timestamp", \'10s\')'}},
                   {"columns": ["close"], "group_by": ["ticker"], "aggregates": {"close": "distinct count"}},
                   {"columns": ["close"], "group_by": ["ticker"], "filter": [["close", ">", 120]]},
                   {"columns": ["close", "ticker"]}):
        assert compare(rolled, plain, [rolled_session], [config]) == (0, [])

    # Rows land while the rollup is read: reads never fail, and afterwards
    # both agree on every cell again.
    stop, landed = threading.Event(), []

    def insert():
        writer = new_client()
        start = 20_000
        while not stop.is_set():
            writer.command(FILL, parameters={"start": start, "rows": 1_000})
            start += 1_000
            landed.append(start)

    inserter = threading.Thread(target=insert)
    inserter.start()
    try:
        reads = 0
        while len(landed) < 4:
            view = rolled.view(**configs[reads % len(configs)])
            view.to_columns()
            view.delete()
            reads += 1
    finally:
        stop.set()
        inserter.join()
    answered, failures = compare(rolled, plain, [rolled_session], configs[:10])
    assert not failures, "\n".join(f"{c}\n    {f}" for c, f in failures[:10])
    assert answered == 10
    for session in (rolled_session, plain_session):
        session.close()
    with_rollup.close()
    without.close()
