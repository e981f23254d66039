"""
Held load: thousands of authenticated sockets across two Daphne processes, held open,
then one announcement delivered to every one of them.

    make soak                                  (5,000 sockets, held 60 s)
    python bench/soak.py --sockets 1000 --hold 10

Prints the memory per socket and the delivery times, and writes bench/results/soak.json.
tests/test_soak.py runs the same code with a few hundred sockets in `make test`.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.stack import Stack  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONNECT_AT_ONCE = 100


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def daphne_rss(stack):
    return sum(rss_kib(int(stack.supervisorctl("pid", p).strip())) for p in stack.daphne_programs)


async def open_sockets(stack, key, count):
    """Open `count` live-feed sockets through nginx, CONNECT_AT_ONCE at a time."""
    sockets = []
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one():
        async with gate:
            ws = await stack.connect(f"/ws/live/?session_key={key}", open_timeout=60)
            sockets.append(ws)

    await asyncio.gather(*(one() for _ in range(count)))
    return sockets


async def soak(stack, sockets=5000, hold=60):
    """Hold `sockets` authenticated sockets for `hold` seconds, then announce once; return figures."""
    session, key = stack.login()
    baseline = daphne_rss(stack)
    began = time.monotonic()
    opened = await open_sockets(stack, key, sockets)
    connect_seconds = time.monotonic() - began
    loaded = daphne_rss(stack)
    await asyncio.sleep(hold)
    still_open = sum(ws.close_code is None for ws in opened)

    arrivals = []

    async def receive(ws):
        frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        arrivals.append(time.monotonic())
        return frame

    receivers = [asyncio.create_task(receive(ws)) for ws in opened]
    sent = time.monotonic()
    response = await asyncio.to_thread(stack.csrf_post, session, "/announce/", json={"text": "soak"})
    frames = await asyncio.gather(*receivers, return_exceptions=True)
    delivered = sum(isinstance(f, dict) and f.get("text") == "soak" for f in frames)
    await asyncio.gather(*(ws.close() for ws in opened))
    delays = sorted(t - sent for t in arrivals)
    return {
        "sockets": sockets,
        "daphne_processes": len(stack.daphne_ports),
        "hold_seconds": hold,
        "connect_seconds": round(connect_seconds, 2),
        "still_open_after_hold": still_open,
        "announce_status": response.status_code,
        "delivered": delivered,
        "delivery_first_ms": round(delays[0] * 1000, 1) if delays else None,
        "delivery_median_ms": round(statistics.median(delays) * 1000, 1) if delays else None,
        "delivery_last_ms": round(delays[-1] * 1000, 1) if delays else None,
        "daphne_rss_baseline_mib": round(baseline / 1024, 1),
        "daphne_rss_loaded_mib": round(loaded / 1024, 1),
        "kib_per_socket": round((loaded - baseline) / sockets, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--hold", type=float, default=60)
    parser.add_argument("--port", type=int, default=23000, help="first of the stack's ports")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as state:
        stack = Stack("cross-domain", args.port, state).start()
        try:
            figures = asyncio.run(soak(stack, args.sockets, args.hold))
        finally:
            stack.stop()
    figures["machine"] = f"{len(__import__('os').sched_getaffinity(0))} cores"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    for name, value in figures.items():
        print(f"{name:28} {value}")


if __name__ == "__main__":
    main()
