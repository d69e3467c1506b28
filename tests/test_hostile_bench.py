"""bench/hostile.py keeps working: its smoke mode runs every attack against
the new server and reports the victim's figures for each.

This checks that the benchmark runs and reports, not how fast anything is:
timings on a shared CI machine say nothing. tests/test_limits.py holds the
assertions about the limits themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import hostile  # noqa: E402


def test_hostile_benchmark_smoke_runs_every_attack(tmp_path):
    out = tmp_path / "hostile.json"
    result = subprocess.run([sys.executable, "bench/hostile.py", "--smoke", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    data = json.loads(out.read_text())
    assert [r["attack"] for r in data["results"]] == list(hostile.ATTACKS)
    for r in data["results"]:
        assert r["server"] == "new"
        assert r["before"]["updates"] > 0, r  # the victim was being served
        assert r["sigint"] == "stopped on SIGINT", r
    assert len(data["summary"]) == 2 * len(hostile.ATTACKS)
