"""The benchmarks keep working: a tiny run of each, on the real engine.

These check that the bench scripts run and report every path, not how fast
anything is: timings on a shared CI machine say nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sync_throughput_benchmark_runs_all_four_paths():
    result = subprocess.run(
        [sys.executable, "bench/sync_throughput.py", "--rows", "5000", "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for path in ("a. paged Tail -> update (this)", "b. query_df -> records -> update",
                 "c. update(IPC) only (ceiling)", "d. update(IPC) in a.'s chunks"):
        assert path in result.stdout
    # The server's own column set (key hidden) and the id variant, side by side.
    assert "key-hidden" in result.stdout and "with-id" in result.stdout


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout


def test_freshness_benchmark_measures_every_scheme_and_each_delivers_every_row_once():
    # One run, three servers side by side; the bench exits 1 if a server
    # misses a row that should be exactly once.
    output = run_bench("freshness.py", "--smoke", "--schemes", "project", "predecessor", "old-poll")
    for row in ("1. insert -> Python client (ws)", "2. insert -> page, drawn (flush+frame)", "predecessor",
                "old poll scheme  1. insert -> Python client (ws)"):
        assert row in output
    for scheme in ("this project", "old poll scheme"):
        delivered = re.search(rf"{scheme}: ([\d,]+) rows delivered to the Python client for ([\d,]+) sent", output)
        assert delivered and delivered.group(1) == delivered.group(2) != "0", output[-1500:]


def test_fanout_benchmark_runs_both_designs_without_a_gap():
    output = run_bench("fanout.py", "--smoke")  # exits 1 on a missing batch or a client that never joined
    designs = [line.split()[0] for line in output.splitlines() if line.split()[:1] in (["new"], ["old"])]
    assert designs == ["new", "old"], output


def test_poll_cost_benchmark_runs():
    output = run_bench("poll_cost.py", "--smoke")
    assert "Tail.poll" in output


def test_producer_capacity_benchmark_runs():
    output = run_bench("producer_capacity.py", "--smoke")
    assert "rows/s" in output


def test_memory_benchmark_runs():
    output = run_bench("memory.py", "--smoke")
    assert "server RSS" in output


def test_tail_rate_benchmark_compares_the_three_overlap_schemes():
    output = run_bench("tail_rate.py", "--smoke")
    lines = [line.split() for line in output.splitlines() if line.strip().startswith("2,000")]
    assert [line[1] for line in lines] == ["new", "each", "old"]
    assert float(lines[0][3]) == 1.0  # the new scheme fetches each row once
    checks = {line[1]: int(line[5].replace(",", "")) for line in lines}
    assert 0 < checks["new"] < checks["each"]  # once a second, not on every poll
