"""What every benchmark shares: a real stack, the statistics, and the report files."""

import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import websockets

from tests.stack import Stack

GENERATORS = 3  # load generator processes (Client)
CONNECT_AT_ONCE = 50  # handshakes under way at once, per generator process

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def running_stack(asgi_processes=2, **env):
    """The native runtime, as `make up-cross-domain` runs it, on free ports."""
    # A benchmark stopped with SIGTERM still stops its stack (the with block below).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as state,
        Stack("cross-domain", state, asgi_processes=asgi_processes, env=env) as stack,
    ):
        try:
            yield stack
        except Exception:
            # The stack's logs go with its directory: say what they hold of the failure first.
            notable = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|Error|\" (403|5\d\d) ")
            lines = [line for line in stack.log_text().splitlines() if notable.search(line)]
            print("The stack's logs, warnings and errors:", *lines[-60:], sep="\n", file=sys.stderr)
            raise


def fresh_login(stack, name):
    """Log in as a new user `name`: each batch of sockets its own user, as in production,
    where no one user holds thousands (WS_MAX_SOCKETS_PER_USER counts a closed socket
    until its process has told Redis, which a mass close can outrun)."""
    stack.create_user(name, "bench-pass")
    return stack.login(name, "bench-pass")


def spread(values):
    """Median, min and max of several runs."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": len(values),
    }


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def machine():
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def write(name, figures, table):
    """bench/results/<name>.json and <name>.md (a Markdown table: header row, then rows)."""
    RESULTS.mkdir(exist_ok=True)
    figures = {"machine": machine(), **figures}
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    header, *rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def fmt(figure, digits=0, scale=1):
    """'median (min–max)' of a spread."""
    m, lo, hi = (round(figure[k] * scale, digits) for k in ("median", "min", "max"))
    if digits == 0:
        m, lo, hi = int(m), int(lo), int(hi)
    return f"{m} ({lo}–{hi})"


def bar_chart(name, title, labels, figures, ylabel, scale=1):
    """A PNG bar chart of medians with min–max whiskers: bench/results/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = [f["median"] * scale for f in figures]
    low = [(f["median"] - f["min"]) * scale for f in figures]
    high = [(f["max"] - f["median"]) * scale for f in figures]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, medians, yerr=[low, high], capsize=4, color="#4a7ab5")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    plt.close(fig)


def generator(conn, port, host, origin, ways):
    asyncio.run(serve(conn, port, host, origin, ways))


async def serve(conn, port, host, origin, ways):
    """Answer the commands open, arm, collect, close and stop, one at a time."""
    sockets = {way: [] for way in ways}
    pending = []
    while True:
        command, *args = await asyncio.to_thread(conn.recv)
        if command == "open":
            way, path, count = args
            try:
                sockets[way] += await open_many(port, host, origin, path, count)
                conn.send(len(sockets[way]))
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                conn.send(f"{type(exc).__name__}: {exc}")
        elif command == "arm":
            way, text = args
            pending = [asyncio.create_task(arrival(ws, text)) for ws in sockets[way]]
            await asyncio.sleep(0)  # every receiver is waiting
            conn.send("armed")
        elif command == "collect":
            got = await asyncio.gather(*pending, return_exceptions=True)
            conn.send([t for t in got if isinstance(t, float)])
        elif command == "close":
            (way,) = args
            await asyncio.gather(*(ws.close() for ws in sockets[way]), return_exceptions=True)
            sockets[way] = []
            conn.send(0)
        else:
            return


async def open_many(port, host, origin, path, count):
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one():
        async with gate:
            return await websockets.connect(
                f"ws://{host}:{port}{path}",
                host="127.0.0.1",
                port=port,
                origin=origin,
                open_timeout=60,
                ping_interval=None,  # Daphne pings; the client answers
            )

    return await asyncio.gather(*(one() for _ in range(count)))


async def arrival(ws, text):
    """When (the host's monotonic clock) the frame carrying `text` reached this socket."""
    while json.loads(await asyncio.wait_for(ws.recv(), 120)).get("text") != text:
        pass
    return time.monotonic()


class Client:
    """
    The load generator of the socket benchmarks: GENERATORS processes, used as one, each
    holding its share of the sockets (a process may open 20,000 files here), each socket
    named by a way (e.g. "floor", "project"). Arrivals are timed on the host's monotonic
    clock, which every process shares.
    """

    def __init__(self, stack, ways):
        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        for _ in range(GENERATORS):
            parent, child = context.Pipe()
            args = (child, stack.public_port, stack.realtime_host, stack.app_origin, list(ways))
            process = context.Process(target=generator, args=args, daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def ask(self, *commands):
        """Send each generator its command; return their answers."""
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)
        return [pipe.recv() for pipe in self.pipes]

    def all(self, *command):
        return self.ask(*[command] * GENERATORS)

    def open(self, way, path, total):
        """Bring the open sockets of `way` to `total`, shared out; None, or why not."""
        have = sum(self.all("open", way, path, 0))
        shares = [(total - have) // GENERATORS] * GENERATORS
        shares[0] += (total - have) - sum(shares)
        answers = self.ask(*[("open", way, path, share) for share in shares])
        failed = [a for a in answers if isinstance(a, str)]
        return failed[0] if failed else None

    def stop(self):
        for pipe in self.pipes:
            pipe.send(("stop",))
        for process in self.processes:
            process.join(10)
