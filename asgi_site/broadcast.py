"""
Broadcast groups (LIVE_GROUP), delivered per process.

A socket has no membership of its own in the channel layer: its Daphne process joins the
group once, on a channel of its own, and hands every event sent to the group to its
sockets in memory, as asgi_site.upkeep does for session.end events. One announcement is
then one channel-layer message per process however many sockets there are, and a
handshake or a close costs the layer nothing: only a process's first socket in the group
joins it, and its last one leaves it.
"""

import asyncio
import logging
import time
from typing import Any

from channels.layers import get_channel_layer

from contract import history
from contract.layers import LAYER_ERRORS

from . import metrics

logger = logging.getLogger(__name__)

# Seconds a process whose last socket left waits to leave the group (Redis may be down).
LEAVE_TIMEOUT = 2


class Delivery:
    """One group event as this process hands it out: ids parsed once, the frame encoded once."""

    __slots__ = ("event", "id", "prev", "text")

    def __init__(self, event: dict) -> None:
        self.event = event
        self.id = history.parse_id(event.get("id"))
        self.prev = history.parse_id(event.get("prev")) or history.BEGINNING
        self.text: str | None = None  # the frame, encoded by the first member that sends it


class Broadcast:
    """One group in one process: its sockets here, the process's channel in it, its listener."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.members: dict[Any, None] = {}  # an ordered set of consumers, in join order
        self.channel: str | None = None
        self.joined = False  # the channel is in the group, as far as this process knows
        self.lock = asyncio.Lock()  # one join or leave at a time
        self.listener: asyncio.Task | None = None
        # Leaves under way: asyncio keeps only weak references to tasks, so these are held.
        self.leaving: set[asyncio.Task] = set()

    async def add(self, consumer: Any) -> bool:
        """Hand `consumer` this group's events from now on; False if Redis was unreachable."""
        self.members[consumer] = None
        # Already in the group: no round trip. Else wait for the join, so that a replay
        # after this misses nothing sent meanwhile.
        return self.joined or await self.join()

    def discard(self, consumer: Any) -> None:
        """Hand `consumer` nothing more; the process leaves the group with its last socket."""
        if self.members.pop(consumer, False) is None and not self.members:
            task = asyncio.create_task(self.leave())
            self.leaving.add(task)
            task.add_done_callback(self.leaving.discard)

    async def join(self, again: bool = False) -> bool:
        """Put this process's channel in the group, once (`again`: even if it is there)."""
        async with self.lock:
            if not self.members or (self.joined and not again):
                return True
            layer = get_channel_layer()
            if self.channel is None:
                self.channel = await layer.new_channel()
                self.listener = asyncio.create_task(self.listen(layer, self.channel))
            try:
                await layer.group_add(self.group, self.channel)
            except LAYER_ERRORS as exc:
                # The sockets still work; upkeep joins again once Redis is back.
                logger.warning("channel layer unreachable, %s not joined: %r", self.group, exc)
                return False
            self.joined = True
            return True

    async def leave(self) -> None:
        async with self.lock:
            if self.members or not self.joined or self.channel is None:
                return
            self.joined = False
            try:
                discard = get_channel_layer().group_discard(self.group, self.channel)
                await asyncio.wait_for(discard, LEAVE_TIMEOUT)
            except (*LAYER_ERRORS, TimeoutError) as exc:
                # channels-redis expires the membership; until then events reach no one here.
                logger.warning("channel layer unreachable, %s not left: %r", self.group, exc)

    async def listen(self, layer: Any, channel: str) -> None:
        """Hand every event sent to the group to every socket here in it, in arrival order."""
        while True:
            event = await layer.receive(channel)
            try:
                await self.deliver(event)
            except Exception:
                # The listener must outlive any one event, or this process's sockets would
                # silently get nothing more while it stays in the group.
                logger.exception("group event not delivered")

    async def deliver(self, event: dict) -> None:
        delivery = Delivery(event)
        members = list(self.members)
        for consumer in members:
            try:
                await consumer.hand(delivery)
            except Exception:
                # One socket's failure must not keep the event from the others.
                logger.exception("group event not handed to a socket")
        if members and delivery.id is not None:
            # From the event's record (its id is Redis' clock) to the last socket here.
            metrics.FANOUT_SECONDS.observe(max(time.time() - delivery.id[0] / 1000, 0.0))
