"""
Fan-out: one announcement to 1,000, 5,000 and 15,000 sockets over two Daphne processes,
side by side with its floor, in the same run, on the same stack, received by the same client:

    floor    bare Daphne (bench/asgi.py's /bench/floor/): no Django, no Channels, no channel
             layer; each process writes one frame from memory to each of its sockets
    project  /ws/live/ sockets authenticated by session key; one POST /announce/

Both through nginx, interleaved by round (floor first, then project first). The client is
bench.common.Client: GENERATORS processes holding an equal share of the sockets each, timing
arrivals on the host's monotonic clock. Per size and way: ms until the
first, median and last socket has it; the last socket's time ÷ the floor's in the same
round; and Redis commands and bytes sent per announcement (INFO deltas; idle polling
included, so the floor shows what is not the announcement's).

    python -m bench.fanout [--rounds 2] [--sizes 1000 5000 15000] [--announcements 3]
"""

import argparse
import concurrent.futures
import json
import statistics
import time

import redis
import requests

from bench.common import GENERATORS, Client, fmt, fresh_login, running_stack, spread, write

WAYS = {
    "floor": "floor: bare Daphne, frame from memory",
    "project": "project: /ws/live/, POST /announce/",
}


# The two ways, measured.


def redis_traffic(client):
    stats = client.info("stats")
    return stats["total_commands_processed"], stats["total_net_output_bytes"]


def trigger_floor(stack, text):
    """POST the frame to every Daphne process at once; return each one's send-loop ms."""
    body = json.dumps({"type": "announcement", "text": text})

    def post(port):
        url = f"http://127.0.0.1:{port}/bench/floor/send/"
        return requests.post(url, data=body, timeout=60).json()["loop_ms"]

    with concurrent.futures.ThreadPoolExecutor(len(stack.daphne_ports)) as pool:
        return list(pool.map(post, stack.daphne_ports))


def one_announcement(stack, client, session, way, text, redis_client):
    """Arm every socket, send once; return (first, median, last) seconds and Redis traffic."""
    client.all("arm", way, text)
    before = redis_traffic(redis_client)
    sent = time.monotonic()
    loops = None
    if way == "floor":
        loops = trigger_floor(stack, text)
    else:
        response = stack.csrf_post(session, "/announce/", json={"text": text})
        assert response.status_code == 200, response.text
    answered = time.monotonic() - sent  # the trigger's round trip (POST /announce/, or both)
    arrivals = sorted(t for share in client.all("collect") for t in share)
    after = redis_traffic(redis_client)
    delays = [t - sent for t in arrivals] or [float("nan")]  # nan: reached no socket
    return {
        "delivered": len(arrivals),
        "first": delays[0],
        "median": statistics.median(delays),
        "last": delays[-1],
        "redis_commands": after[0] - before[0],
        "redis_bytes_out": after[1] - before[1],
        "send_loop_ms": max(loops) if loops else None,
        "answered_ms": answered * 1000,
    }


def one_way(stack, client, way, round_, args, runs, failed):
    session, key = fresh_login(stack, f"fanout-{way}-{round_}")
    path = "/bench/floor/" if way == "floor" else f"/ws/live/?session_key={key}"
    redis_client = redis.Redis(port=stack.redis_port)
    try:
        for size in args.sizes:
            print(f"  {WAYS[way]}: {size:,} sockets...", flush=True)
            began = time.monotonic()
            failure = client.open(way, path, size)
            if failure:
                failed[way][size] = f"could not open {size:,} sockets: {failure}"
                print("  " + failed[way][size], flush=True)
                return
            print(f"    opened in {time.monotonic() - began:.1f} s", flush=True)
            time.sleep(1)  # the handshakes are over
            measured = [
                one_announcement(stack, client, session, way, f"{way}-{size}-{i}", redis_client)
                for i in range(args.announcements)
            ]
            runs[way][size].append(measured)
            last = statistics.median(m["last"] for m in measured)
            lost = sum(size - m["delivered"] for m in measured)
            print(f"    last socket after {last * 1000:.0f} ms (median), {lost} lost", flush=True)
    finally:
        client.all("close", way)
        time.sleep(2)  # nginx and Daphne let the closed sockets go


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 15000])
    parser.add_argument("--announcements", type=int, default=3)
    args = parser.parse_args()
    # runs[way][size]: one list of announcements per round
    runs = {way: {size: [] for size in args.sizes} for way in WAYS}
    failed = {way: {} for way in WAYS}
    with running_stack(ASGI_APP="bench.asgi:application") as stack:
        client = Client(stack, WAYS)
        try:
            for round_ in range(args.rounds):
                order = list(WAYS) if round_ % 2 == 0 else list(reversed(WAYS))
                for way in order:
                    print(f"round {round_ + 1}, {WAYS[way]}", flush=True)
                    one_way(stack, client, way, round_, args, runs, failed)
        finally:
            client.stop()
    report(runs, failed, args)


def report(runs, failed, args):
    figures = {"settings": {**vars(args), "generators": GENERATORS}, "ways": {}, "failed": failed}
    table = [
        [
            "sockets",
            "way",
            "first ms",
            "median ms",
            "last ms",
            "last ÷ floor",
            "Redis commands / announcement",
            "Redis KiB out / announcement",
        ]
    ]
    for size in args.sizes:
        for way, label in WAYS.items():
            rounds = runs[way][size]
            if not rounds:
                reason = failed[way].get(size, "not reached")
                table.append([f"{size:,}", label, "failed", reason[:60], "", "", "", ""])
                continue
            every = [m for measured in rounds for m in measured]
            entry = {
                key: spread([m[key] * 1000 for m in every]) for key in ("first", "median", "last")
            }
            entry = {f"{key}_ms": value for key, value in entry.items()}
            entry["lost"] = sum(size - m["delivered"] for m in every)
            entry["redis_commands"] = spread([m["redis_commands"] for m in every])
            entry["redis_kib_out"] = spread([m["redis_bytes_out"] / 1024 for m in every])
            entry["answered_ms"] = spread([m["answered_ms"] for m in every])
            loops = [m["send_loop_ms"] for m in every if m["send_loop_ms"] is not None]
            if loops:
                entry["send_loop_ms"] = spread(loops)
            # Within each round: the median last socket, against the floor's in that round.
            floors = runs["floor"][size]
            if len(floors) == len(rounds):
                entry["last_to_floor"] = spread(
                    [
                        statistics.median(m["last"] for m in mine)
                        / statistics.median(m["last"] for m in floor)
                        for mine, floor in zip(rounds, floors, strict=True)
                    ]
                )
            figures["ways"].setdefault(way, {})[size] = entry
            table.append(
                [
                    f"{size:,}",
                    label,
                    fmt(entry["first_ms"]),
                    fmt(entry["median_ms"]),
                    fmt(entry["last_ms"]),
                    fmt(entry["last_to_floor"], 2) if "last_to_floor" in entry else "",
                    fmt(entry["redis_commands"]),
                    fmt(entry["redis_kib_out"], 1),
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
    for i, (way, label) in enumerate(WAYS.items()):
        lasts = [
            figures["ways"].get(way, {}).get(size, {}).get("last_ms", {}).get("median", 0)
            for size in sizes
        ]
        ax.bar([x + i * width for x in range(len(sizes))], lasts, width, label=label)
    ax.set_xticks([x + width / 2 for x in range(len(sizes))], [f"{s:,} sockets" for s in sizes])
    ax.set_ylabel("ms until the last socket has it")
    ax.set_title("One announcement over two Daphne processes, against the floor (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "fanout.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
