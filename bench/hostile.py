"""Can one viewer stall everyone? Each attack, old server vs new.

A benchmark, not a test. For each attack it starts a fresh
`perspective_server.py --embedded` (the demo: chDB in-process, producer on a
thread, 100 rows every 500 ms) on a chDB folder already holding
10,000 rows, so the viewers' table is full as in a demo that has run a
while; then it connects a well-behaved victim viewer in its
own process (on the new server a page's copy of the table following /feed,
on the old one a view of the hosted table with on_update; either way
measuring at each update now - newest `timestamp` in it), waits --settle
seconds (before),
runs the attack from this process for --seconds (during), closes the
attacker and waits --settle seconds (after), then stops the server with
SIGINT (killed if it ignores SIGINT for 15 s: "needed kill").

The attacks, each one client sending what the read-only gate lets through.
The old server ran every viewer's views on its one Perspective server at
/websocket; the new one serves live pages a feed that takes no requests, and
offers Perspective's protocol only for History (/history, its views
computed in ClickHouse). So each Perspective attack goes to /websocket on
the old server and to /history on the new one:

  while_loop   one view with an ExprTK `while` loop that never ends (ExprTK
               itself refuses a literal `while (true)`, not `while (i >= 0)`)
  loop_10k     one view whose expression loops 10,000 times per row
  split_close  a view split by `close` (one column per distinct price), then to_arrow()
  unread       3,000 full-table to_arrow() requests, replies never read
  many_views   384 pivot views on one connection
  connections  1,000 websockets, 200 of them with a pivot view
  subscribe    500 on_update subscriptions on one view, counting bytes pushed
  feed_pages   (new only) three pages that never read the feed, and one that
               joins again and again (a snapshot each time)

Per attack and server: victim updates and lag p50/p95 during the attack
(and after), server RSS and CPU before, during (max RSS, mean CPU) and
after, what the attacker got (e.g. "refused: too many views"), whether
SIGINT stopped the server, and from the server's log how many "Task
exception was never retrieved" tracebacks it wrote and how many viewers it
closed for falling behind.

"old" is the last commit before the viewer limits, 4ee2ee4 (--old-ref;
checked out to a temporary `git worktree`, removed afterwards), "new" is
this working tree. Everything is bounded in
time and count and talks only to 127.0.0.1.

    .venv/bin/python bench/hostile.py                   # both servers, every attack, about 12 minutes
    .venv/bin/python bench/hostile.py --only while_loop --servers new
    .venv/bin/python bench/hostile.py --smoke           # CI: new server, 1 s attacks, under a minute
    .venv/bin/python bench/hostile.py --json hostile.json

Sample (2 shared cores, load average 4-9; columns abridged; bench/README.md
has the whole table):

    attack       server  victim upd (before/during/after)  lag p95 ms during (p50)  RSS MB before/max/after  SIGINT
    split_close  old     12/1/0                            177 (177)                446/2491/3655            needed kill
    split_close  new     13/39/12                          498 (158)                456/455/454              stopped on SIGINT
    unread       old     13/1/0                            5390 (5390)              451/1251/1544            stopped on SIGINT
    unread       new     13/40/12                          215 (96)                 450/481/461              stopped on SIGINT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

TABLE = "stock_values"
OLD_REF = "4ee2ee4"  # the last commit before the viewer limits (main has them since)
TARGET_P95_MS = 1000
TARGET_RSS_MB = 300  # above the before-attack RSS


# ---- measuring ---------------------------------------------------------------

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """RSS (max) and CPU (% of one core) of a process over a phase."""

    def __init__(self, pid: int):
        self.pid, self.rss_max = pid, 0.0
        self.cpu0, self.wall0 = cpu_seconds(pid), time.monotonic()

    def sample(self) -> None:
        with contextlib.suppress(OSError):
            self.rss_max = max(self.rss_max, rss_mb(self.pid))

    def result(self) -> dict:
        self.sample()
        with contextlib.suppress(OSError):
            cpu = 100 * (cpu_seconds(self.pid) - self.cpu0) / (time.monotonic() - self.wall0)
            return {"rss_mb": round(self.rss_max), "cpu_pct": round(cpu)}
        return {"rss_mb": round(self.rss_max), "cpu_pct": None}


async def sampled(pid: int, seconds: float, work=None) -> tuple[dict, object]:
    """Samples the server every 0.25 s for `seconds` while `work` (a coroutine) runs."""
    sampler = Sampler(pid)
    task = asyncio.ensure_future(work) if work is not None else None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sampler.sample()
        await asyncio.sleep(0.25)
    outcome = None
    if task is not None:
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            outcome = await task
    return sampler.result(), outcome


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# ---- the victim (its own process, so the attacker's load is not its own) ---

async def victim(port: int, seconds: float, out: Path) -> None:
    """A page on the table: at each update, (time, now - newest timestamp), as JSON lines."""
    import pyarrow as pa
    import tornado.httpclient
    from servers import follow_feed, open_viewer

    def note(sink, arrow) -> None:
        stamps = pa.ipc.open_stream(arrow).read_all().column("timestamp").cast(pa.int64())
        newest = pa.compute.max(stamps).as_py()
        if newest is not None:
            sink.write(json.dumps([time.time(), time.time() * 1000 - newest]) + "\n")
            sink.flush()

    try:
        replica, follower = await follow_feed(port, patience=0)
    except tornado.httpclient.HTTPClientError:  # 404: the old server, views on the server
        replica = None
    if replica is not None:
        follower.cancel()
        with open(out, "a") as sink:
            sink.write(json.dumps(["ready", time.time()]) + "\n")
            sink.flush()
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                try:
                    message = await asyncio.wait_for(replica.socket.read_message(), max(0.1, stop - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if message is None:
                    break
                replica.apply(message)
                note(sink, memoryview(message)[8:])
        replica.close()
        return

    client, socket, reader = await open_viewer(port, path="/websocket")
    table = await client.open_table(TABLE)
    view = await table.view(columns=["timestamp"])
    with open(out, "a") as sink:
        def on_update(port_id, delta=None):
            if delta:
                note(sink, delta)

        await view.on_update(on_update, mode="row")
        sink.write(json.dumps(["ready", time.time()]) + "\n")
        sink.flush()
        await asyncio.sleep(seconds)
    reader.cancel()
    socket.close()


# ---- the attacks ---------------------------------------------------------------

# Where a Perspective client reaches the server: the old server's live
# /websocket, or the new server's /history (run_one sets it per server).
PERSPECTIVE_PATH = {"path": "/websocket"}


async def connect(port: int):
    """A Perspective client over a websocket that counts the bytes it receives."""
    import perspective
    import tornado.httpclient
    import tornado.websocket

    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}{PERSPECTIVE_PATH['path']}",
                                             headers={"Origin": f"http://127.0.0.1:{port}"})
    socket = await tornado.websocket.websocket_connect(request, max_message_size=1 << 30)
    client = perspective.AsyncClient(lambda message: socket.write_message(message, binary=True))
    received = [0]

    async def pump():
        while (message := await socket.read_message()) is not None:
            received[0] += len(message)
            # A refused on_update answers with an error no request awaits;
            # perspective-python raises it here. Keep reading regardless.
            with contextlib.suppress(perspective.PerspectiveError):
                await client.handle_response(message)

    return client, socket, asyncio.ensure_future(pump()), received


async def answer(awaitable, timeout: float) -> str:
    """What the server said: "ok", "refused: <its message>" or "no answer"."""
    try:
        await asyncio.wait_for(awaitable, timeout)
        return "ok"
    except asyncio.TimeoutError:
        return "no answer"
    except Exception as error:  # PerspectiveError and websocket errors
        return f"refused: {str(error).splitlines()[0][:90]}"


async def expression_attack(port, seconds, sockets, expression) -> str:
    client, socket, _, _ = await connect(port)
    sockets.append(socket)
    table = await client.open_table(TABLE)
    return await answer(table.view(expressions={"attack": expression}), seconds)


async def while_loop(port, seconds, sockets, scale) -> str:
    return await expression_attack(port, seconds, sockets, "var i := 0; while (i >= 0) { i += 1 }; i")


async def loop_10k(port, seconds, sockets, scale) -> str:
    return await expression_attack(
        port, seconds, sockets, f"var s := 0; for (var i := 0; i < {int(10_000 * scale)}; i += 1) {{ s += i }}; s")


async def split_close(port, seconds, sockets, scale) -> str:
    client, socket, _, received = await connect(port)
    sockets.append(socket)
    table = await client.open_table(TABLE)
    made = asyncio.ensure_future(table.view(split_by=["close"]))
    outcome = await answer(asyncio.shield(made), seconds)
    if outcome != "ok":
        return f"view: {outcome}"
    dimensions = await made.result().dimensions()
    outcome = await answer(made.result().to_arrow(), seconds)
    return f"view made ({dimensions['num_view_columns']:,} columns); to_arrow: {outcome}, {received[0]:,} bytes"


async def unread(port, seconds, sockets, scale) -> str:
    client, socket, pump, _ = await connect(port)
    sockets.append(socket)
    table = await client.open_table(TABLE)
    view = await table.view()
    pump.cancel()  # from now on nothing is read: replies pile up on the server
    started = time.monotonic()
    requests = [asyncio.ensure_future(view.to_arrow()) for _ in range(int(3000 * scale))]
    await asyncio.sleep(max(0.0, seconds - 1 - (time.monotonic() - started)))
    for request in requests:
        request.cancel()
    return f"sent {len(requests):,} to_arrow requests, read none"


async def many_views(port, seconds, sockets, scale) -> str:
    client, socket, _, _ = await connect(port)
    sockets.append(socket)
    table = await client.open_table(TABLE)
    made, outcome = 0, "ok"
    deadline = time.monotonic() + seconds
    for _ in range(int(384 * scale)):
        outcome = await answer(table.view(group_by=["ticker", "client"], split_by=["date"]),
                               max(0.1, deadline - time.monotonic()))
        if outcome != "ok":
            break
        made += 1
    return f"{made} views made; then {outcome}" if outcome != "ok" else f"{made} views made"


async def connections(port, seconds, sockets, scale) -> str:
    opened = refused = with_view = 0
    reason = ""
    deadline = time.monotonic() + seconds
    for i in range(int(1000 * scale)):
        if time.monotonic() > deadline:
            break
        try:
            client, socket, _, _ = await connect(port)
        except Exception as error:  # 503 from the limit, or the server too busy
            refused += 1
            reason = str(error)[:60]
            continue
        sockets.append(socket)
        opened += 1
        if i % 5 == 0:
            table = await client.open_table(TABLE)
            if await answer(table.view(group_by=["ticker"]), max(0.1, deadline - time.monotonic())) == "ok":
                with_view += 1
    return f"{opened} open ({with_view} with a view), {refused} refused{f' ({reason})' if reason else ''}"


async def subscribe(port, seconds, sockets, scale) -> str:
    client, socket, _, received = await connect(port)
    sockets.append(socket)
    table = await client.open_table(TABLE)
    view = await table.view()
    made, outcome = 0, "ok"
    started = time.monotonic()
    for _ in range(int(500 * scale)):
        outcome = await answer(view.on_update(lambda *_: None, mode="row"), 2)
        if outcome != "ok":
            break
        made += 1
    start, listening = received[0], time.monotonic()
    await asyncio.sleep(max(0.0, seconds - 1 - (listening - started)))
    pushed, listened = received[0] - start, time.monotonic() - listening
    tail = f"; then {outcome}" if outcome != "ok" else ""
    return f"{made} subscriptions{tail}; {pushed / 1e6:.1f} MB pushed in {listened:.0f} s"


async def feed_pages(port, seconds, sockets, scale) -> str:
    from servers import follow_feed
    from test_feed import Mute

    if PERSPECTIVE_PATH["path"] == "/websocket":
        return "no /feed on this server"
    stuck = [Mute(port) for _ in range(3)]
    joins = 0
    deadline = time.monotonic() + seconds - 1
    while time.monotonic() < deadline and joins < int(2000 * scale):
        replica, follower = await follow_feed(port, patience=0)
        replica.close(), follower.cancel()
        joins += 1
    for page in stuck:
        page.sock.close()
    return f"3 pages never read; {joins} joins, each with a snapshot"


ATTACKS = {"while_loop": while_loop, "loop_10k": loop_10k, "split_close": split_close, "unread": unread,
           "many_views": many_views, "connections": connections, "subscribe": subscribe,
           "feed_pages": feed_pages}


# ---- one run: a server, a victim, an attack -------------------------------------

def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PREFILL = """
import sys, time
import connection, producer
client = connection.connect(connection.ClickHouseSettings(embedded=True, chdb_path=sys.argv[1]))
producer.create_table(client)
market = producer.Market(seed=1)
for i in range(10):
    client.insert_arrow(producer.connection.TABLE, market.batch(1000, int(time.time() * 1000) - 60_000 + i))
"""


def prefill(folder: Path) -> None:
    """A chDB folder with 10,000 rows in the table. (A copy of one folder
    does not open: chDB's metadata names its absolute paths.)"""
    subprocess.run([sys.executable, "-c", PREFILL, str(folder)], cwd=REPO, check=True)


def wait_http(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1):
                return
        time.sleep(0.2)
    raise RuntimeError(f"server did not answer {url} in {timeout:g} s")


def stop(proc: subprocess.Popen) -> str:
    """SIGINT, as a user stops it; "needed kill" if it ignored that for 15 s."""
    if proc.poll() is not None:
        return f"had exited ({proc.returncode})"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
        return "stopped on SIGINT"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "needed kill"


def lag_figures(samples: list[tuple[float, float]], start: float, end: float) -> dict:
    lags = [lag for at, lag in samples if start <= at < end]
    p50, p95 = percentile(lags, 50), percentile(lags, 95)
    return {"updates": len(lags), "lag_p50_ms": None if p50 is None else round(p50),
            "lag_p95_ms": None if p95 is None else round(p95)}


async def run_one(code_dir: Path, attack: str, args, scratch: Path) -> dict:
    port = free_port()
    PERSPECTIVE_PATH["path"] = "/history" if (code_dir / "feed.py").exists() else "/websocket"
    log = scratch / f"{attack}-{code_dir.name}.log"
    data = scratch / f"chdb-{attack}-{port}"
    prefill(data)
    with open(log, "ab") as sink:
        server = subprocess.Popen([sys.executable, "perspective_server.py", "--embedded", "--port", str(port),
                                   "--chdb-path", str(data)],
                                  cwd=code_dir, stdout=sink, stderr=subprocess.STDOUT)
    victim_out = scratch / f"victim-{port}.jsonl"
    victim_proc = None
    sockets: list = []
    try:
        wait_http(server, f"http://127.0.0.1:{port}/", log)
        total = 2 * args.settle + args.seconds + 10
        victim_proc = subprocess.Popen([sys.executable, __file__, "--victim", str(port), "--victim-seconds",
                                        str(total), "--victim-out", str(victim_out)], cwd=REPO)
        deadline = time.monotonic() + 60
        while not (victim_out.exists() and "ready" in victim_out.read_text()):
            if time.monotonic() > deadline or victim_proc.poll() is not None:
                raise RuntimeError(f"the victim did not connect:\n{log.read_text()[-2000:]}")
            await asyncio.sleep(0.2)
        t0 = time.time()
        before, _ = await sampled(server.pid, args.settle)
        t1 = time.time()
        during, outcome = await sampled(server.pid, args.seconds,
                                        ATTACKS[attack](port, args.seconds, sockets, args.scale))
        t2 = time.time()
        for socket in sockets:
            socket.close()
        sockets.clear()
        after, _ = await sampled(server.pid, args.settle)
        t3 = time.time()
    finally:
        for socket in sockets:
            socket.close()
        stopped = stop(server)
        if victim_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                victim_proc.wait(timeout=2 * args.settle + args.seconds + 30)
            if victim_proc.poll() is None:
                victim_proc.kill()
                victim_proc.wait()
    samples = [tuple(line) for line in map(json.loads, victim_out.read_text().splitlines()) if line[0] != "ready"]
    text = log.read_text(errors="replace")
    return {
        "attack": attack, "before": {**lag_figures(samples, t0, t1), **before},
        "during": {**lag_figures(samples, t1, t2), **during}, "after": {**lag_figures(samples, t2, t3), **after},
        "attacker_got": outcome if isinstance(outcome, str) else "(attack still running when its time ran out)",
        "sigint": stopped, "never_retrieved": text.count("Task exception was never retrieved"),
        "slow_viewers_closed": text.count("--max-send-buffer"), "path": PERSPECTIVE_PATH["path"],
    }


@contextlib.contextmanager
def old_checkout(ref: str):
    """The old server's code in a temporary git worktree, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="hostile-old-"))
    path.rmdir()
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), ref], cwd=REPO, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)


def print_table(results: list[dict]) -> None:
    header = ("attack", "server", "victim upd (before/during/after)", "lag p95 ms during (p50)",
              "RSS MB before/max/after", "CPU % before/during", "SIGINT", "never retrieved / slow closed",
              "attacker got")
    rows = []
    for r in results:
        b, d, a = r["before"], r["during"], r["after"]
        rows.append((r["attack"], r["server"], f"{b['updates']}/{d['updates']}/{a['updates']}",
                     f"{d['lag_p95_ms']} ({d['lag_p50_ms']})", f"{b['rss_mb']}/{d['rss_mb']}/{a['rss_mb']}",
                     f"{b['cpu_pct']}/{d['cpu_pct']}", r["sigint"],
                     f"{r['never_retrieved']} / {r['slow_viewers_closed']}", r["attacker_got"]))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def summary(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        if r["server"] != "new":
            continue
        d = r["during"]
        p95 = d["lag_p95_ms"]
        growth = d["rss_mb"] - r["before"]["rss_mb"]
        out.append({"figure": f"{r['attack']}: victim lag p95 during, updates", "value": f"{p95} ms, {d['updates']}",
                    "target": f"< {TARGET_P95_MS} ms", "met": p95 is not None and p95 < TARGET_P95_MS})
        out.append({"figure": f"{r['attack']}: server RSS growth, SIGINT", "value": f"+{growth} MB, {r['sigint']}",
                    "target": f"< +{TARGET_RSS_MB} MB, stopped", "met": growth < TARGET_RSS_MB
                    and r["sigint"] == "stopped on SIGINT"})
    return out


async def main_async(args) -> list[dict]:
    results = []
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hostile-")))
        dirs = {"new": REPO}
        if "old" in args.servers:
            dirs["old"] = stack.enter_context(old_checkout(args.old_ref))
        for attack in args.only or ATTACKS:
            for name in args.servers:
                print(f"--- {attack} vs {name} server", flush=True)
                result = {"server": name, **await run_one(dirs[name], attack, args, scratch)}
                print(json.dumps(result), flush=True)
                results.append(result)
        if args.keep_logs:
            shutil.copytree(scratch, args.keep_logs, dirs_exist_ok=True, ignore=shutil.ignore_patterns("chdb-*"))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Each hostile viewer the limits guard against, against the old and new server.")
    parser.add_argument("--only", nargs="+", choices=list(ATTACKS), metavar="ATTACK",
                        help=f"run only these ({', '.join(ATTACKS)})")
    parser.add_argument("--servers", nargs="+", choices=["old", "new"], default=["old", "new"])
    parser.add_argument("--old-ref", default=OLD_REF, help=f"git ref of the old server (default {OLD_REF})")
    parser.add_argument("--seconds", type=float, default=20, help="attack duration (default 20)")
    parser.add_argument("--settle", type=float, default=6, help="seconds measured before and after (default 6)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every attack's count (default 1)")
    parser.add_argument("--smoke", action="store_true", help="new server only, 1 s attacks at 1/10 scale")
    parser.add_argument("--json", metavar="PATH", help="write results and summary here")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the server logs here")
    parser.add_argument("--victim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--victim-seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--victim-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.servers, args.seconds, args.settle, args.scale = ["new"], 1, 1, 0.1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.victim:
        asyncio.run(victim(args.victim, args.victim_seconds, args.victim_out))
        return 0
    results = asyncio.run(main_async(args))
    print()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary(results)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
