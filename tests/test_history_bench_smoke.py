"""bench/history.py runs in its --smoke mode (the figures are not checked)."""

from test_bench_smoke import run_bench


def test_history_benchmark_runs():
    output = run_bench("history.py", "--smoke")
    for row in ("history      group-by ticker", "history session:", "perspective  group-by ticker"):
        assert row in output
