"""
What one Redis round trip costs a Daphne process, against what the ticket goal leaves for it.

A ticket is single-use across every process, so its handshake must ask a store they share: one
round trip that a bare handshake does not make. The goal (issue 13) asks a ticket handshake for
at least 0.90x bare's rate, which leaves a ticket 1/0.9 - 1 of bare's CPU for everything it
adds. This measures, side by side in one run on the real stack, bare Daphne's CPU per handshake
(as bench/handshake.py does) and the CPU of one lone round trip to the stack's Redis, awaited
on asyncio as a handshake awaits it: the bare minimum (PING on an asyncio stream, no client
library), redis-py's PING, and redis-py running the redemption script (EVALSHA, as
contract.tickets sends it, for a ticket that does not exist).

    python -m bench.redis_roundtrip [--rounds 5] [--handshakes 600] [--calls 3000]
"""

import argparse
import asyncio
import time
import uuid

import redis.asyncio
from redis.commands.core import AsyncScript

from bench.common import fmt, running_stack, spread, write
from bench.handshake import cpu_seconds, daphne_pids, handshakes, requests_for
from contract.tickets import REDEEM_SCRIPT, redis_key

GOAL = 0.90  # a ticket handshake's rate, as a share of bare's

WAYS = {
    "stream": "PING, asyncio stream (no client library)",
    "ping": "PING, redis-py",
    "redeem": "redemption script, redis-py (EVALSHA)",
}


async def round_trips(port, calls):
    """CPU microseconds per awaited call, each way (this process only: Redis is apart)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # redis-py's stock pool, as the batched scripts use it (contract.redis_clients).
    client = redis.asyncio.Redis.from_pool(
        redis.asyncio.ConnectionPool.from_url(f"redis://127.0.0.1:{port}")
    )
    script = AsyncScript(client, REDEEM_SCRIPT)
    absent = redis_key(uuid.uuid4().hex + "x" * 11)

    async def stream():
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        await reader.readuntil(b"\r\n")

    async def redeem():
        await script(keys=[absent], args=[uuid.uuid4().hex, 5, 120])

    costs = {}
    for name, call in (("stream", stream), ("ping", client.ping), ("redeem", redeem)):
        await call()  # connected, and the script loaded, before the clock starts
        began = time.process_time()
        for _ in range(calls):
            await call()
        costs[name] = (time.process_time() - began) / calls * 1e6
    writer.close()
    await client.aclose()
    return costs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=600)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    bare, costs = [], {name: [] for name in WAYS}
    with running_stack(ASGI_APP="bench.asgi:application") as stack:
        session, key = stack.login()
        asyncio.run(handshakes(stack, requests_for(stack, "none", 100, session, key), 8))
        pids = daphne_pids(stack)
        for _ in range(args.rounds):
            specs = requests_for(stack, "none", args.handshakes, session, key)
            used = cpu_seconds(pids)
            latencies, _ = asyncio.run(handshakes(stack, specs, 16))
            bare.append((cpu_seconds(pids) - used) / len(latencies) * 1e6)
            for name, cost in asyncio.run(round_trips(stack.redis_port, args.calls)).items():
                costs[name].append(cost)
    report(bare, costs, args)


def report(bare, costs, args):
    # Per round: the budget from that round's bare handshakes, each way's share of it.
    budgets = [cpu * (1 / GOAL - 1) for cpu in bare]
    figures = {
        "settings": vars(args),
        "bare_handshake_cpu_us": spread(bare),
        "budget_us": spread(budgets),
        "ways": {},
    }
    table = [["", "CPU µs (Daphne's per handshake; the caller's per round trip)",
              f"÷ what {GOAL}× bare leaves a ticket"]]  # fmt: skip
    table.append(["bare handshake (no auth middleware)", fmt(figures["bare_handshake_cpu_us"]), ""])
    table.append([f"left for a ticket at {GOAL}× (1/{GOAL} − 1 of bare)", fmt(figures["budget_us"]),
                  "1.0"])  # fmt: skip
    for name, label in WAYS.items():
        share = [cost / budget for cost, budget in zip(costs[name], budgets, strict=True)]
        entry = {"label": label, "cpu_us": spread(costs[name]), "of_budget": spread(share)}
        figures["ways"][name] = entry
        table.append([f"one round trip: {label}", fmt(entry["cpu_us"]),
                      fmt(entry["of_budget"], 2)])  # fmt: skip
    write("redis-roundtrip", figures, table)


if __name__ == "__main__":
    main()
