"""
The soak benchmark's code (tests/load.py), small: a few hundred authenticated sockets,
held, all reached.
"""

import asyncio

from tests.load import soak


def test_a_few_hundred_sockets_held_and_all_reached(cross_stack):
    figures = asyncio.run(soak(cross_stack, sockets=300, hold=3))
    assert figures["still_open_after_hold"] == 300
    assert figures["announce_status"] == 200
    assert figures["delivered"] == 300
    assert 0 < figures["daphne_fanout_ms"] < figures["delivery_last_ms"]
