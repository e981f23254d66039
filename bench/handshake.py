"""
Handshake cost through nginx on the real stack: handshakes per second and latency for
/ws/whoami/ with five ways of authenticating, run interleaved (in a rotating order) so a
noisy machine does not decide a comparison; the session key twice, as a page's sockets bring
one session again and again (3), and each handshake a session no process has read yet (6).
Two stacks run side by side, one on SQLite and one on PostgreSQL (DATABASE=postgres), and
each round measures every way on both:
bench/results/handshake.* and handshake-postgres.*, from the same run.

    python -m bench.handshake [--rounds 5] [--handshakes 200] [--concurrency 16]

The load generator is Python websockets on asyncio; the run also measures the shipped
fallback with one generator process and with two, to show the generator is not the limit.
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import time
from pathlib import Path

from bench.common import bar_chart, fmt, percentile, running_stack, spread, write

VARIANTS = {
    "none": "(1) no auth middleware",
    "channels": "(2) Channels AuthMiddlewareStack, cookie",
    "session_key": "(3) session_key fallback",
    "ticket_query": "(4) ticket in query string",
    "ticket_header": "(5) ticket in Sec-WebSocket-Protocol",
    "session_key_new": "(6) session_key, each a new session",
}


def requests_for(stack, variant, count, session, key):
    """Everything needed to open `count` sockets the `variant` way (tickets minted now)."""
    if variant == "session_key_new":
        # A session no process has read yet, each: (3) brings one session again and again,
        # as a page's sockets do, which a process trusts once it has read it.
        return [{"path": f"/ws/whoami/?session_key={k}"} for k in stack.new_sessions(count)]
    if variant == "none":
        return [{"path": "/bench/none/whoami/"}] * count
    if variant == "channels":
        return [{"path": "/bench/channels/whoami/", "cookie": f"sessionid={key}"}] * count
    if variant == "session_key":
        return [{"path": f"/ws/whoami/?session_key={key}"}] * count
    tickets = [stack.ticket(session) for _ in range(count)]
    if variant == "ticket_query":
        return [{"path": f"/ws/whoami/?ticket={t}"} for t in tickets]
    return [{"path": "/ws/whoami/", "subprotocols": ["realtime", f"ticket.{t}"]} for t in tickets]


async def handshakes(stack, specs, concurrency):
    """Open every socket, read its whoami frame, close it; return (latencies, seconds)."""
    queue = list(specs)
    latencies = []

    async def worker():
        while queue:
            spec = queue.pop()
            began = time.perf_counter()
            kwargs = {"subprotocols": spec["subprotocols"]} if "subprotocols" in spec else {}
            async with stack.connect(spec["path"], cookie=spec.get("cookie"), **kwargs) as ws:
                frame = json.loads(await ws.recv())
            latencies.append(time.perf_counter() - began)
            expected = spec["path"].startswith("/bench/none/")
            assert frame["authenticated"] is not expected, frame  # every way but (1) is known

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - began


def daphne_pids(stack):
    return [int(stack.supervisorctl("pid", program)) for program in stack.daphne_programs]


def cpu_seconds(pids):
    """CPU time (user and system) the processes have used so far, from Linux's /proc."""
    used = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used += int(fields[11]) + int(fields[12])  # utime, stime: clock ticks
    return used / os.sysconf("SC_CLK_TCK")


def generator_process(stack, specs, concurrency, results):
    latencies, seconds = asyncio.run(handshakes(stack, specs, concurrency))
    results.put((len(latencies), seconds))


def with_generators(stack, specs, concurrency, processes):
    """Handshakes per second with the load split over `processes` generator processes."""
    results = multiprocessing.Queue()
    share = len(specs) // processes
    workers = [
        multiprocessing.Process(
            target=generator_process,
            args=(stack, specs[i * share : (i + 1) * share], concurrency // processes, results),
        )
        for i in range(processes)
    ]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done = sum(results.get()[0] for _ in workers)
    return done / (time.perf_counter() - began)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    names = list(VARIANTS)
    databases = ("sqlite", "postgres")
    runs = {db: {name: [] for name in names} for db in databases}
    generators = {1: [], 2: []}
    env = {"WS_TICKET_TTL": 600, "ASGI_APP": "bench.asgi:application"}
    with contextlib.ExitStack() as running:
        stacks = {db: running.enter_context(running_stack(DATABASE=db, **env)) for db in databases}
        logins = {db: stack.login() for db, stack in stacks.items()}
        for db, stack in stacks.items():
            session, key = logins[db]
            warm_up = requests_for(stack, "session_key", 50, session, key)
            asyncio.run(handshakes(stack, warm_up, 8))
        daphnes = {db: daphne_pids(stack) for db, stack in stacks.items()}
        for round_ in range(args.rounds):
            # A new order each round (the same in every run, seeded by the round): a way runs
            # in different positions and after different ways, so neither decides a comparison
            # (a rotation keeps who runs after whom).
            for name in random.Random(round_).sample(names, len(names)):
                for db in databases if round_ % 2 == 0 else reversed(databases):
                    stack, (session, key) = stacks[db], logins[db]
                    specs = requests_for(stack, name, args.handshakes, session, key)
                    cpu = cpu_seconds(daphnes[db])
                    latencies, seconds = asyncio.run(handshakes(stack, specs, args.concurrency))
                    runs[db][name].append(
                        {
                            "rate": len(latencies) / seconds,
                            "p50": percentile(latencies, 0.5),
                            "p99": percentile(latencies, 0.99),
                            "cpu_ms": (cpu_seconds(daphnes[db]) - cpu) / len(latencies) * 1000,
                        }
                    )
            stack, (session, key) = stacks["sqlite"], logins["sqlite"]
            for processes in (1, 2) if round_ % 2 == 0 else (2, 1):
                specs = requests_for(stack, "session_key", args.handshakes, session, key)
                generators[processes].append(
                    with_generators(stack, specs, args.concurrency, processes)
                )
    report(runs["sqlite"], generators, args)
    report_postgres(runs, args)


def report_postgres(runs, args):
    """The PostgreSQL table: each way as on SQLite, and its ratio to SQLite in the same round."""
    figures = {"settings": vars(args), "variants": {}}
    table = [["way, on PostgreSQL", "handshakes/s", "p50 ms", "p99 ms", "÷ same way on SQLite"]]
    for name, label in VARIANTS.items():
        pg, lite = runs["postgres"][name], runs["sqlite"][name]
        entry = {
            "label": label,
            "rate": spread([r["rate"] for r in pg]),
            "p50_ms": spread([r["p50"] * 1000 for r in pg]),
            "p99_ms": spread([r["p99"] * 1000 for r in pg]),
            "ratio_to_sqlite": spread(
                [p["rate"] / s["rate"] for p, s in zip(pg, lite, strict=True)]
            ),
        }
        figures["variants"][name] = entry
        table.append(
            [
                label,
                fmt(entry["rate"]),
                fmt(entry["p50_ms"], 1),
                fmt(entry["p99_ms"], 1),
                fmt(entry["ratio_to_sqlite"], 2),
            ]
        )
    write("handshake-postgres", figures, table)


def report(runs, generators, args):
    figures = {"settings": vars(args), "variants": {}}
    table = [
        ["way", "handshakes/s", "p50 ms", "p99 ms", "÷ (1) none", "÷ (2) Channels",
         "Daphne CPU ms each", "(1)'s CPU ÷ this"],
    ]  # fmt: skip
    for name, label in VARIANTS.items():
        rates = [r["rate"] for r in runs[name]]
        # Ratios within each round: A and B measured side by side, minutes apart at most.
        to_none = [r["rate"] / n["rate"] for r, n in zip(runs[name], runs["none"], strict=True)]
        # The same comparison by Daphne's CPU time per handshake, which a busy machine does
        # not stretch as it stretches the clock: it says the rate ratio is not noise.
        cpu_to_none = [
            n["cpu_ms"] / r["cpu_ms"] for r, n in zip(runs[name], runs["none"], strict=True)
        ]
        to_channels = [
            r["rate"] / c["rate"] for r, c in zip(runs[name], runs["channels"], strict=True)
        ]
        entry = {
            "label": label,
            "rate": spread(rates),
            "p50_ms": spread([r["p50"] * 1000 for r in runs[name]]),
            "p99_ms": spread([r["p99"] * 1000 for r in runs[name]]),
            "ratio_to_none": spread(to_none),
            "ratio_to_channels": spread(to_channels),
            "daphne_cpu_ms": spread([r["cpu_ms"] for r in runs[name]]),
            "cpu_ratio_to_none": spread(cpu_to_none),
        }
        figures["variants"][name] = entry
        table.append(
            [
                label,
                fmt(entry["rate"]),
                fmt(entry["p50_ms"], 1),
                fmt(entry["p99_ms"], 1),
                fmt(entry["ratio_to_none"], 2),
                fmt(entry["ratio_to_channels"], 2),
                fmt(entry["daphne_cpu_ms"], 2),
                fmt(entry["cpu_ratio_to_none"], 2),
            ]
        )
    one, two = spread(generators[1]), spread(generators[2])
    figures["generator"] = {
        "one_process": one,
        "two_processes": two,
        "ratio_two_to_one": spread(
            [b / a for a, b in zip(generators[1], generators[2], strict=True)]
        ),
    }
    table.append(
        [
            "(3) with 1 generator process → 2",
            f"{fmt(one)} → {fmt(two)}",
            "",
            "",
            "",
            f"×{figures['generator']['ratio_two_to_one']['median']:.2f}",
            "",
            "",
        ]
    )
    write("handshake", figures, table)
    bar_chart(
        "handshake",
        "WebSocket handshakes per second through nginx (median, min–max)",
        [
            label.split(" ", 1)[0] + "\n" + label.split(" ", 1)[1][:22]
            for label in VARIANTS.values()
        ],
        [figures["variants"][n]["rate"] for n in VARIANTS],
        "handshakes/s",
    )


if __name__ == "__main__":
    main()
