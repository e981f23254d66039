"""
Fan-out: one POST /announce/ to 100, 1,000 and 5,000 sockets spread over two Daphne
processes, timed until the first, median and last socket has it; channels-redis'
RedisChannelLayer (what this project ships) and RedisPubSubChannelLayer side by side,
interleaved by restarting the stack (A B A B).

    python -m bench.fanout [--rounds 2] [--sizes 100 1000 5000] [--announcements 3]
"""

import argparse
import asyncio
import json
import statistics
import time

import websockets

from bench.common import fmt, running_stack, spread, write
from tests.load import open_sockets

LAYERS = {"redis": "RedisChannelLayer (shipped)", "pubsub": "RedisPubSubChannelLayer"}


async def announce_and_time(stack, session, sockets, text):
    """POST one announcement; return seconds until the first, median and last socket had it."""
    arrivals = []

    async def receive(ws):
        while json.loads(await asyncio.wait_for(ws.recv(), 120)).get("text") != text:
            pass
        arrivals.append(time.perf_counter())

    receivers = [asyncio.create_task(receive(ws)) for ws in sockets]
    await asyncio.sleep(0.2)  # every receiver is waiting
    sent = time.perf_counter()
    response = await asyncio.to_thread(stack.csrf_post, session, "/announce/", json={"text": text})
    assert response.status_code == 200, response.text
    await asyncio.gather(*receivers)
    delays = sorted(t - sent for t in arrivals)
    return delays[0], statistics.median(delays), delays[-1]


async def one_round(stack, sizes, announcements):
    """Return ({size: [(first, median, last), ...]}, {size: why it could not be reached})."""
    session, key = stack.login()
    sockets, timings, failures = [], {}, {}
    for size in sizes:
        print(f"  {size:,} sockets...", flush=True)
        try:
            sockets += await open_sockets(stack, key, size - len(sockets))
        except (TimeoutError, OSError, websockets.InvalidStatus) as exc:
            failures[size] = f"could not open {size:,} sockets: {exc}"
            print("  " + failures[size], flush=True)
            break
        timings[size] = [
            await announce_and_time(stack, session, sockets, f"{size}-{i}")
            for i in range(announcements)
        ]
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return timings, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--announcements", type=int, default=3)
    args = parser.parse_args()
    runs = {layer: {size: [] for size in args.sizes} for layer in LAYERS}
    failed = {layer: {} for layer in LAYERS}
    for round_ in range(args.rounds):
        for layer in LAYERS:
            print(f"round {round_ + 1}, {LAYERS[layer]}", flush=True)
            with running_stack(CHANNEL_LAYER=layer) as stack:
                timings, failures = asyncio.run(one_round(stack, args.sizes, args.announcements))
            for size, measured in timings.items():
                runs[layer][size] += measured
            failed[layer].update(failures)
    figures, table = (
        {"settings": vars(args), "layers": {}, "failed": failed},
        [["layer", "sockets", "first ms", "median ms", "last ms"]],
    )
    for layer, label in LAYERS.items():
        figures["layers"][layer] = {}
        for size in args.sizes:
            if not runs[layer][size]:
                table.append(
                    [label, f"{size:,}", "failed", failed[layer].get(size, "not reached"), ""]
                )
                continue
            first, median, last = ([t[i] * 1000 for t in runs[layer][size]] for i in range(3))
            entry = {
                "first_ms": spread(first),
                "median_ms": spread(median),
                "last_ms": spread(last),
            }
            figures["layers"][layer][size] = entry
            table.append(
                [
                    label,
                    f"{size:,}",
                    fmt(entry["first_ms"]),
                    fmt(entry["median_ms"]),
                    fmt(entry["last_ms"]),
                ]
            )
    write("fanout", figures, table)
    chart(figures, args.sizes)


def chart(figures, sizes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import RESULTS

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for i, (layer, label) in enumerate(LAYERS.items()):
        lasts = [
            figures["layers"][layer].get(size, {}).get("last_ms", {}).get("median", 0)
            for size in sizes
        ]
        ax.bar([x + i * width for x in range(len(sizes))], lasts, width, label=label)
    ax.set_xticks([x + width / 2 for x in range(len(sizes))], [f"{s:,} sockets" for s in sizes])
    ax.set_ylabel("ms until the last socket has it")
    ax.set_title("Fan-out of one announcement over two Daphne processes (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "fanout.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
