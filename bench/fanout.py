"""What one more page costs the server: views in each browser, beside views on the server.

A benchmark, not a test. For each design it starts the real server against
the chDB test harness (tests/chdb_http.py, chDB behind ClickHouse's HTTP
interface) and producer.py at a given rate, connects clients, and measures
for --seconds:

  server CPU  of the server process, from /proc/<pid>/stat, as % of one core;
  lag         now - the row's `timestamp` (stamped by the producer just
              before its insert), at each batch a client receives: p50 and
              p95 over all clients, and p95 at the client that connected
              last (it waits behind every other socket);
  gaps        batches missing or out of order (must be 0).

The designs:

  new   this checkout: each page holds its own copy of the table and the
        server sends every page the same Arrow bytes once per poll (/feed).
        A client here is what index.html does: it joins with a snapshot,
        then reads every batch and checks its sequence number. The last
        client of each client process also applies every batch to a
        Perspective table of its own, as the page does; the others stop at
        the bytes, so that 1,000 copies of the table do not take the cores
        the server is measured on (the page's own work is the browser's).
  old   the design before it (`--old-ref`, by default the parent of the
        commit that added feed.py, checked out with `git archive`): every
        page's views run on the server. A client there holds one view of the
        hosted table with an on_update row-delta callback, the cheapest page
        there was (the dashboard held five views), so the old figures are a
        lower bound.

Both servers run with --limit 10,000 (the old default) and generous
connection limits. Clients run in --processes processes so that they do
not starve the server of the event loop; on a 2-core machine they still
share the cores with it, so lags include the clients' own queueing (the
client CPU column says how busy they were).

With --chromium it measures real pages instead: server CPU with 1 and then
8 dashboard pages open in headless Chromium (the page each design serves),
at --rate rows/s.

Run it from the repository root:

    .venv/bin/python bench/fanout.py                                   # the README's table (several minutes)
    .venv/bin/python bench/fanout.py --runs new:200:1000 old:200:50    # design:rows per second:clients ...
    .venv/bin/python bench/fanout.py --chromium --rate 2000            # 1 and 8 real pages, both designs
    .venv/bin/python bench/fanout.py --smoke                           # CI: a few clients, a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import chdb_http  # noqa: E402
from servers import Program, free_port, serves  # noqa: E402

LIMIT = 10_000
SEQUENCE = struct.Struct(">Q")
CONNECTION_LIMITS = ["--max-connections", "5000", "--max-connections-per-address", "5000"]
DEFAULT_RUNS = ["old:200:50", "new:200:50", "new:200:1000", "old:2000:50", "new:2000:50", "new:2000:500"]


# --- the two designs ------------------------------------------------------------

def old_design(ref: str | None) -> Path:
    """A checkout of the design before the feed, in a temporary folder."""
    if ref is None:
        added = subprocess.run(["git", "log", "--format=%H", "--diff-filter=A", "-1", "--", "feed.py"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        ref = f"{added}^"
    folder = Path(tempfile.mkdtemp(prefix="fanout-old-"))
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "tests" / "node_modules").symlink_to(REPO / "tests" / "node_modules")
    return folder


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(folder: Path, env: dict, port: int, log: Path) -> Program:
    server = Program(str(folder / "perspective_server.py"),
                     ["--port", str(port), "--limit", str(LIMIT), "--no-history", *CONNECTION_LIMITS], env, log)
    if not serves(f"http://127.0.0.1:{port}/", server.proc, 60):
        raise SystemExit(f"the server did not start:\n{server.log()}")
    return server


# --- clients, in their own processes ------------------------------------------------

async def new_client(port: int, replicate: bool, lags: list, stats: dict, stop: float) -> None:
    import perspective
    import pyarrow as pa
    import pyarrow.compute as pc
    import tornado.httpclient
    import tornado.websocket

    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/feed",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    socket = await tornado.websocket.websocket_connect(request, max_message_size=1 << 30)
    hello = json.loads(await socket.read_message())
    snapshot = await socket.read_message()
    table = perspective.Server().new_local_client().table(snapshot, limit=hello["limit"]) if replicate else None
    sequence = hello["sequence"]
    stats["joined"] += 1
    while time.time() < stop and (message := await socket.read_message()) is not None:
        (number,) = SEQUENCE.unpack_from(message)
        stats["gaps"] += number != sequence + 1
        sequence = number
        if table is not None:
            table.update(message[SEQUENCE.size:])
        batch = pa.ipc.open_stream(memoryview(message)[SEQUENCE.size:]).read_all()
        newest = pc.max(batch.column("timestamp")).value / 1000  # ms -> s
        lags.append(time.time() - newest)
    socket.close()


async def old_client(port: int, lags: list, stats: dict, stop: float) -> None:
    import perspective
    import pyarrow as pa
    import pyarrow.compute as pc
    import tornado.httpclient
    import tornado.websocket

    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/websocket",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    socket = await tornado.websocket.websocket_connect(request, max_message_size=1 << 30)
    client = perspective.AsyncClient(lambda message: socket.write_message(message, binary=True))

    async def pump():
        while (message := await socket.read_message()) is not None:
            await client.handle_response(message)

    reader = asyncio.ensure_future(pump())
    table = await client.open_table("stock_values")
    view = await table.view(columns=["timestamp"])

    def on_update(port_id, delta):
        batch = pa.ipc.open_stream(delta).read_all()
        if batch.num_rows:
            lags.append(time.time() - pc.max(batch.column("timestamp")).value / 1000)

    await view.on_update(on_update, mode="row")
    stats["joined"] += 1
    await asyncio.sleep(max(0.0, stop - time.time()))
    socket.close()
    reader.cancel()


def client_process(design: str, port: int, count: int, start: float, stop: float, results) -> None:
    """`count` clients on one event loop; reports (lags of each client, gaps, joined, CPU seconds)."""
    async def main():
        lags = [[] for _ in range(count)]
        stats = {"gaps": 0, "joined": 0}
        tasks = []
        for i in range(count):
            if design == "new":
                tasks.append(asyncio.ensure_future(new_client(port, i == count - 1, lags[i], stats, stop)))
            else:
                tasks.append(asyncio.ensure_future(old_client(port, lags[i], stats, stop)))
            await asyncio.sleep(0.002)  # a page opens now and then, not all in one instant
        errors = [r for r in await asyncio.gather(*tasks, return_exceptions=True) if isinstance(r, BaseException)]
        window = [[lag for lag in client] for client in lags]
        return window, stats, errors

    t0 = time.process_time()
    window, stats, errors = asyncio.run(main())
    results.put({"lags": window, "gaps": stats["gaps"], "joined": stats["joined"],
                 "errors": [repr(e)[:200] for e in errors[:3]], "cpu": time.process_time() - t0, "start": start})


def percentile(values, q):
    import numpy as np
    return float(np.percentile(values, q)) * 1000 if len(values) else float("nan")


def run_clients(design: str, folder: Path, env: dict, rate: int, clients: int, args, logs: Path) -> dict:
    port = free_port()
    producer = Program(str(folder / "producer.py"), ["--batch-size", str(rate // 2), "--interval", "0.5"], env,
                       logs / f"producer-{design}-{rate}-{clients}.log")
    server = start_server(folder, env, port, logs / f"server-{design}-{rate}-{clients}.log")
    try:
        time.sleep(2)  # the table exists and rows flow
        processes = min(args.processes, clients)
        join_time = 2 + clients * 0.004
        start = time.time() + join_time + 2  # all joined, then measure
        stop = start + args.seconds
        results = multiprocessing.get_context("fork").Queue()
        workers = [multiprocessing.get_context("fork").Process(
            target=client_process, args=(design, port, clients // processes + (i < clients % processes), start,
                                         stop + 1, results)) for i in range(processes)]
        for worker in workers:
            worker.start()
        time.sleep(max(0.0, start - time.time()))
        cpu_before = cpu_seconds(server.proc.pid)
        time.sleep(max(0.0, stop - time.time()))
        server_cpu = (cpu_seconds(server.proc.pid) - cpu_before) / args.seconds
        reports = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
    finally:
        producer.interrupt(10)
        server.interrupt(30)
        producer.kill()
        server.kill()
    # Only batches that arrived in the measuring window count; each client's
    # lags are in arrival order, so keep each client's last ones.
    per_second = rate / 1  # rows
    everyone = [lag for report in reports for client in report["lags"] for lag in client[-int(args.seconds * 10):]]
    last = reports[-1]["lags"][-1][-int(args.seconds * 10):] if reports[-1]["lags"] else []
    return {"design": design, "rate": rate, "clients": clients, "joined": sum(r["joined"] for r in reports),
            "server_cpu": server_cpu * 100, "lag_p50": percentile(everyone, 50), "lag_p95": percentile(everyone, 95),
            "last_p95": percentile(last, 95), "gaps": sum(r["gaps"] for r in reports),
            "client_cpu": sum(r["cpu"] for r in reports) / (args.seconds + join_time + 2) * 100,
            "errors": [e for r in reports for e in r["errors"]], "rows_per_s": per_second}


# --- real pages ---------------------------------------------------------------------

def chromium_pages(design: str, folder: Path, env: dict, rate: int, args, logs: Path) -> dict:
    import browser

    port = free_port()
    producer = Program(str(folder / "producer.py"), ["--batch-size", str(rate // 2), "--interval", "0.5"], env,
                       logs / f"producer-chromium-{design}.log")
    server = start_server(folder, env, port, logs / f"server-chromium-{design}.log")
    figures = {}
    try:
        with browser.launch_chromium(viewport=(1480, 860)) as context:
            browser.CdnRouter().install(context)
            pages = []
            for count in (1, 8):
                while len(pages) < count:
                    page = context.new_page()
                    page.goto(f"http://127.0.0.1:{port}/")
                    browser.wait_for_status(page, "live", 60_000)
                    pages.append(page)
                time.sleep(5)  # settled
                before = cpu_seconds(server.proc.pid)
                time.sleep(args.seconds)
                figures[count] = (cpu_seconds(server.proc.pid) - before) / args.seconds * 100
    finally:
        producer.interrupt(10)
        server.interrupt(30)
        producer.kill()
        server.kill()
    return {"design": design, "rate": rate, "one": figures[1], "eight": figures[8], "ratio": figures[8] / figures[1]}


# The goals: (rows/s, clients) -> (server CPU % of a core, lag p95 at the last client, ms).
GOALS = {(200, 1000): (25, 300), (2000, 500): (50, 500)}


def summary(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        if "ratio" in r:
            out.append({"figure": f"server CPU, 8 Chromium dashboards / 1 ({r['design']}, {r['rate']:,} rows/s)",
                        "value": f"{r['ratio']:.2f}x ({r['one']:.1f}% -> {r['eight']:.1f}%)",
                        "target": "<= 1.3x" if r["design"] == "new" else "n/a",
                        "met": r["ratio"] <= 1.3 if r["design"] == "new" else None})
            continue
        cpu_goal, lag_goal = GOALS.get((r["rate"], r["clients"]), (None, None)) if r["design"] == "new" else (None, None)
        what = f"({r['design']}, {r['clients']:,} clients, {r['rate']:,} rows/s)"
        out.append({"figure": f"server CPU, % of a core {what}", "value": f"{r['server_cpu']:.1f}%",
                    "target": f"<= {cpu_goal}%" if cpu_goal else "n/a",
                    "met": r["server_cpu"] <= cpu_goal if cpu_goal else None})
        out.append({"figure": f"lag p95 at the last client {what}", "value": f"{r['last_p95']:.0f} ms, {r['gaps']} gaps",
                    "target": f"<= {lag_goal} ms, 0 gaps" if lag_goal else "0 gaps",
                    "met": (r["last_p95"] <= lag_goal if lag_goal else True) and not r["gaps"]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="DESIGN:ROWS_PER_S:CLIENTS")
    parser.add_argument("--seconds", type=float, default=20, help="measuring time per run (default 20)")
    parser.add_argument("--processes", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--old-ref", default=None, help="git revision of the old design (default: before feed.py)")
    parser.add_argument("--chromium", action="store_true", help="1 and 8 real dashboard pages instead of clients")
    parser.add_argument("--rate", type=int, default=2000, help="rows/s for --chromium (default 2,000)")
    parser.add_argument("--smoke", action="store_true", help="a few clients for a few seconds (CI)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.seconds = ["new:200:5", "old:200:5"], 3
    runs = []
    for run in args.runs:
        try:
            design, rate, clients = run.split(":")
            runs.append((design, int(rate), int(clients)))
            if design not in ("new", "old") or int(rate) < 2 or int(clients) < 1:
                raise ValueError
        except ValueError:
            parser.error(f"--runs {run}: expected new|old:ROWS_PER_S:CLIENTS, e.g. new:200:1000")

    folders = {"new": REPO}
    if args.chromium or any(design == "old" for design, _, _ in runs):
        folders["old"] = old_design(args.old_ref)
    logs = Path(tempfile.mkdtemp(prefix="fanout-logs-"))
    results = []
    with chdb_http.running(logs / "chdb") as harness:
        if args.chromium:
            for design in ("old", "new"):
                env = {**harness.env(), "CLICKHOUSE_DB": f"fanout_chromium_{design}"}
                result = chromium_pages(design, folders[design], env, args.rate, args, logs)
                results.append(result)
                print(f"{design}: server CPU with 1 page {result['one']:.1f}%, with 8 pages {result['eight']:.1f}% "
                      f"of a core ({result['ratio']:.2f}x) at {args.rate:,} rows/s", flush=True)
        else:
            print(f"{'design':6} {'rows/s':>6} {'clients':>7} {'joined':>6} {'server CPU':>10} {'lag p50':>8} "
                  f"{'lag p95':>8} {'last p95':>8} {'gaps':>4} {'client CPU':>10}", flush=True)
            for number, (design, rate, clients) in enumerate(runs):
                env = {**harness.env(), "CLICKHOUSE_DB": f"fanout_{number}"}
                r = run_clients(design, folders[design], env, rate, clients, args, logs)
                results.append(r)
                print(f"{design:6} {rate:>6,} {clients:>7,} {r['joined']:>6,} {r['server_cpu']:>9.1f}% "
                      f"{r['lag_p50']:>6.0f}ms {r['lag_p95']:>6.0f}ms {r['last_p95']:>6.0f}ms {r['gaps']:>4} "
                      f"{r['client_cpu']:>9.0f}%" + (f"  errors: {r['errors']}" if r["errors"] else ""), flush=True)
    print(f"logs in {logs}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "summary": summary(results)}, indent=2))
    bad = [r for r in results if r.get("gaps") or r.get("errors") or r.get("joined", 1) == 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
