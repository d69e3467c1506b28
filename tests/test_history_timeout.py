"""--history-timeout reaches ClickHouse: a history query that would run far
longer is stopped there, the viewer gets one line saying why, and the same
session goes on answering.

The slow table is a view over 20 million numbers(): a filtered read of it
takes about 20 ms; a group-by over every number runs about 10 s before it
reaches the 2 GiB memory limit, so a 1 s timeout stops it long before.
History runs in process on chDB, read through a real perspective.Client
over Perspective's protocol.
"""

from __future__ import annotations

import concurrent.futures

import perspective
import pytest

import history

TIMEOUT_S = 1.0


@pytest.fixture
def slow_history(new_client):
    admin = new_client()
    admin.command(
        "CREATE VIEW endless AS SELECT number, number % 1000 AS bucket, "
        "toDateTime64('2026-01-01 00:00:00', 6, 'UTC') + toIntervalMicrosecond(number) AS inserted_at "
        "FROM numbers(20000000)")
    source = history.History(new_client, "endless", "inserted_at", limits=history.Limits(timeout=TIMEOUT_S))
    session = source.new_session(callback=None)
    client = None
    client = perspective.Client(lambda request: client.handle_response(session._answer(request)))
    yield client.open_table("endless")
    session.close()
    source.close()


def within(seconds: float, call, *args, **kwargs):
    """Runs `call`; fails the test (rather than hanging) if it is not back in `seconds`."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(call, *args, **kwargs)
        try:
            return future.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"still running after {seconds} s: the timeout never reached ClickHouse")


def test_a_query_past_the_history_timeout_is_stopped_and_the_session_keeps_answering(slow_history):
    pivot = slow_history.view(columns=["number"], group_by=["number"], aggregates={"number": "distinct count"},
                              sort=[["number", "desc"]])
    with pytest.raises(perspective.PerspectiveError) as refused:
        within(20, pivot.to_columns, start_row=0, end_row=10)
    error = str(refused.value)
    assert "TIMEOUT_EXCEEDED" in error or "Timeout exceeded" in error, error
    assert "\n" not in error.strip() and "SELECT" not in error, f"one line, ClickHouse's reason: {error!r}"
    # The same viewer, a cheap request (ClickHouse reads only the first
    # numbers): answered.
    cheap = slow_history.view(columns=["number", "bucket"], filter=[["number", "<", 5]])
    assert within(60, cheap.to_columns)["number"] == [0, 1, 2, 3, 4]
