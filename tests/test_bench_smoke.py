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
        [sys.executable, "bench/sync_throughput.py", "--rows", "5000", "--repeat", "1", "--no-breakdown"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for path in ("a. Tail -> IPC -> update (this)", "b. query_df -> records -> update",
                 "c. update(IPC) only (ceiling)"):
        assert path in result.stdout
