"""Does perspective_server.py's memory stay flat at 20x the demo's insert rate?

A benchmark, not a test. It runs the three programs as separate processes,
the way the README's Docker setup does:

  * tests/chdb_http.py, chDB behind ClickHouse's HTTP interface. It is a TEST
    HARNESS, NOT A CLICKHOUSE SERVER (it runs one query at a time), used
    because this machine has no ClickHouse server;
  * `python producer.py --batch-size 2000 --interval 0.5`: 4,000 rows/s, 20x
    the demo's 100 rows every 500 ms (`--embedded` would run the producer at
    its default rate, hence the separate process);
  * `python perspective_server.py` with its defaults (--interval between
    polls, overlap 3 s, --limit 10,000 rows in the Perspective table);

plus `--viewers` (1) pages in this process, each a copy of the table
following the live feed (/feed) as index.html does.

It samples the server process's RSS (VmRSS in /proc/PID/status) every
--sample seconds. After --warmup seconds the next sample is the baseline;
min, max and last RSS from then on are reported relative to it (target:
within +-15%). The server's own "synced N rows (R rows/s), lag ..." lines
(every 10 s) and the producer's "inserted ..." lines show whether it kept up.

`--table-only` instead pushes the same number of rows (the --minutes at
this rate) through a Perspective table alone, made as the server makes it
(limit 10,000, the Arrow types Tail.poll hands it), once as the server has
it and once without the unique `id` column, each in a fresh process: no
ClickHouse, no server, about 40 s for 10 minutes' rows. It shows what grows.

Run it from the repository root:

    .venv/bin/python bench/memory.py                       # 10 minutes, 60 s warm-up
    .venv/bin/python bench/memory.py --minutes 3
    .venv/bin/python bench/memory.py --smoke               # 15 s, 5 s warm-up (CI, ~18 s in all)
    .venv/bin/python bench/memory.py --table-only          # the Perspective table alone, with and without `id`
    .venv/bin/python bench/memory.py --json memory.json

Sample output (2 cores, shared with other work; perspective-python 4.3.0,
chDB 4.4.0 behind the harness):

    $ python bench/memory.py --minutes 10
    harness: tests/chdb_http.py (a test harness, not a ClickHouse server: one query at a time)
    producer: --batch-size 2000 --interval 0.5 (4,000 rows/s); server: defaults; viewers: 1; 10 min, warm-up 60 s, RSS every 5 s
    server ready in 0.6 s (pid 15194)
           0 s  server RSS   157.5 MB
          60 s  server RSS   260.6 MB  (baseline)
         120 s  server RSS   349.7 MB
         180 s  server RSS   400.7 MB
         240 s  server RSS   497.0 MB
         300 s  server RSS   540.1 MB
         360 s  server RSS   600.9 MB
         420 s  server RSS   596.6 MB
         480 s  server RSS   734.5 MB
         540 s  server RSS   788.3 MB
         600 s  server RSS   823.2 MB

    server RSS after the 60 s warm-up (baseline: sample at 60 s), target within +-15%
                                    MB  vs baseline
      at start (after backfill)  157.5
      baseline                   260.6
      min                        260.6        +0.0%
      max                        823.2      +215.9%
      last                       823.2      +215.9%
      within +-15%: NO
      (to see what grows: python bench/memory.py --table-only --minutes 10)

    keeping up: producer target 4,000 rows/s (20x the demo)
      server 'synced' lines: 60, rows/s min 3,800 / median 4,000 / max 4,200; total 2,402,000 rows
      lag p50 per line: median 94 ms, worst 122 ms; worst max 718 ms
      producer 'inserted' lines: 58, rows/s median 4,000, pending at last line 0; total 2,394,000 rows
      kept up (server median >= 95% of producer median): yes
      rows in ClickHouse at the end: 2,402,000
      viewers: 1, updates received 1,200; view reads 1,201

    $ python bench/memory.py --table-only --minutes 10
    the Perspective table alone (limit 10,000, as perspective_server.py makes it): 2,400,000 rows, 2,000 per update, as 10 min at 4,000 rows/s; each variant in a fresh process

    table                                     rows pushed  RSS before MB  after MB  growth MB  bytes per row pushed
    as the server has it (unique id strings)    2,400,000            140       741       +601                   263
    the same without the id column              2,400,000            140       145         +5                     2

The server keeps up, but its RSS grows by about 50 MB a minute at this rate,
and the Perspective table alone reproduces it: Perspective 4.3.0 keeps every
distinct string a column has ever held, and `--limit` drops rows, not those
strings. The `id` column is a new UUID string on every row, about 260 bytes
each; without it the table stays flat.

It exits 1 if a program dies or the server never becomes ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from chdb_http import running  # noqa: E402

TABLE = "stock_values"
TARGET_PCT = 15.0
DEMO_ROWS_PER_S = 200  # producer.py's defaults: 100 rows every 0.5 s
SYNCED = re.compile(r"synced ([\d,]+) rows \((\d+) rows/s\), (?:lag p50 (\d+) ms / max (\d+) ms|no new rows)")
INSERTED = re.compile(r"inserted ([\d,]+) rows in (\d+) batches \((\d+) rows/s\), ([\d,]+) pending")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Program:
    """`python <script> <args>` from the repository root, logging to a file."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")}
        self.proc = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env={**clean, **env},
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 30) -> int:
        """SIGINT (if not sent yet) and wait; kill only if it hangs."""
        self.interrupt()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return self.proc.returncode


def stop_all(*programs: Program) -> None:
    for program in programs:  # signal all first, so they wind down together
        program.interrupt()
    for program in programs:
        program.stop()


# ---- viewers -------------------------------------------------------------

class Viewer:
    """One browser's worth of load on the server: a page following /feed.

    The page computes its views itself; what it costs the server is the feed.
    "reads" counts the batches this copy applied to its own table.
    """

    def __init__(self):
        self.updates = 0
        self.reads = 0

    async def run(self, port: int, stop: asyncio.Event) -> None:
        from servers import follow_feed

        replica, follower = await follow_feed(port)
        follower.cancel()

        async def follow():
            while (message := await replica.socket.read_message()) is not None:
                self.updates += 1
                replica.apply(message)
                self.reads += 1

        reading = asyncio.ensure_future(follow())
        try:
            await stop.wait()
        finally:
            replica.close()
            reading.cancel()


# ---- the run -------------------------------------------------------------

async def sample(server: Program, others: list[Program], seconds: float, every: float, warmup: float,
                 viewers: int, port: int) -> tuple[list[tuple[float, float]], list[Viewer]]:
    """RSS samples (seconds since ready, MB) while viewers watch."""
    stop = asyncio.Event()
    watching = [Viewer() for _ in range(viewers)]
    tasks = [asyncio.ensure_future(v.run(port, stop)) for v in watching]
    samples: list[tuple[float, float]] = []
    print_every = max(1, round(60 / every))  # progress once a minute; all samples go to --json
    started = time.monotonic()
    try:
        while True:
            elapsed = time.monotonic() - started
            for program in (server, *others):
                if program.proc.poll() is not None:
                    raise RuntimeError(f"{program.proc.args[1]} exited ({program.proc.returncode}):\n"
                                       f"{program.log()[-3000:]}")
            for task in tasks:
                if task.done() and task.exception():
                    raise RuntimeError(f"a viewer failed: {task.exception()!r}")
            samples.append((elapsed, rss_mb(server.proc.pid)))
            baseline = len(samples) == 1 + int(-(-warmup // every))
            if len(samples) == 1 or baseline or (len(samples) - 1) % print_every == 0:
                print(f"  {elapsed:6.0f} s  server RSS {samples[-1][1]:7.1f} MB"
                      f"{'  (baseline)' if baseline else ''}", flush=True)
            if elapsed >= seconds:
                break
            await asyncio.sleep(max(0.0, started + len(samples) * every - time.monotonic()))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return samples, watching


def wait_ready(server: Program, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"perspective_server.py exited ({server.proc.returncode}):\n{server.log()[-3000:]}")
        if "backfilled" in server.log():
            return
        time.sleep(0.1)
    raise RuntimeError(f"perspective_server.py did not backfill in {timeout:g} s:\n{server.log()[-3000:]}")


def summarize(samples: list[tuple[float, float]], warmup: float) -> dict:
    after = [(t, mb) for t, mb in samples if t >= warmup] or samples[-1:]
    base = after[0][1]
    values = [mb for _, mb in after]

    def rel(mb):
        return 100 * (mb - base) / base

    figures = {"baseline_at_s": after[0][0], "baseline_mb": base, "min_mb": min(values),
               "max_mb": max(values), "last_mb": values[-1], "start_mb": samples[0][1]}
    figures.update({f"{k}_pct": rel(figures[f"{k}_mb"]) for k in ("min", "max", "last")})
    figures["met"] = max(abs(figures["min_pct"]), abs(figures["max_pct"])) <= TARGET_PCT
    return figures


def log_rates(server_log: str, producer_log: str) -> dict:
    synced = [(int(n.replace(",", "")), int(rate), int(p50) if p50 else None, int(mx) if mx else None)
              for n, rate, p50, mx in SYNCED.findall(server_log)]
    inserted = [(int(n.replace(",", "")), int(rate), int(pending.replace(",", "")))
                for n, _, rate, pending in INSERTED.findall(producer_log)]
    producer_median = statistics.median([rate for _, rate, _ in inserted]) if inserted else None
    kept_up = (statistics.median([rate for _, rate, _, _ in synced]) >= 0.95 * producer_median
               if synced and producer_median else None)
    return {"synced_lines": synced, "inserted_lines": inserted, "producer_median": producer_median,
            "kept_up": kept_up}


def print_report(args, figures: dict, rates: dict, viewers: list[Viewer], rows_in_table: int | None) -> None:
    print(f"\nserver RSS after the {args.warmup:g} s warm-up (baseline: sample at "
          f"{figures['baseline_at_s']:.0f} s), target within +-{TARGET_PCT:.0f}%")
    header = ("", "MB", "vs baseline")
    lines = [("at start (after backfill)", f"{figures['start_mb']:.1f}", ""),
             ("baseline", f"{figures['baseline_mb']:.1f}", "")]
    lines += [(name, f"{figures[f'{name}_mb']:.1f}", f"{figures[f'{name}_pct']:+.1f}%")
              for name in ("min", "max", "last")]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(3)]
    for row in [header, *lines]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"  within +-{TARGET_PCT:.0f}%: {'yes' if figures['met'] else 'NO'}")
    if not figures["met"]:
        print(f"  (to see what grows: python bench/memory.py --table-only --minutes {args.minutes:g})")

    synced, inserted = rates["synced_lines"], rates["inserted_lines"]
    target = args.batch_size / args.interval
    print(f"\nkeeping up: producer target {target:,.0f} rows/s ({target / DEMO_ROWS_PER_S:.0f}x the demo)")
    if synced:
        per_s = [rate for _, rate, _, _ in synced]
        p50s = [p for _, _, p, _ in synced if p is not None]
        maxes = [m for _, _, _, m in synced if m is not None]
        print(f"  server 'synced' lines: {len(synced)}, rows/s min {min(per_s):,} / median "
              f"{statistics.median(per_s):,.0f} / max {max(per_s):,}; total {sum(n for n, *_ in synced):,} rows")
        if p50s:
            print(f"  lag p50 per line: median {statistics.median(p50s):.0f} ms, worst {max(p50s)} ms; "
                  f"worst max {max(maxes)} ms")
    else:
        print("  no 'synced' line yet (the server logs every 10 s)")
    if inserted:
        per_s = [rate for _, rate, _ in inserted]
        print(f"  producer 'inserted' lines: {len(inserted)}, rows/s median {statistics.median(per_s):,.0f}, "
              f"pending at last line {inserted[-1][2]:,}; total {sum(n for n, *_ in inserted):,} rows")
    if rates["kept_up"] is not None:
        print(f"  kept up (server median >= 95% of producer median): {'yes' if rates['kept_up'] else 'NO'}")
    if rows_in_table is not None:
        print(f"  rows in ClickHouse at the end: {rows_in_table:,}")
    if viewers:
        print(f"  viewers: {len(viewers)}, updates received {', '.join(f'{v.updates:,}' for v in viewers)}; "
              f"view reads {', '.join(f'{v.reads:,}' for v in viewers)}")
    if args.show_log_lines and synced:
        print("\n  server log, every 'synced' line:")
        for n, rate, p50, mx in synced:
            lag = f"lag p50 {p50} ms / max {mx} ms" if p50 is not None else "no new rows"
            print(f"    synced {n:,} rows ({rate:,} rows/s), {lag}")


# ---- --table-only: the Perspective table alone, without ClickHouse ----------

TABLE_ONLY = {"id": "as the server has it (unique id strings)", "no_id": "the same without the id column"}


def table_only_child(variant: str, rows: int, batch: int) -> None:
    """Pushes `rows` rows, `batch` at a time, through a Perspective table made
    as the server makes it (limit 10,000), in the types Tail.poll hands it;
    prints RSS before and after as one JSON line."""
    import ctypes
    import gc

    import numpy as np
    import perspective
    import pyarrow as pa

    sys.path.insert(0, str(ROOT))
    import producer
    from perspective_server import to_ipc

    market = producer.Market(seed=1)

    def arrow(i: int) -> pa.Table:
        now_ms = 1_700_000_000_000 + 500 * i
        made = market.batch(batch, now_ms)
        columns = {"inserted_at": pa.array(np.full(batch, now_ms, dtype=np.int64), pa.timestamp("ms", tz="UTC"))}
        for name in made.column_names:
            if name == "id" and variant == "no_id":
                continue
            column = made.column(name)
            columns[name] = column.cast(pa.int64()) if name == "volume" else column
        return pa.table(columns)

    table = perspective.Server().new_local_client().table(to_ipc(arrow(0).slice(0, 0)), limit=10_000)
    start = rss_mb(os.getpid())
    for i in range(rows // batch):
        table.update(to_ipc(arrow(i)))
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    print(json.dumps({"start_mb": start, "end_mb": rss_mb(os.getpid()), "size": table.size(),
                      "rows": rows // batch * batch}))


def table_only(args) -> tuple[int, dict]:
    rows = int(args.batch_size / args.interval * args.minutes * 60)
    print(f"the Perspective table alone (limit 10,000, as perspective_server.py makes it): {rows:,} rows, "
          f"{args.batch_size:,} per update, as {args.minutes:g} min at {args.batch_size / args.interval:,.0f} rows/s; "
          "each variant in a fresh process", flush=True)
    results = {}
    for variant, title in TABLE_ONLY.items():
        out = subprocess.run([sys.executable, __file__, "--table-only-child", variant, "--minutes", str(args.minutes),
                              "--batch-size", str(args.batch_size), "--interval", str(args.interval)],
                             cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"error: {title}: {out.stderr[-2000:]}", file=sys.stderr)
            return 1, results
        results[variant] = {"title": title, **json.loads(out.stdout.strip().splitlines()[-1])}
    header = ("table", "rows pushed", "RSS before MB", "after MB", "growth MB", "bytes per row pushed")
    lines = [(r["title"], f"{r['rows']:,}", f"{r['start_mb']:.0f}", f"{r['end_mb']:.0f}",
              f"{r['end_mb'] - r['start_mb']:+.0f}", f"{(r['end_mb'] - r['start_mb']) * 2**20 / r['rows']:.0f}")
             for r in results.values()]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    print()
    for row in [header, *lines]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return 0, results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="perspective_server.py RSS over time at 20x the demo insert rate.")
    parser.add_argument("--minutes", type=float, default=10, help="run length from server ready (default 10)")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before the baseline sample (default 60)")
    parser.add_argument("--sample", type=float, default=5, help="seconds between RSS samples (default 5)")
    parser.add_argument("--batch-size", type=int, default=2000, help="producer rows per batch (default 2000)")
    parser.add_argument("--interval", type=float, default=0.5, help="producer seconds between batches (default 0.5)")
    parser.add_argument("--viewers", type=int, default=1,
                        help="websocket viewers with the dashboard's view (default 1)")
    parser.add_argument("--show-log-lines", action="store_true", help="print every 'synced' line of the server log")
    parser.add_argument("--table-only", action="store_true",
                        help="instead: push the rows of --minutes at this rate through a Perspective table alone, "
                             "with and without the unique id column, to see what grows")
    parser.add_argument("--table-only-child", choices=sorted(TABLE_ONLY), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: --minutes 0.25 --warmup 5")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.warmup = 0.25, 5
    if args.minutes * 60 < args.warmup:
        parser.error("--minutes must be longer than --warmup")
    if args.sample <= 0 or args.viewers < 0:
        parser.error("--sample must be > 0 and --viewers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_only_child:
        table_only_child(args.table_only_child, int(args.batch_size / args.interval * args.minutes * 60),
                         args.batch_size)
        return 0
    if args.table_only:
        code, results = table_only(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"table_only": results}, indent=2) + "\n")
        return code
    seconds = args.minutes * 60
    print(f"harness: tests/chdb_http.py (a test harness, not a ClickHouse server: one query at a time)\n"
          f"producer: --batch-size {args.batch_size} --interval {args.interval} "
          f"({args.batch_size / args.interval:,.0f} rows/s); server: defaults; viewers: {args.viewers}; "
          f"{args.minutes:g} min, warm-up {args.warmup:g} s, RSS every {args.sample:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, \
            running(Path(tmp) / "chdb", log_path=Path(tmp) / "harness.log") as harness:
        env = harness.env()
        port = free_port()
        prod = Program("producer.py", ["--batch-size", str(args.batch_size), "--interval", str(args.interval)],
                       env, Path(tmp) / "producer.log")
        server = Program("perspective_server.py", ["--port", str(port)], env, Path(tmp) / "server.log")
        rows_in_table = None
        try:
            started = time.monotonic()
            wait_ready(server)
            print(f"server ready in {time.monotonic() - started:.1f} s (pid {server.proc.pid})", flush=True)
            samples, viewers = asyncio.run(sample(server, [prod], seconds, args.sample, args.warmup,
                                                  args.viewers, port))
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            stop_all(prod, server)
            return 1
        server_log, producer_log = server.log(), prod.log()
        stop_all(prod, server)
        try:
            client = harness.client()
            rows_in_table = client.query(f"SELECT count() FROM demo.{TABLE}").result_rows[0][0]
        except Exception as error:  # the figure is a nicety; the harness may be busy
            print(f"(could not count rows: {error})")

    figures = summarize(samples, args.warmup)
    rates = log_rates(server_log, producer_log)
    print_report(args, figures, rates, viewers, rows_in_table)

    if args.json:
        synced = rates["synced_lines"]
        payload = {
            "settings": {k: getattr(args, k)
                         for k in ("minutes", "warmup", "sample", "batch_size", "interval", "viewers")},
            "harness": "tests/chdb_http.py (test harness, not a ClickHouse server)",
            "samples": [{"s": t, "rss_mb": mb} for t, mb in samples],
            "rss": figures,
            "synced_lines": synced,
            "inserted_lines": rates["inserted_lines"],
            "rows_in_table": rows_in_table,
            "viewer_updates": [v.updates for v in viewers],
            "summary": [
                {"figure": "server RSS drift after warm-up (worst of min/max)",
                 "value": f"{figures['min_pct']:+.1f}% / {figures['max_pct']:+.1f}%",
                 "target": f"within +-{TARGET_PCT:.0f}%", "met": figures["met"]},
                {"figure": "server sync rate (median of its 10 s log lines)",
                 "value": (f"{statistics.median([r for _, r, _, _ in synced]):,.0f} rows/s" if synced
                           else "no log line"),
                 "target": f">= 95% of the producer's {rates['producer_median']:,.0f} rows/s"
                           if rates["producer_median"] else "producer's rate",
                 "met": rates["kept_up"]},
            ],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
