"""
Load on a real stack, shared by the soak test and the benchmarks: many sockets opened at
once, held, and reached by one announcement.
"""

import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

CONNECT_AT_ONCE = 100


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def daphne_rss(stack):
    return sum(rss_kib(int(stack.supervisorctl("pid", p).strip())) for p in stack.daphne_programs)


def fanout_totals(stack):
    """(seconds, count) of split_fanout_seconds so far, summed over the Daphne processes."""
    return tuple(stack.metric(f"split_fanout_seconds_{part}") for part in ("sum", "count"))


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
    """Hold `sockets` authenticated sockets `hold` seconds, announce once; return figures."""
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
    fanout_before = fanout_totals(stack)
    sent = time.monotonic()
    response = await asyncio.to_thread(
        stack.csrf_post, session, "/announce/", json={"text": "soak"}
    )
    frames = await asyncio.gather(*receivers, return_exceptions=True)
    delivered = sum(isinstance(f, dict) and f.get("text") == "soak" for f in frames)
    await asyncio.gather(*(ws.close() for ws in opened))
    delays = sorted(t - sent for t in arrivals)
    # Daphne's own time, from the announcement recorded to its last socket handed it: the
    # client's times above include reading every frame in this one process.
    (seconds, count), (seconds_before, count_before) = fanout_totals(stack), fanout_before
    handed = (seconds - seconds_before) / (count - count_before) if count > count_before else None
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
        "daphne_fanout_ms": round(handed * 1000, 1) if handed is not None else None,
        "daphne_rss_baseline_mib": round(baseline / 1024, 1),
        "daphne_rss_loaded_mib": round(loaded / 1024, 1),
        "kib_per_socket": round((loaded - baseline) / sockets, 1),
    }


class Announcer:
    """
    POST /announce/ every 10 ms from a thread while a test churns sockets. Leaving the block
    fails if any announcement was refused: a thread's own assert would be lost.
    """

    def __init__(self, stack, session, text="churn"):
        self.stack, self.session, self.text = stack, session, text
        self.sent, self.refused = 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            response = self.stack.csrf_post(self.session, "/announce/", json={"text": self.text})
            if response.status_code == 200:
                self.sent += 1
            else:
                self.refused.append(response.status_code)
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        assert self.refused == [], f"announcements refused: {self.refused[:5]}"
