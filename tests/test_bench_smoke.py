"""The benchmarks keep working: a tiny run of each, on the real engine.

These check that the bench scripts run and report every path, not how fast
anything is: timings on a shared CI machine say nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sync_throughput_benchmark_runs_all_three_paths():
    result = subprocess.run(
        [sys.executable, "bench/sync_throughput.py", "--rows", "5000", "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for path in ("a. Tail -> IPC -> update (this)", "b. query_df -> records -> update",
                 "c. update(IPC) only (ceiling)"):
        assert path in result.stdout


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout


def test_freshness_benchmark_measures_both_hops_for_both_schemes():
    output = run_bench("freshness.py", "--smoke")
    for row in ("1. insert -> Python client (ws)", "2. insert -> page, drawn (flush+frame)", "predecessor"):
        assert row in output


def test_fanout_benchmark_reports_every_viewer_complete():
    output = run_bench("fanout.py", "--smoke")
    assert "0/5" in output  # no viewer missed a row


def test_poll_cost_benchmark_runs():
    output = run_bench("poll_cost.py", "--smoke")
    assert "Tail.poll" in output


def test_producer_capacity_benchmark_runs():
    output = run_bench("producer_capacity.py", "--smoke")
    assert "rows/s" in output


def test_memory_benchmark_runs():
    output = run_bench("memory.py", "--smoke")
    assert "server RSS" in output
