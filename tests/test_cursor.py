"""tailer.Cursor: each row is delivered exactly once, in pure Arrow bookkeeping.

A poll reads every row whose cursor is >= cursor.lower_bound (the watermark
minus the overlap). The tests hand Cursor.accept() the tables such a poll
would return; no database is involved.
"""

import bisect

import pyarrow as pa
import pytest

from tailer import CURSOR, KEY, Cursor

OVERLAP_US = 3_000_000  # 3 s, the server's default --overlap
T0 = 1_700_000_000_000_000  # microseconds since the epoch


def rows(*pairs: tuple[str, int]) -> pa.Table:
    """A poll result: (key, cursor) pairs plus a payload column."""
    keys = [key for key, _ in pairs]
    return pa.table({
        KEY: pa.array(keys, pa.string()),
        CURSOR: pa.array([cursor for _, cursor in pairs], pa.int64()),
        "price": pa.array([float(i) for i in range(len(pairs))], pa.float64()),
    })


def keys(table: pa.Table) -> list[str]:
    return table.column(KEY).to_pylist()


def delivered_keys(cursor: Cursor) -> set[str]:
    return set(cursor.delivered.column(KEY).to_pylist())


def test_a_new_cursor_reads_everything():
    assert Cursor(OVERLAP_US).lower_bound is None


def test_first_accept_returns_all_rows_and_sets_the_watermark_to_the_newest():
    cursor = Cursor(OVERLAP_US)
    first = rows(("a", T0), ("b", T0 + 5), ("c", T0 + 2))
    fresh = cursor.accept(first)
    assert fresh.equals(first)
    assert cursor.watermark == T0 + 5


def test_lower_bound_is_the_watermark_minus_the_overlap():
    cursor = Cursor(OVERLAP_US)
    cursor.accept(rows(("a", T0)))
    assert cursor.lower_bound == T0 - OVERLAP_US


def test_re_reading_the_overlap_returns_nothing():
    cursor = Cursor(OVERLAP_US)
    first = rows(("a", T0), ("b", T0 + 1), ("c", T0 + 2))
    cursor.accept(first)
    again = cursor.accept(first)
    assert again.num_rows == 0
    assert cursor.watermark == T0 + 2


def test_a_re_read_with_new_rows_returns_only_the_new_ones():
    cursor = Cursor(OVERLAP_US)
    cursor.accept(rows(("a", T0), ("b", T0 + 1)))
    fresh = cursor.accept(rows(("a", T0), ("b", T0 + 1), ("c", T0 + 2)))
    assert keys(fresh) == ["c"]
    assert fresh.column("price").to_pylist() == [2.0]  # payload travels with its row
    assert cursor.watermark == T0 + 2


def test_a_late_commit_inside_the_overlap_is_delivered_exactly_once():
    cursor = Cursor(OVERLAP_US)
    cursor.accept(rows(("a", T0), ("b", T0 + 2_000_000)))
    # "late" was stamped before "b" but became visible only after "b" was read.
    late = ("late", T0 + 1_000_000)
    assert late[1] >= cursor.lower_bound

    first = cursor.accept(rows(("a", T0), late, ("b", T0 + 2_000_000)))
    second = cursor.accept(rows(("a", T0), late, ("b", T0 + 2_000_000)))

    assert keys(first) == ["late"]
    assert second.num_rows == 0


def test_the_watermark_never_moves_back_when_a_poll_returns_only_late_rows():
    cursor = Cursor(OVERLAP_US)
    cursor.accept(rows(("a", T0 + 2_000_000)))
    fresh = cursor.accept(rows(("late-1", T0 + 500_000), ("late-2", T0 + 1_000_000)))
    assert keys(fresh) == ["late-1", "late-2"]
    assert cursor.watermark == T0 + 2_000_000
    assert cursor.lower_bound == T0 + 2_000_000 - OVERLAP_US


def test_keys_older_than_the_lower_bound_are_forgotten():
    cursor = Cursor(OVERLAP_US)
    cursor.accept(rows(("old", T0), ("recent", T0 + 4_000_000)))
    cursor.accept(rows(("new", T0 + 5_000_000)))
    # lower bound is now T0 + 2 s: "old" can no longer come back from a poll.
    assert delivered_keys(cursor) == {"recent", "new"}


def test_a_key_exactly_at_the_lower_bound_is_still_remembered():
    # The poll reads cursor >= lower_bound, so that row can still come back.
    cursor = Cursor(OVERLAP_US)
    cursor.accept(rows(("edge", T0), ("top", T0 + OVERLAP_US)))
    assert cursor.lower_bound == T0
    assert delivered_keys(cursor) == {"edge", "top"}
    assert cursor.accept(rows(("edge", T0), ("top", T0 + OVERLAP_US))).num_rows == 0


def test_delivered_stays_bounded_over_many_polls():
    """1,000 polls of 10 new rows, 1 s apart, overlap 3 s: each row arrives
    once, and only the keys inside the overlap window are remembered."""
    step_us = 1_000_000
    cursor = Cursor(OVERLAP_US)
    table_cursors: list[int] = []
    table_keys: list[str] = []
    largest_memory = 0
    for poll in range(1_000):
        for i in range(10):
            table_keys.append(f"{poll}-{i}")
            table_cursors.append(T0 + poll * step_us + i * 1_000)
        lower = cursor.lower_bound
        start = 0 if lower is None else bisect.bisect_left(table_cursors, lower)
        visible = rows(*zip(table_keys[start:], table_cursors[start:]))

        fresh = cursor.accept(visible)

        assert keys(fresh) == [f"{poll}-{i}" for i in range(10)]
        largest_memory = max(largest_memory, cursor.delivered.num_rows)
    # The window holds the newest poll and the ~3 polls of overlap before it.
    assert largest_memory <= 40
    assert cursor.watermark == T0 + 999 * step_us + 9_000


def test_duplicate_keys_in_one_read_are_one_row_the_first():
    cursor = Cursor(OVERLAP_US)
    fresh = cursor.accept(rows(("a", T0), ("a", T0 + 1), ("b", T0 + 2)))
    assert keys(fresh) == ["a", "b"]
    assert fresh.column(CURSOR).to_pylist() == [T0, T0 + 2]
    assert fresh.column("price").to_pylist() == [0.0, 2.0]
    assert cursor.watermark == T0 + 2


def test_duplicate_keys_keep_the_order_of_first_appearance():
    cursor = Cursor(OVERLAP_US)
    fresh = cursor.accept(rows(("b", T0), ("a", T0 + 1), ("b", T0 + 2), ("c", T0 + 3), ("a", T0 + 4)))
    assert keys(fresh) == ["b", "a", "c"]
    assert fresh.column(CURSOR).to_pylist() == [T0, T0 + 1, T0 + 3]


def test_a_duplicated_key_is_remembered_once():
    cursor = Cursor(OVERLAP_US)
    cursor.accept(rows(("a", T0), ("a", T0 + 1), ("b", T0 + 2)))
    assert sorted(cursor.delivered.column(KEY).to_pylist()) == ["a", "b"]


@pytest.mark.parametrize("history", [[], [("a", T0), ("b", T0 + 1)]], ids=["fresh-cursor", "after-a-poll"])
def test_empty_input_returns_empty_and_leaves_state_unchanged(history):
    cursor = Cursor(OVERLAP_US)
    if history:
        cursor.accept(rows(*history))
    before = (cursor.watermark, cursor.lower_bound, cursor.delivered)

    fresh = cursor.accept(rows())

    assert fresh.num_rows == 0
    assert (cursor.watermark, cursor.lower_bound) == before[:2]
    assert cursor.delivered.equals(before[2])


def test_a_later_second_copy_of_a_delivered_row_stays_suppressed():
    """ClickHouse stored a row twice, the copy a second later (say a batch
    resent past the deduplication window): the viewer still sees it once,
    also after the first copy has left the overlap window."""
    cursor = Cursor(OVERLAP_US)
    assert keys(cursor.accept(rows(("a", T0), ("b", T0)))) == ["a", "b"]
    copy = ("a", T0 + 1_000_000)
    assert keys(cursor.accept(rows(("a", T0), ("b", T0), copy))) == []
    # New rows move the watermark so far that the first copy is out of the
    # window (T0 < T0 + 4 s - 3 s), but the second one is still read.
    later = ("c", T0 + 4_000_000)
    assert keys(cursor.accept(rows(copy, later))) == ["c"]
    assert keys(cursor.accept(rows(copy, later))) == []
