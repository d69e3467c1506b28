"""tailer.Cursor: each row is delivered exactly once, in pure Arrow bookkeeping.

A checking poll reads every row whose cursor is >= cursor.lower_bound (the
overlap before the watermark of the last check that succeeded). The tests
hand Cursor.accept() the tables such a poll would return; no database is
involved.
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


def poll(cursor: Cursor, table: pa.Table) -> pa.Table:
    """What Tail.poll does with a poll that checked the window: accept the
    rows, then record the check, up to the watermark it compared."""
    compared = cursor.watermark
    fresh = cursor.accept(table)
    cursor.checked(compared)
    return fresh


def keys(table: pa.Table) -> list[str]:
    return table.column(KEY).to_pylist()


def delivered_keys(cursor: Cursor) -> set[str]:
    return set(cursor.delivered.column(KEY).to_pylist())


def test_a_new_cursor_reads_everything():
    assert Cursor(OVERLAP_US).lower_bound is None


def test_first_accept_returns_all_rows_and_sets_the_watermark_to_the_newest():
    cursor = Cursor(OVERLAP_US)
    first = rows(("a", T0), ("b", T0 + 5), ("c", T0 + 2))
    fresh = poll(cursor, first)
    assert fresh.equals(first)
    assert cursor.watermark == T0 + 5


def test_lower_bound_is_the_overlap_before_the_last_good_check():
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("a", T0)))  # a first read of everything covers what it read
    assert cursor.lower_bound == T0 - OVERLAP_US
    # Polls between checks move the watermark, not the window's start: a row
    # that committed late since the check may be older than the new watermark
    # minus the overlap.
    cursor.accept(rows(("b", T0 + 2_000_000)))
    assert (cursor.watermark, cursor.lower_bound) == (T0 + 2_000_000, T0 - OVERLAP_US)
    assert delivered_keys(cursor) == {"a", "b"}
    cursor.checked(T0 + 2_000_000)
    assert cursor.lower_bound == T0 + 2_000_000 - OVERLAP_US


def test_a_check_forgets_only_the_keys_below_its_window():
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("a", T0), ("b", T0 + 1_000_000)))
    cursor.accept(rows(("c", T0 + 5_000_000)))
    assert delivered_keys(cursor) == {"a", "b", "c"}, "nothing is forgotten between checks"
    cursor.checked(T0 + 5_000_000)
    assert delivered_keys(cursor) == {"c"}


def test_re_reading_the_overlap_returns_nothing():
    cursor = Cursor(OVERLAP_US)
    first = rows(("a", T0), ("b", T0 + 1), ("c", T0 + 2))
    poll(cursor, first)
    again = poll(cursor, first)
    assert again.num_rows == 0
    assert cursor.watermark == T0 + 2


def test_a_re_read_with_new_rows_returns_only_the_new_ones():
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("a", T0), ("b", T0 + 1)))
    fresh = poll(cursor, rows(("a", T0), ("b", T0 + 1), ("c", T0 + 2)))
    assert keys(fresh) == ["c"]
    assert fresh.column("price").to_pylist() == [2.0]  # payload travels with its row
    assert cursor.watermark == T0 + 2


def test_a_late_commit_inside_the_overlap_is_delivered_exactly_once():
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("a", T0), ("b", T0 + 2_000_000)))
    # "late" was stamped before "b" but became visible only after "b" was read.
    late = ("late", T0 + 1_000_000)
    assert late[1] >= cursor.lower_bound

    first = poll(cursor, rows(("a", T0), late, ("b", T0 + 2_000_000)))
    second = poll(cursor, rows(("a", T0), late, ("b", T0 + 2_000_000)))

    assert keys(first) == ["late"]
    assert second.num_rows == 0


def test_the_watermark_never_moves_back_when_a_poll_returns_only_late_rows():
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("a", T0 + 2_000_000)))
    fresh = poll(cursor, rows(("late-1", T0 + 500_000), ("late-2", T0 + 1_000_000)))
    assert keys(fresh) == ["late-1", "late-2"]
    assert cursor.watermark == T0 + 2_000_000
    assert cursor.lower_bound == T0 + 2_000_000 - OVERLAP_US


def test_keys_older_than_the_lower_bound_are_forgotten():
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("old", T0), ("recent", T0 + 4_000_000)))
    poll(cursor, rows(("new", T0 + 5_000_000)))
    # The last check was at T0 + 4 s, so the lower bound is T0 + 1 s: "old"
    # can no longer come back from a poll.
    assert delivered_keys(cursor) == {"recent", "new"}


def test_a_key_exactly_at_the_lower_bound_is_still_remembered():
    # The poll reads cursor >= lower_bound, so that row can still come back.
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("edge", T0), ("top", T0 + OVERLAP_US)))
    assert cursor.lower_bound == T0
    assert delivered_keys(cursor) == {"edge", "top"}
    assert poll(cursor, rows(("edge", T0), ("top", T0 + OVERLAP_US))).num_rows == 0


def test_delivered_stays_bounded_over_many_polls():
    """1,000 polls of 10 new rows, 1 s apart, overlap 3 s: each row arrives
    once, and only the keys inside the overlap window are remembered."""
    step_us = 1_000_000
    cursor = Cursor(OVERLAP_US)
    table_cursors: list[int] = []
    table_keys: list[str] = []
    largest_memory = 0
    for n in range(1_000):
        for i in range(10):
            table_keys.append(f"{n}-{i}")
            table_cursors.append(T0 + n * step_us + i * 1_000)
        lower = cursor.lower_bound
        start = 0 if lower is None else bisect.bisect_left(table_cursors, lower)
        visible = rows(*zip(table_keys[start:], table_cursors[start:]))

        fresh = poll(cursor, visible)

        assert keys(fresh) == [f"{n}-{i}" for i in range(10)]
        largest_memory = max(largest_memory, cursor.delivered.num_rows)
    # The window holds the newest poll, the one the last check compared, and
    # the 3 s (3 polls) of overlap before that.
    assert largest_memory <= 50
    assert cursor.watermark == T0 + 999 * step_us + 9_000


def test_duplicate_keys_in_one_read_are_one_row_the_first():
    cursor = Cursor(OVERLAP_US)
    fresh = poll(cursor, rows(("a", T0), ("a", T0 + 1), ("b", T0 + 2)))
    assert keys(fresh) == ["a", "b"]
    assert fresh.column(CURSOR).to_pylist() == [T0, T0 + 2]
    assert fresh.column("price").to_pylist() == [0.0, 2.0]
    assert cursor.watermark == T0 + 2


def test_duplicate_keys_keep_the_order_of_first_appearance():
    cursor = Cursor(OVERLAP_US)
    fresh = poll(cursor, rows(("b", T0), ("a", T0 + 1), ("b", T0 + 2), ("c", T0 + 3), ("a", T0 + 4)))
    assert keys(fresh) == ["b", "a", "c"]
    assert fresh.column(CURSOR).to_pylist() == [T0, T0 + 1, T0 + 3]


def test_a_duplicated_key_is_remembered_once():
    cursor = Cursor(OVERLAP_US)
    poll(cursor, rows(("a", T0), ("a", T0 + 1), ("b", T0 + 2)))
    assert sorted(cursor.delivered.column(KEY).to_pylist()) == ["a", "b"]


@pytest.mark.parametrize("history", [[], [("a", T0), ("b", T0 + 1)]], ids=["fresh-cursor", "after-a-poll"])
def test_empty_input_returns_empty_and_leaves_state_unchanged(history):
    cursor = Cursor(OVERLAP_US)
    if history:
        poll(cursor, rows(*history))
    before = (cursor.watermark, cursor.lower_bound, cursor.delivered)

    fresh = poll(cursor, rows())

    assert fresh.num_rows == 0
    assert (cursor.watermark, cursor.lower_bound) == before[:2]
    assert cursor.delivered.equals(before[2])


def test_a_later_second_copy_of_a_delivered_row_stays_suppressed():
    """ClickHouse stored a row twice, the copy a second later (say a batch
    resent past the deduplication window): the viewer still sees it once,
    also after the first copy has left the overlap window."""
    cursor = Cursor(OVERLAP_US)
    assert keys(poll(cursor, rows(("a", T0), ("b", T0)))) == ["a", "b"]
    copy = ("a", T0 + 1_000_000)
    assert keys(poll(cursor, rows(("a", T0), ("b", T0), copy))) == []
    # New rows move the watermark, and the check after them the window, so
    # far that the first copy is out of it (T0 < T0 + 4 s - 3 s), but the
    # second one is still read.
    later = ("c", T0 + 4_000_000)
    assert keys(poll(cursor, rows(copy, later))) == ["c"]
    assert keys(poll(cursor, rows(copy, later))) == []
    assert cursor.lower_bound == T0 + 1_000_000
    assert keys(poll(cursor, rows(copy, later))) == []
