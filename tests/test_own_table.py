"""The README's recipe for a user's own table, run as written on a table
that already has 200,000 rows, its own ORDER BY and its own key column.

What must hold (README, "Use it with your own table"):

* the server finds nothing to warn about once the recipe is applied, and
  names each missing step when it is not;
* the backfill respects --limit, and the rows it left out never arrive;
* every update Perspective gets is watched, from the backfill on: new rows
  arrive exactly once, and no poll returns the old rows again;
* a poll reads a bounded number of rows although the cursor cannot lead
  the table's ORDER BY.
"""

from __future__ import annotations

import re
import time
from pathlib import Path


from perspective_server import Sync
from tailer import Tail
from test_pipeline import perspective_table

README = Path(__file__).resolve().parent.parent / "README.md"
OLD_ROWS = 200_000
LIMIT = 1_000
OVERLAP_S = 1.0


def recipe_statements() -> list[str]:
    """The SQL block under the README's own-table marker, split into statements."""
    text = README.read_text()
    block = re.search(r"<!-- own-table-recipe -->\s*```sql\n(.*?)```", text, re.S)
    assert block, "README.md lost its own-table recipe block"
    return [statement.strip() for statement in block.group(1).split(";") if statement.strip()]


def create_trades(client) -> None:
    """A table as a user might have it: sorted by its own columns, no cursor."""
    client.command("""
        CREATE TABLE trades (
            trade_id UInt64,
            ts       DateTime64(3, 'UTC'),
            symbol   LowCardinality(String),
            price    Float64,
            quantity UInt32
        ) ENGINE = MergeTree ORDER BY (symbol, ts)""")
    # Several inserts, so the table has several parts, as a real one would.
    for start in range(0, OLD_ROWS, 50_000):
        client.command(f"""
            INSERT INTO trades SELECT number, now64(3) - number / 1000, ['AAPL', 'MSFT', 'NVDA'][number % 3 + 1],
                   100 + number % 97, number % 500 FROM numbers({start}, 50000)""")


def insert_new_trades(client, first_id: int, count: int) -> None:
    client.command(f"""
        INSERT INTO trades (trade_id, ts, symbol, price, quantity)
        SELECT {first_id} + number, now64(3), 'AAPL', 200, 1 FROM numbers({count})""")


class WatchedSync(Sync):
    """A Sync that keeps the key of every row of every update it sends."""

    def __init__(self, tail, table):
        super().__init__(tail, table)
        self.updates: list[list[int]] = []

    def push(self, rows):
        if rows.num_rows:
            self.updates.append(rows.column("trade_id").to_pylist())
        return super().push(rows)


def test_the_server_names_each_missing_step_of_the_recipe(new_client):
    client = new_client()
    create_trades(client)
    add_column, materialize_column, add_index, materialize_index = recipe_statements()
    client.command(add_column)
    tail = Tail(client, "trades", "inserted_at", "trade_id", OVERLAP_S)
    tail.describe()
    warnings = tail.layout_warnings()
    assert len(warnings) == 2
    assert "MATERIALIZE COLUMN inserted_at" in warnings[0]
    assert "ADD INDEX" in warnings[1]

    client.command(materialize_column)
    assert [w for w in tail.layout_warnings() if "MATERIALIZE COLUMN" in w] == []
    client.command(add_index)
    client.command(materialize_index)
    assert tail.layout_warnings() == []


def test_the_recipe_on_a_table_with_rows_hands_over_exactly_once(new_client):
    client = new_client()
    create_trades(client)
    for statement in recipe_statements():
        client.command(statement)
    # MATERIALIZE stamps each old part with one value: far more rows share a
    # cursor value, and the overlap window, than --limit.
    shared = client.query("SELECT max(c) FROM (SELECT count() AS c FROM trades GROUP BY inserted_at)")
    assert shared.result_rows[0][0] > LIMIT

    tail = Tail(client, "trades", "inserted_at", "trade_id", OVERLAP_S)
    tail.describe()
    assert tail.layout_warnings() == []
    sync = WatchedSync(tail, perspective_table(tail, limit=LIMIT))

    assert sync.backfill(LIMIT) == LIMIT
    backfilled = {key for update in sync.updates for key in update}
    assert len(backfilled) == LIMIT and max(backfilled) < OLD_ROWS

    for _ in range(3):
        assert sync.poll() == 0, "a poll delivered old rows the backfill left out"
    assert tail.rows_returned == 0, "a poll returned old rows from ClickHouse"

    # New trades arrive once the old stamp is older than the overlap. The
    # check after them still compares the window that starts `overlap`
    # before the last good check (the old stamp), once; from then on a poll
    # must not scan the table: the minmax index lets it skip every old granule.
    time.sleep(OVERLAP_S + 0.5)
    insert_new_trades(client, 1_000_000, 500)
    assert sync.poll() == 500
    insert_new_trades(client, 2_000_000, 300)
    assert sync.poll() == 300
    insert_new_trades(client, 3_000_000, 200)
    client.set_client_setting("max_rows_to_read", 20_000)
    assert sync.poll() == 200
    assert sync.poll() == 0

    delivered = [key for update in sync.updates for key in update]
    assert len(delivered) == len(set(delivered)), "a row was delivered twice"
    assert len(delivered) == LIMIT + 500 + 300 + 200
    assert sync.table.size() == LIMIT  # the rolling --limit keeps the newest
