"""
PostgreSQL connection strategy, measured: Django's persistent connections (CONN_MAX_AGE=60,
what ships) against psycopg's pool (DATABASE_POOL=true, OPTIONS["pool"]), on two real stacks
side by side, in interleaved rounds: handshakes per second (session_key, through nginx), page
loads per second (logged in, through Gunicorn), and the connections each stack holds.

    python -m bench.postgres_pool [--rounds 4] [--count 200] [--concurrency 8]
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import sys
import time

import psycopg
import requests

from bench.common import fmt, percentile, running_stack, spread, write
from bench.handshake import handshakes, requests_for

STRATEGIES = {
    "persistent": ("persistent connections (CONN_MAX_AGE=60)", {}),
    "pool": ("psycopg pool (DATABASE_POOL=true, size 4)", {"DATABASE_POOL": "true"}),
}


def page_loads(stack, session, count, concurrency):
    """Load the logged-in home page `count` times; return (latencies, seconds)."""

    def load(_):
        client = requests.Session()
        client.cookies.update(session.cookies)
        began = time.perf_counter()
        response = stack.http(client, "GET", "/")
        assert response.status_code == 200, response.status_code
        return time.perf_counter() - began

    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(load, range(count)))
    return latencies, time.perf_counter() - began


def connections(stack):
    """Client connections to the app's database now."""
    with psycopg.connect(
        host=str(stack.state_dir / "postgres-socket"),
        port=stack.postgres_port,
        user="app",
        dbname="postgres",
    ) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app'").fetchone()
    return row[0] if row else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    runs = {name: {"handshakes": [], "pages": [], "connections": []} for name in STRATEGIES}
    with contextlib.ExitStack() as running:
        stacks = {
            name: running.enter_context(running_stack(DATABASE="postgres", **env))
            for name, (_, env) in STRATEGIES.items()
        }
        logins = {name: stack.login() for name, stack in stacks.items()}
        for round_ in range(args.rounds):
            order = list(STRATEGIES) if round_ % 2 == 0 else list(reversed(STRATEGIES))
            for name in order:
                stack, (session, key) = stacks[name], logins[name]
                specs = requests_for(stack, "session_key", args.count, session, key)
                latencies, seconds = asyncio.run(handshakes(stack, specs, args.concurrency))
                runs[name]["handshakes"].append(measure(latencies, seconds))
                latencies, seconds = page_loads(stack, session, args.count, args.concurrency)
                runs[name]["pages"].append(measure(latencies, seconds))
                runs[name]["connections"].append(connections(stack))
    report(runs, args)


def measure(latencies, seconds):
    return {
        "rate": len(latencies) / seconds,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
    }


def report(runs, args):
    figures = {"settings": vars(args), "strategies": {}}
    table = [
        ["strategy", "handshakes/s", "p99 ms", "pages/s", "p99 ms", "connections held"],
    ]
    for name, (label, _) in STRATEGIES.items():
        entry = {"label": label}
        for kind in ("handshakes", "pages"):
            entry[kind] = {
                "rate": spread([r["rate"] for r in runs[name][kind]]),
                "p99_ms": spread([r["p99"] * 1000 for r in runs[name][kind]]),
            }
        entry["connections"] = spread(runs[name]["connections"])
        figures["strategies"][name] = entry
        table.append(
            [
                label,
                fmt(entry["handshakes"]["rate"]),
                fmt(entry["handshakes"]["p99_ms"], 1),
                fmt(entry["pages"]["rate"]),
                fmt(entry["pages"]["p99_ms"], 1),
                fmt(entry["connections"]),
            ]
        )
    write("postgres-pool", figures, table)


if __name__ == "__main__":
    sys.exit(main())
