"""Faults on the real three-process topology: no row lost, none duplicated.

ClickHouse (the chDB test harness, tests/chdb_http.py), `python producer.py`
and `python perspective_server.py` run as separate OS processes, as in
tests/test_topology.py. Then things break:

* ClickHouse is SIGKILLed and restarted on the same port and data folder,
  five times, while both programs keep running. The producer must keep and
  retry its batches (its insert_deduplication_token stops a retried batch
  from being stored twice) and the server must resume from its watermark:
  no row skipped, none delivered twice. (This one test also covers "the
  server resumes from its watermark after ClickHouse restarts".) Beside
  the producer, a third writer commits rows late: stamped 2 to 2.7 s in
  the past, inside the server's 3 s overlap, and each kill lands a moment
  after one of its commits, before the server's once-a-second window check
  has necessarily seen it.
* The producer is SIGKILLed mid-run. Whatever ClickHouse holds, the
  server's Perspective table must hold exactly the same rows.

Each test compares key sets exactly: the `id`s ClickHouse stores against
the `id`s in the Perspective table, read through the server's websocket as
a browser would. Run with `pytest -s` to see the counts.
"""

from __future__ import annotations

import asyncio
import re
import threading
import signal
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

import chdb_http
import producer
from servers import STARTUP_TIMEOUT_S, Program, follow_feed, free_port

BATCH_SIZE = 20
PRODUCER_ARGS = ["--interval", "0.1", "--batch-size", str(BATCH_SIZE)]
LIMIT = 1_000_000  # every row fits in the Perspective table
RESTARTS = 5
OVERLAP_S = 3.0  # the server's default --overlap
CATCH_UP_S = 20  # generous: the server polls every 0.25 s
EXIT_TIMEOUT_S = 15  # SIGINT to exit; the producer may still be flushing


@dataclass
class Topology:
    harness: chdb_http.Harness
    database: str
    port: int
    producer: Program
    server: Program

    def logs(self) -> str:
        return "\n".join([self.producer.log(), self.server.log(),
                          f"--- chdb_http.py (exit {self.harness.proc.poll()}):\n{self.harness.log()}"])

    def clickhouse(self) -> tuple[list[str], int, int]:
        """(ids, count(), uniqExact(id)) of the test table, read from ClickHouse."""
        client = self.harness.client(autogenerate_session_id=False)
        try:
            table = f"`{self.database}`.stock_values"
            ids = [row[0] for row in client.query(f"SELECT toString(id) FROM {table}").result_rows]
            count, unique = client.query(f"SELECT count(), uniqExact(id) FROM {table}").result_rows[0]
            return ids, int(count), int(unique)
        finally:
            client.close()

    def perspective_ids(self) -> list[str]:
        """The `id` column of the server's Perspective table, as a page's copy of it receives it."""
        async def read() -> list[str]:
            replica, follower = await follow_feed(self.port, patience=10)
            try:
                view = replica.table.view(columns=["id"])
                ids = view.to_columns().get("id", [])
                view.delete()
                return ids
            finally:
                replica.close()
                follower.cancel()

        async def read_with_timeout() -> list[str]:
            return await asyncio.wait_for(read(), timeout=15)

        return asyncio.run(read_with_timeout())

    def wait_for_rows(self, at_least: int, timeout: float = 30) -> int:
        """Waits until ClickHouse holds `at_least` rows; returns the count."""
        deadline = time.monotonic() + timeout
        count = 0
        while time.monotonic() < deadline:
            self.assert_running()
            count = self.clickhouse()[1]
            if count >= at_least:
                return count
            time.sleep(0.2)
        pytest.fail(f"ClickHouse held {count} rows after {timeout} s, wanted {at_least}:\n{self.logs()}")

    def caught_up(self, expected: int) -> tuple[list[str], float]:
        """Polls the server's table until it holds `expected` rows (up to
        CATCH_UP_S); returns its ids and the seconds it took."""
        started = time.monotonic()
        deadline = started + CATCH_UP_S
        ids: list[str] = []
        while time.monotonic() < deadline:
            assert self.server.proc.poll() is None, f"the server died:\n{self.logs()}"
            ids = self.perspective_ids()
            if len(ids) == expected:
                # Stay a moment to see that nothing more (a duplicate) arrives.
                time.sleep(1.0)
                ids = self.perspective_ids()
                break
            time.sleep(0.25)
        return ids, time.monotonic() - started

    def assert_running(self) -> None:
        for program in (self.producer, self.server):
            assert program.proc.poll() is None, f"{program.script} exited early:\n{self.logs()}"


@dataclass
class LateWriter:
    """Inserts 20 rows every 0.3 s whose `inserted_at` is set 2 to 2.7 s in
    the past: commits that arrive late, as a slow async insert or a big
    insert committing in pieces would, but inside the server's overlap.

    Each attempt is recorded with the moment its call returned (or failed):
    a row is visible no later than that, so a row whose call returned within
    OVERLAP_S of its stamp is one the server promises to deliver. A failed
    call may still have committed (the connection cut after the commit);
    ClickHouse's own contents decide which rows exist.
    """

    harness: chdb_http.Harness
    database: str
    committed: threading.Event = field(default_factory=threading.Event)
    late_by_s: dict[str, float] = field(default_factory=dict)  # id -> call end minus stamp
    commits: int = 0
    failures: int = 0

    def run(self, stop: threading.Event) -> None:
        market = producer.Market(seed=99)
        client = None
        while not stop.wait(0.3):
            stamp_s = time.time() - 2.0 - 0.7 * (self.commits % 8) / 7
            rows = market.batch(20, int(stamp_s * 1000))
            stamped = rows.append_column("inserted_at", pa.array([int(stamp_s * 1_000_000)] * rows.num_rows,
                                                                  pa.timestamp("us", tz="UTC")))
            try:
                client = client or self.harness.client(autogenerate_session_id=False, database=self.database)
                client.insert_arrow("stock_values", stamped)
                self.commits += 1
                self.committed.set()
            except Exception:  # ClickHouse is down: this batch may or may not be stored
                self.failures += 1
                client = None
            ended = time.time() - stamp_s
            self.late_by_s.update((key, ended) for key in rows.column("id").to_pylist())

    def wait_for_a_commit(self, timeout: float = 10) -> None:
        self.committed.clear()
        assert self.committed.wait(timeout), "the late writer committed nothing"

    def excused(self) -> set[str]:
        """Ids whose call ended more than OVERLAP_S after their stamp: outside the promise."""
        return {key for key, late_s in self.late_by_s.items() if late_s > OVERLAP_S}


def wait_until_serving(topology: Topology) -> None:
    """The page answers and the server has backfilled (so the table exists)."""
    url = f"http://127.0.0.1:{topology.port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        topology.assert_running()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200 and "backfilled" in topology.server.text():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"perspective_server.py never started tailing:\n{topology.logs()}")


@pytest.fixture
def topology(tmp_path):
    with chdb_http.running(tmp_path / "chdb-data") as harness:
        database = f"faults_{uuid.uuid4().hex[:12]}"
        env = {**harness.env(), "CLICKHOUSE_DB": database}
        port = free_port()
        producer = Program("producer.py", PRODUCER_ARGS, env, tmp_path / "producer.log")
        server = Program("perspective_server.py", ["--port", str(port), "--limit", str(LIMIT), "--show-key"], env,
                         tmp_path / "server.log")
        topology = Topology(harness, database, port, producer, server)
        try:
            wait_until_serving(topology)
            yield topology
        finally:
            producer.kill()
            server.kill()


def assert_equal_key_sets(clickhouse_ids: list[str], perspective_ids: list[str], logs: str,
                          excused: set[str] = frozenset()) -> None:
    """Every stored row shown once; `excused` rows (outside the promise) may be missing, never twice."""
    duplicated = {key: n for key, n in Counter(perspective_ids).items() if n > 1}
    assert not duplicated, (f"{len(duplicated)} id(s) twice or more in Perspective, e.g. "
                            f"{list(duplicated.items())[:5]}:\n{logs}")
    stored, shown = set(clickhouse_ids), set(perspective_ids)
    missing, extra = stored - shown - excused, shown - stored
    assert not missing and not extra, (
        f"{len(missing)} row(s) in ClickHouse never reached Perspective (e.g. {sorted(missing)[:5]}), "
        f"{len(extra)} row(s) in Perspective not in ClickHouse (e.g. {sorted(extra)[:5]}):\n{logs}")


def assert_clean_log(program: Program) -> None:
    text = program.text()
    assert "Traceback" not in text, program.log()
    assert "rows not written" not in text, program.log()


def test_clickhouse_restarts_lose_and_duplicate_nothing(topology):
    """Also the watermark test: after each restart the server neither
    re-delivers (no duplicate in Perspective) nor skips (no missing id),
    late commits made just before a kill included."""
    started = time.monotonic()
    late = LateWriter(topology.harness, topology.database)
    stop_late = threading.Event()
    late_thread = threading.Thread(target=late.run, args=(stop_late,), daemon=True)
    late_thread.start()
    topology.wait_for_rows(5 * BATCH_SIZE)
    for restart in range(RESTARTS):
        time.sleep(1.0 + 0.25 * restart)  # 1 to 2 s of ClickHouse up between crashes
        late.wait_for_a_commit()
        time.sleep(0.1 * restart)  # 0 to 0.4 s after a late commit
        topology.assert_running()
        topology.harness.kill()
        if restart % 2:
            time.sleep(0.5)  # a longer outage: both programs hit a closed port meanwhile
        topology.harness.restart()
    # Let all three writers come back and write/read through the last
    # restart. The late writer stops first: the rows counted next are the
    # producer's alone, so they show it came back (its retries back off to
    # 10 s, which the late writer's rows alone could hide).
    late.wait_for_a_commit()
    stop_late.set()
    late_thread.join()
    before = topology.clickhouse()[1]
    topology.wait_for_rows(before + 5 * BATCH_SIZE)
    topology.assert_running()

    assert topology.producer.interrupt(EXIT_TIMEOUT_S) == 0, topology.logs()
    clickhouse_ids, count, unique = topology.clickhouse()
    perspective_ids, took = topology.caught_up(count)
    faults_s = time.monotonic() - started
    late_ids = set(late.late_by_s)
    from_producer = [key for key in clickhouse_ids if key not in late_ids]

    producer_log, server_log = topology.producer.text(), topology.server.text()
    stopped = re.search(r"stopped after inserting ([\d,]+) rows", producer_log)
    inserted = int(stopped.group(1).replace(",", "")) if stopped else None
    failures = [line for line in producer_log.splitlines() if "insert failed" in line]
    # Refused: the batch never left. Anything else (the connection dropped
    # mid-request) is ambiguous: it may be stored, and its retry must not be.
    ambiguous = [line for line in failures if "Connection refused" not in line]
    print(f"\n[restarts] ClickHouse restarts: {RESTARTS}; rows in ClickHouse: {count} "
          f"({len(from_producer) // BATCH_SIZE} batches of {BATCH_SIZE} from the producer, {unique} distinct "
          f"ids); producer says it inserted: {inserted}; rows in Perspective: {len(perspective_ids)} "
          f"({len(set(perspective_ids))} distinct); "
          f"producer 'insert failed': {len(failures)} ({len(ambiguous)} cut off mid-request), "
          f"'ClickHouse is back': {producer_log.count('ClickHouse is back')}; "
          f"server 'poll failed': {server_log.count('poll failed')}, "
          f"'ClickHouse is back': {server_log.count('ClickHouse is back')}; "
          f"catch-up {took:.1f} s; faults phase {faults_s:.1f} s; late writer: {late.commits} commits, "
          f"{late.failures} failed, {len(late.excused() & set(clickhouse_ids))} stored row(s) acknowledged "
          f"later than the overlap")

    # ClickHouse: every producer batch stored once, whole.
    assert count == unique, f"{count - unique} duplicate row(s) in ClickHouse:\n{topology.logs()}"
    assert len(from_producer) % BATCH_SIZE == 0, (
        f"{len(from_producer)} producer rows is not whole batches of {BATCH_SIZE}:\n{topology.logs()}")
    assert inserted == len(from_producer), (f"the producer counted {inserted} rows inserted, ClickHouse "
                                            f"holds {len(from_producer)}:\n{topology.logs()}")
    assert late.commits >= RESTARTS and late_ids & set(clickhouse_ids), "the late writer must have written"
    # The server: every stored row once, across every restart, late ones too.
    assert_equal_key_sets(clickhouse_ids, perspective_ids, topology.logs(), excused=late.excused())
    assert server_log.count("backfilled") == 1, topology.logs()  # resumed, never started over

    # Both programs noticed every kind of outage and recovered.
    assert "insert failed" in producer_log and "retrying" in producer_log, topology.logs()
    assert "ClickHouse is back" in producer_log, topology.logs()
    outages = [("failed" if "poll failed" in line else "back") for line in server_log.splitlines()
               if "poll failed" in line or "ClickHouse is back" in line]
    assert outages and outages == ["failed", "back"] * (len(outages) // 2), (
        f"the server's log should show 'poll failed' then 'ClickHouse is back' per outage, "
        f"got {outages}:\n{topology.logs()}")
    assert_clean_log(topology.producer)
    assert_clean_log(topology.server)
    assert topology.server.interrupt(EXIT_TIMEOUT_S) == 0, topology.logs()


def test_a_killed_producer_leaves_downstream_equal_to_clickhouse(topology):
    started = time.monotonic()
    topology.wait_for_rows(10 * BATCH_SIZE)
    time.sleep(1.0)  # mid-run: inserts every 0.1 s, so one is likely in flight
    topology.producer.kill()
    assert topology.producer.proc.returncode == -signal.SIGKILL

    clickhouse_ids, count, unique = topology.clickhouse()
    perspective_ids, took = topology.caught_up(count)
    print(f"\n[killed producer] rows in ClickHouse: {count} ({count // BATCH_SIZE} batches of "
          f"{BATCH_SIZE}, {unique} distinct ids); rows in Perspective: {len(perspective_ids)} "
          f"({len(set(perspective_ids))} distinct); catch-up {took:.1f} s; "
          f"test {time.monotonic() - started:.1f} s")

    assert count == unique, f"{count - unique} duplicate row(s) in ClickHouse:\n{topology.logs()}"
    assert count % BATCH_SIZE == 0, f"{count} rows is not whole batches of {BATCH_SIZE}:\n{topology.logs()}"
    assert_equal_key_sets(clickhouse_ids, perspective_ids, topology.logs())
    assert_clean_log(topology.server)
    assert topology.server.interrupt(EXIT_TIMEOUT_S) == 0, topology.logs()


def test_a_batch_stored_just_before_a_crash_is_stored_once_when_retried(tmp_path):
    """The ambiguous case, made certain: the insert committed, ClickHouse was
    SIGKILLed before the producer could count it, and the producer resends the
    same batch (same token) to the restarted ClickHouse. The test above meets
    this only when a kill happens to cut an insert off after its commit."""
    with chdb_http.running(tmp_path / "chdb-data") as harness:
        database = f"faults_{uuid.uuid4().hex[:12]}"
        client = harness.client(autogenerate_session_id=False)
        client.command(f"CREATE DATABASE `{database}`")
        client.database = database
        worker = producer.Producer(client, producer.ProducerSettings(batch_size=BATCH_SIZE))
        producer.create_table(client)
        worker.make_batch()
        batch = worker.pending[0]
        worker.flush()
        harness.kill()
        harness.restart()
        worker.pending.append(batch)  # the retry of a reply that never came
        worker.make_batch()
        worker.flush()
        count, unique = client.query("SELECT count(), uniqExact(id) FROM stock_values").result_rows[0]
        client.close()
    print(f"\n[retry after crash] batches sent: 3 (one a retry), rows in ClickHouse: {count}")
    assert (count, unique) == (2 * BATCH_SIZE, 2 * BATCH_SIZE), harness.log()
