"""
Held load: thousands of authenticated sockets across two Daphne processes, held open,
then one announcement delivered to every one of them.

    make soak                                  (5,000 sockets, held 60 s)
    python -m bench.soak --sockets 1000 --hold 10

Prints the memory per socket and the delivery times, and writes bench/results/soak.json.
tests/test_soak.py runs the same code (tests/load.py) with a few hundred sockets in
`make test`.
"""

import argparse
import asyncio
import json
import os

from bench.common import RESULTS, running_stack
from tests.load import soak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--hold", type=float, default=60)
    args = parser.parse_args()
    with running_stack() as stack:
        figures = asyncio.run(soak(stack, args.sockets, args.hold))
    figures["machine"] = f"{len(os.sched_getaffinity(0))} cores"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    for name, value in figures.items():
        print(f"{name:28} {value}")


if __name__ == "__main__":
    main()
