"""
Capacity of one Daphne process, and what session re-checks cost.

Capacity: hold more and more authenticated idle sockets on one Daphne process and, at
each step, time three rounds of 150 new handshakes; the answer is the largest step whose
median p99 stays under 100 ms, with the memory each socket costs.

Re-check cost: with 5,000 authenticated sockets over two Daphne processes re-checking
every 5 s, count what Redis and the database do per second (Redis from INFO, database
queries from Daphne's "re-checked" log lines, two queries each).

Connect storm and hold, over two Daphne processes through nginx, with bench.common.Client
(the load generator processes of bench/fanout.py): the time to open 5,000 authenticated
sockets (session key) against 5,000 anonymous ones, interleaved in the same run; then
15,000 authenticated idle sockets held at once, the memory each costs Daphne, and one
announcement that must reach every one of them.

    python -m bench.capacity [--steps 0 500 1000 2000 3000 4000 6000 8000] [--hold 15000]
"""

import argparse
import asyncio
import re
import statistics
import time

import websockets
from redis import Redis

from bench.common import Client, fmt, fresh_login, percentile, running_stack, spread, write
from bench.handshake import handshakes, requests_for
from tests.load import daphne_rss, open_sockets

P99_LIMIT_MS = 100
RECHECK_SECONDS = 5
SETTLE_SECONDS = 3
PROBE_ROUNDS = 3  # the step's p99 is the median of three rounds' p99


async def ramp(stack, steps, probes):
    session, key = stack.login()
    held, rows = [], []
    baseline = daphne_rss(stack)
    for step in steps:
        p50s, p99s = [], []
        try:
            held += await open_sockets(stack, key, step - len(held))
            await asyncio.sleep(SETTLE_SECONDS)  # the new sockets are idle now
            for _ in range(PROBE_ROUNDS):
                specs = requests_for(stack, "session_key", probes, session, key)
                latencies, _ = await handshakes(stack, specs, 8)
                p50s.append(percentile(latencies, 0.5) * 1000)
                p99s.append(percentile(latencies, 0.99) * 1000)
        except (TimeoutError, OSError, websockets.InvalidHandshake) as exc:
            rows.append({"sockets": step, "failed": f"{type(exc).__name__}: {exc}"})
            print(rows[-1], flush=True)
            break
        p99 = statistics.median(p99s)
        rss = daphne_rss(stack)
        rows.append(
            {
                "sockets": step,
                "p50_ms": round(statistics.median(p50s), 1),
                "p99_ms": round(p99, 1),
                "p99_rounds_ms": [round(v, 1) for v in p99s],
                "rss_mib": round(rss / 1024, 1),
                "kib_per_socket": round((rss - baseline) / step, 1) if step else None,
            }
        )
        print(rows[-1], flush=True)
        if p99 > P99_LIMIT_MS:
            break
    await asyncio.gather(*(ws.close() for ws in held))
    return rows


async def recheck_load(stack, sockets, window):
    session, key = stack.login()
    held = await open_sockets(stack, key, sockets)
    redis = Redis(port=stack.redis_port)
    await asyncio.sleep(RECHECK_SECONDS * 2)  # every socket registered, re-checks running
    log_before = stack.log_text().count("re-checked")
    commands_before = redis.info("stats")["total_commands_processed"]
    calls_before = command_calls(redis)
    began = time.monotonic()
    await asyncio.sleep(window)
    seconds = time.monotonic() - began
    commands = redis.info("stats")["total_commands_processed"] - commands_before
    calls = {
        name: round((n - calls_before.get(name, 0)) / seconds, 1)
        for name, n in command_calls(redis).items()
        if n > calls_before.get(name, 0)
    }
    rechecks = stack.log_text().count("re-checked") - log_before
    took = [
        float(ms)
        for ms in re.findall(
            r"re-checked \d+ sessions of \d+ sockets in ([\d.]+) ms", stack.log_text()
        )
    ]
    await asyncio.gather(*(ws.close() for ws in held))
    return {
        "sockets": sockets,
        "recheck_every_s": RECHECK_SECONDS,
        "window_s": round(seconds, 1),
        "redis_commands_per_s": round(commands / seconds, 1),
        "redis_commands_per_s_by_name": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "db_queries_per_s": round(2 * rechecks / seconds, 2),
        "recheck_ms": spread(took) if took else None,
        # What the first design did, one re-check of 2 queries per socket per interval:
        "per_socket_design_db_queries_per_s": round(2 * sockets / RECHECK_SECONDS, 1),
    }


STORM_WAYS = {"anonymous": "/ws/live/", "authenticated": "/ws/live/?session_key={key}"}


def storm_and_hold(stack, storm, rounds, hold):
    """Connect storms, anonymous against authenticated, then `hold` authenticated sockets."""
    client = Client(stack, STORM_WAYS)
    # Memory per held socket is counted from the processes as they started, as make soak and
    # the ramp count it: the storms leave freed memory behind that the held sockets reuse, so
    # counted from after them a socket seemed to cost two thirds of what it does.
    baseline = daphne_rss(stack)
    storms: dict[str, list] = {way: [] for way in STORM_WAYS}
    failures = {}
    try:
        for round_ in range(rounds):
            order = list(STORM_WAYS) if round_ % 2 == 0 else list(reversed(STORM_WAYS))
            for way in order:
                _, key = fresh_login(stack, f"storm-{way}-{round_}")
                began = time.monotonic()
                failure = client.open(way, STORM_WAYS[way].format(key=key), storm)
                took = time.monotonic() - began
                client.all("close", way)
                time.sleep(SETTLE_SECONDS)
                if failure:
                    failures[f"storm {way}"] = failure
                else:
                    storms[way].append(took)
                print(f"storm {round_ + 1}, {storm:,} {way}: {took:.1f} s {failure or ''}")
        session, key = fresh_login(stack, "held")
        after_storms = daphne_rss(stack)
        began = time.monotonic()
        failure = client.open("authenticated", STORM_WAYS["authenticated"].format(key=key), hold)
        opened = time.monotonic() - began
        time.sleep(SETTLE_SECONDS)
        loaded = daphne_rss(stack)
        client.all("arm", "authenticated", "held")
        response = stack.csrf_post(session, "/announce/", json={"text": "held"})
        delivered = sum(len(share) for share in client.all("collect"))
        client.all("close", "authenticated")
    finally:
        client.stop()
    ratios = [a / n for a, n in zip(storms["authenticated"], storms["anonymous"], strict=False)]
    return {
        "storm_sockets": storm,
        "storm_seconds": {way: spread(t) for way, t in storms.items() if t},
        "storm_ratio": spread(ratios) if ratios else None,
        "hold_sockets": hold,
        "hold_failure": failure,
        "hold_open_seconds": round(opened, 1),
        "hold_announce_status": response.status_code,
        "hold_delivered": delivered,
        "daphne_rss_baseline_mib": round(baseline / 1024, 1),
        "daphne_rss_after_storms_mib": round(after_storms / 1024, 1),
        "daphne_rss_loaded_mib": round(loaded / 1024, 1),
        "kib_per_socket": round((loaded - baseline) / hold, 1),
        "failures": failures,
    }


def command_calls(redis):
    """{command: calls so far}, from INFO commandstats."""
    return {
        name.removeprefix("cmdstat_"): stats["calls"]
        for name, stats in redis.info("commandstats").items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[0, 500, 1000, 2000, 3000, 4000, 6000, 8000]
    )
    parser.add_argument("--probes", type=int, default=150)
    parser.add_argument("--recheck-sockets", type=int, default=5000)
    parser.add_argument("--window", type=float, default=30)
    parser.add_argument("--storm", type=int, default=5000)
    parser.add_argument("--storm-rounds", type=int, default=4)
    parser.add_argument("--hold", type=int, default=15000)
    args = parser.parse_args()
    with running_stack() as stack:
        held = storm_and_hold(stack, args.storm, args.storm_rounds, args.hold)
    with running_stack(asgi_processes=1) as stack:
        steps = asyncio.run(ramp(stack, args.steps, args.probes))
    with running_stack(WS_SESSION_RECHECK_SECONDS=RECHECK_SECONDS) as stack:
        recheck = asyncio.run(recheck_load(stack, args.recheck_sockets, args.window))
    under = [s for s in steps if s.get("p99_ms", P99_LIMIT_MS) < P99_LIMIT_MS]
    capacity = max(s["sockets"] for s in under) if under else 0
    figures = {
        "settings": vars(args),
        "steps": steps,
        "capacity_sockets": capacity,
        "recheck": recheck,
        "storm_and_hold": held,
    }
    table = [
        [
            "idle sockets on one Daphne",
            "handshake p50 ms",
            "p99 ms",
            "Daphne RSS MiB",
            "KiB per socket",
        ]
    ]
    table += [
        [f"{s['sockets']:,}", s["p50_ms"], s["p99_ms"], s["rss_mib"], s["kib_per_socket"] or "–"]
        if "failed" not in s
        else [f"{s['sockets']:,}", "failed", s["failed"][:80], "", ""]
        for s in steps
    ]
    table.append(
        [
            f"re-checks at {recheck['sockets']:,} sockets, every {RECHECK_SECONDS} s",
            f"DB {recheck['db_queries_per_s']} queries/s",
            f"Redis {recheck['redis_commands_per_s']} commands/s",
            f"{fmt(recheck['recheck_ms'], 1)} ms each" if recheck["recheck_ms"] else "",
            f"per-socket design: {recheck['per_socket_design_db_queries_per_s']} queries/s",
        ]
    )
    write("capacity", figures, table)
    storm_table(held)
    print(f"capacity: {capacity:,} idle sockets with p99 < {P99_LIMIT_MS} ms")


def storm_table(held):
    """bench/results/storm.md: the connect storm and the held sockets, over two processes."""
    rows = [["two Daphne processes, through nginx", "seconds", "÷ anonymous", "Daphne RSS MiB",
             "KiB per socket", "announcement reached"]]  # fmt: skip
    seconds, ratio = held["storm_seconds"], held["storm_ratio"]
    for way in STORM_WAYS:
        if way in seconds:
            to_anonymous = fmt(ratio, 2) if way == "authenticated" and ratio else "1.0"
            label = f"open {held['storm_sockets']:,} {way} sockets"
            rows.append([label, fmt(seconds[way], 1), to_anonymous, "", "", ""])
    rows.append(
        [
            f"hold {held['hold_sockets']:,} authenticated sockets",
            held["hold_open_seconds"],
            "",
            held["daphne_rss_loaded_mib"],
            held["kib_per_socket"],
            f"{held['hold_delivered']:,} of {held['hold_sockets']:,}",
        ]
    )
    write("storm", {"storm_and_hold": held}, rows)


if __name__ == "__main__":
    main()
