"""Every benchmark in bench/, one after another, and one summary table.

Runs each benchmark as a subprocess with `--json` to a temporary file (its
own output streams through as it runs), then prints one table: benchmark,
figure, value, target, met. A benchmark that is not there yet is skipped with
a note; one that fails is reported as failed, and the exit status is then 1.
A missed target does not change the exit status: on a shared machine a
timing says little, and the table says which target was missed.

Each benchmark states its own figures in its JSON as
`"summary": [{"figure", "value", "target", "met"}, ...]`; for
sync_throughput.py, which predates that, the figures are read from its
`results`. A benchmark whose JSON has neither is listed as run, without
figures.

Run it from the repository root:

    .venv/bin/python bench/run_all.py               # full sizes: about 20 minutes (memory.py alone is 10)
    .venv/bin/python bench/run_all.py --smoke       # CI: every benchmark's tiny mode, about a minute
    .venv/bin/python bench/run_all.py --only poll_cost producer_capacity
    .venv/bin/python bench/run_all.py --json all.json

Sample output (--smoke, 2 cores shared with other work; smoke timings are
not meaningful, only that every benchmark runs):

    $ python bench/run_all.py --smoke
    ...
    SMOKE RUN: tiny sizes, the figures only show that each benchmark works

    benchmark          figure                                                                          value                                  target                                 met?
    sync_throughput    sync rows/s, Tail -> IPC -> update (20,000 rows)                                232,663                                n/a                                    -
    sync_throughput    sync path, % of Perspective's own Arrow ingest                                  32%                                    n/a                                    -
    sync_throughput    sync path vs the predecessor's records path                                     3.4x                                   n/a                                    -
    freshness          freshness p95, insert -> Python client (this project)                           226 ms (p50 125, max 245, 16 batches)  n/a                                    -
    freshness          freshness p95, insert -> page drawn (this project)                              375 ms (p50 234, max 418, 16 batches)  <= 500 ms                              yes
    freshness          rows delivered / distinct, missed rows (this project)                           1.00x, 0 missed                        1.00x, 0 missed                        yes
    freshness          server CPU, % of one core (this project)                                        3%                                     n/a                                    -
    freshness          freshness p95, insert -> Python client (predecessor)                            245 ms (p50 143, max 265, 16 batches)  n/a                                    -
    freshness          freshness p95, insert -> page drawn (predecessor)                               358 ms (p50 253, max 377, 16 batches)  n/a                                    -
    freshness          rows delivered / distinct, missed rows (predecessor)                            6.06x, 0 missed                        n/a                                    -
    freshness          server CPU, % of one core (predecessor)                                         8%                                     n/a                                    -
    fanout             (sample lines of the fan-out bench are in bench/README.md)
    poll_cost          poll p50, 100k vs 1k rows of history (Tail.poll)                                1.11x (12.6 vs 11.3 ms)                <= 1.5x                                yes
    poll_cost          rows read per poll at 100k, median (Tail.poll)                                  101,362                                ~new + overlap (700), not history      NO
    producer_capacity  producer rows/s, 10-row batches (http, best async_insert, incl. make_batch)     1,203                                  n/a (capacity)                         -
    producer_capacity  producer rows/s, 1,000-row batches (http, best async_insert, incl. make_batch)  84,430                                 n/a (capacity)                         -
    memory             server RSS drift after warm-up (worst of min/max)                               +0.0% / +10.0%                         within +-15%                           yes
    memory             server sync rate (median of its 10 s log lines)                                 4,200 rows/s                           >= 95% of the producer's 4,191 rows/s  yes

    wall time: sync_throughput 2 s, freshness 15 s, fanout 7 s, poll_cost 10 s, producer_capacity 6 s, memory 17 s
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# name -> (full-size arguments, smoke arguments)
BENCHMARKS = {
    "sync_throughput": ([], ["--rows", "20000", "--repeat", "1"]),
    "freshness": ([], ["--smoke"]),
    "fanout": ([], ["--smoke"]),
    "poll_cost": ([], ["--smoke"]),
    "producer_capacity": ([], ["--smoke"]),
    "memory": ([], ["--smoke"]),
    "tail_rate": (["--rates", "2000", "5000", "10000"], ["--smoke"]),
    "hostile": ([], ["--smoke"]),
    "history": ([], ["--smoke"]),
}


def sync_throughput_summary(data: dict) -> list[dict]:
    """Figures from sync_throughput.py's `results`, per size, for the
    server's own column set (key hidden) first and the `id` variant beside."""
    out = []
    for config in ("key-hidden", "with-id"):
        mine = [r for r in data.get("results", []) if r.get("config") == config]
        for rows in sorted({r["rows"] for r in mine}):
            by_path = {r["path"]: r for r in mine if r["rows"] == rows}
            tail, ceiling, records = by_path.get("tail"), by_path.get("ceiling"), by_path.get("records")
            if tail and ceiling:
                share = tail["rows_per_s"] / ceiling["rows_per_s"]
                out.append({"figure": f"sync {config}, {rows:,} rows: share of Perspective's own Arrow ingest",
                            "value": f"{100 * share:.0f}% ({tail['rows_per_s']:,.0f} rows/s)", "target": ">= 90%",
                            "met": share >= 0.9})
                peak = max(tail["rss_peak_gb"]) / min(tail["rss_after_gb"])
                out.append({"figure": f"sync {config}, {rows:,} rows: peak RSS / RSS after",
                            "value": f"{peak:.2f}x", "target": "<= 1.5x", "met": peak <= 1.5})
            if tail and records:
                out.append({"figure": f"sync {config}, {rows:,} rows: vs the predecessor's records path",
                            "value": f"{tail['rows_per_s'] / records['rows_per_s']:.1f}x", "target": "n/a",
                            "met": None})
    return out


def summary_of(name: str, data: dict) -> list[dict] | None:
    if isinstance(data.get("summary"), list):
        return data["summary"]
    if name == "sync_throughput":
        return sync_throughput_summary(data)
    return None


def run(name: str, args: list[str], timeout: float | None) -> dict:
    script = BENCH / f"{name}.py"
    if not script.exists():
        return {"name": name, "status": "missing"}
    with tempfile.TemporaryDirectory(prefix=f"run_all-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(script.relative_to(ROOT)), *args, "--json", str(out)]
        print(f"\n=== {' '.join(command[1:-2])}", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(command, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"name": name, "status": f"timed out after {timeout:g} s", "seconds": time.monotonic() - started}
        seconds = time.monotonic() - started
        if code != 0:
            return {"name": name, "status": f"failed (exit {code})", "seconds": seconds}
        if not out.exists():
            return {"name": name, "status": "ran, wrote no JSON", "seconds": seconds}
        data = json.loads(out.read_text())
    return {"name": name, "status": "ok", "seconds": seconds, "summary": summary_of(name, data)}


def print_summary(outcomes: list[dict], smoke: bool) -> None:
    header = ("benchmark", "figure", "value", "target", "met?")
    lines = []
    for o in outcomes:
        if o["status"] != "ok":
            note = "not in bench/ yet: skipped" if o["status"] == "missing" else o["status"].upper()
            lines.append((o["name"], note, "", "", ""))
        elif not o["summary"]:
            lines.append((o["name"], f"ran in {o['seconds']:.0f} s; its JSON has no 'summary'", "", "", ""))
        else:
            for item in o["summary"]:
                met = item.get("met")
                lines.append((o["name"], str(item.get("figure", "")), str(item.get("value", "")),
                               str(item.get("target", "")), "-" if met is None else "yes" if met else "NO"))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    print("\n" + ("SMOKE RUN: tiny sizes, the figures only show that each benchmark works\n" if smoke else ""))
    for row in [header, *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    ran = ", ".join(f"{o['name']} {o['seconds']:.0f} s" for o in outcomes if "seconds" in o)
    print(f"\nwall time: {ran}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run every benchmark in bench/ and print one summary table.")
    parser.add_argument("--smoke", action="store_true", help="each benchmark's tiny CI mode")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[], metavar="NAME",
                        help="leave these out")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds allowed per benchmark (default: none; 300 with --smoke)")
    parser.add_argument("--json", metavar="PATH", help="also write the combined summary to this JSON file")
    args = parser.parse_args(argv)
    if args.timeout is None and args.smoke:
        args.timeout = 300
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    outcomes = [run(name, BENCHMARKS[name][1 if args.smoke else 0], args.timeout) for name in names]
    print_summary(outcomes, args.smoke)
    if args.json:
        Path(args.json).write_text(json.dumps({"smoke": args.smoke, "benchmarks": outcomes}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(o["status"] not in ("ok", "missing") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
