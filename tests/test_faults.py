"""Faults on the real three-process topology: no row lost, none duplicated.

ClickHouse (the chDB test harness, tests/chdb_http.py), `python producer.py`
and `python perspective_server.py` run as separate OS processes, as in
tests/test_topology.py. Then things break:

* ClickHouse is SIGKILLed and restarted on the same port and data folder,
  five times, while both programs keep running. The producer must keep and
  retry its batches (its insert_deduplication_token stops a retried batch
  from being stored twice) and the server must resume from its watermark:
  no row skipped, none delivered twice. (This one test also covers "the
  server resumes from its watermark after ClickHouse restarts".)
* The producer is SIGKILLed mid-run. Whatever ClickHouse holds, the
  server's Perspective table must hold exactly the same rows.

Each test compares key sets exactly: the `id`s ClickHouse stores against
the `id`s in the Perspective table, read through the server's websocket as
a browser would. Run with `pytest -s` to see the counts.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest

import chdb_http
import producer
from servers import STARTUP_TIMEOUT_S, Program, follow_feed, free_port

BATCH_SIZE = 20
PRODUCER_ARGS = ["--interval", "0.1", "--batch-size", str(BATCH_SIZE)]
LIMIT = 1_000_000  # every row fits in the Perspective table
RESTARTS = 5
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


def assert_equal_key_sets(clickhouse_ids: list[str], perspective_ids: list[str], logs: str) -> None:
    duplicated = {key: n for key, n in Counter(perspective_ids).items() if n > 1}
    assert not duplicated, (f"{len(duplicated)} id(s) twice or more in Perspective, e.g. "
                            f"{list(duplicated.items())[:5]}:\n{logs}")
    stored, shown = set(clickhouse_ids), set(perspective_ids)
    missing, extra = stored - shown, shown - stored
    assert not missing and not extra, (
        f"{len(missing)} row(s) in ClickHouse never reached Perspective (e.g. {sorted(missing)[:5]}), "
        f"{len(extra)} row(s) in Perspective not in ClickHouse (e.g. {sorted(extra)[:5]}):\n{logs}")


def assert_clean_log(program: Program) -> None:
    text = program.text()
    assert "Traceback" not in text, program.log()
    assert "rows not written" not in text, program.log()


def test_clickhouse_restarts_lose_and_duplicate_nothing(topology):
    """Also the watermark test: after each restart the server neither
    re-delivers (no duplicate in Perspective) nor skips (no missing id)."""
    started = time.monotonic()
    topology.wait_for_rows(5 * BATCH_SIZE)
    for restart in range(RESTARTS):
        time.sleep(1.0 + 0.25 * restart)  # 1 to 2 s of ClickHouse up between crashes
        topology.assert_running()
        topology.harness.kill()
        time.sleep(0.5)  # both programs hit a closed port meanwhile
        topology.harness.restart()
    # Let both programs come back and write/read through the last restart.
    before = topology.clickhouse()[1]
    topology.wait_for_rows(before + 5 * BATCH_SIZE)
    topology.assert_running()

    assert topology.producer.interrupt(EXIT_TIMEOUT_S) == 0, topology.logs()
    clickhouse_ids, count, unique = topology.clickhouse()
    perspective_ids, took = topology.caught_up(count)
    faults_s = time.monotonic() - started

    producer_log, server_log = topology.producer.text(), topology.server.text()
    stopped = re.search(r"stopped after inserting ([\d,]+) rows", producer_log)
    inserted = int(stopped.group(1).replace(",", "")) if stopped else None
    failures = [line for line in producer_log.splitlines() if "insert failed" in line]
    # Refused: the batch never left. Anything else (the connection dropped
    # mid-request) is ambiguous: it may be stored, and its retry must not be.
    ambiguous = [line for line in failures if "Connection refused" not in line]
    print(f"\n[restarts] ClickHouse restarts: {RESTARTS}; rows in ClickHouse: {count} "
          f"({count // BATCH_SIZE} batches of {BATCH_SIZE}, {unique} distinct ids); "
          f"producer says it inserted: {inserted}; rows in Perspective: {len(perspective_ids)} "
          f"({len(set(perspective_ids))} distinct); "
          f"producer 'insert failed': {len(failures)} ({len(ambiguous)} cut off mid-request), "
          f"'ClickHouse is back': {producer_log.count('ClickHouse is back')}; "
          f"server 'poll failed': {server_log.count('poll failed')}, "
          f"'ClickHouse is back': {server_log.count('ClickHouse is back')}; "
          f"catch-up {took:.1f} s; faults phase {faults_s:.1f} s")

    # ClickHouse: every batch stored once, whole.
    assert count == unique, f"{count - unique} duplicate row(s) in ClickHouse:\n{topology.logs()}"
    assert count % BATCH_SIZE == 0, f"{count} rows is not whole batches of {BATCH_SIZE}:\n{topology.logs()}"
    assert inserted == count, (f"the producer counted {inserted} rows inserted, ClickHouse holds "
                               f"{count}:\n{topology.logs()}")
    # The server: every stored row once, across every restart.
    assert_equal_key_sets(clickhouse_ids, perspective_ids, topology.logs())
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
