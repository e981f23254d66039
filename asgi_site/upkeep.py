"""
Upkeep of every open socket in this Daphne process, done once for all of them.

Logout ends sockets at once: the HTTP side sends one "session.end" event to the
SESSION_EVENTS group, where one listener per process closes (4401) its matching
sockets; no socket joins a group of its own for that. Every WS_SESSION_RECHECK_SECONDS
one task per process re-checks every session its logged-in sockets stand on, in two
queries however many sockets there are, and closes the sockets whose session no longer
stands: expired, deleted, user deactivated, password changed elsewhere.

Broadcast groups are joined per process too (asgi_site.broadcast): the same task re-joins
this process's groups after the channel layer saw Redis go away (Redis may have lost
them), and every GROUP_REFRESH_SECONDS, before channels-redis' group expiry (a day) drops
a long-lived process from its groups.

It also keeps the per-user cap on open sockets (WS_MAX_SOCKETS_PER_USER), counted across
every process in Redis: one sorted set per user of socket ids, scored with when their
process last vouched for them (at admission, then at every re-check). An id not vouched
for in counted_seconds() (its process died) stops counting at the user's next handshake,
and the set expires with it. An unreachable Redis refuses no socket: it is admitted,
uncounted until the next re-check counts it.
"""

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from redis.commands.core import AsyncScript

from contract.batching import batched
from contract.groups import SESSION_EVENTS, session_end, session_hash
from contract.layers import LAYER_ERRORS
from contract.redis_clients import async_client
from contract.user_sockets import ADMIT, USER_SOCKETS_KEY, counted_seconds

from . import metrics
from .auth import session_users, trusted_sessions
from .broadcast import Broadcast

logger = logging.getLogger(__name__)

GROUP_REFRESH_SECONDS = 12 * 3600
# How long a session.end is remembered, for handshakes that read the session before it came
# (Django sends user_logged_out before it deletes the session, so the order varies).
ENDED_MEMORY_SECONDS = 60
# A handshake slower than this, from reading the session to registering, is refused: its
# session may have ended before the memory above began.
SLOWEST_HANDSHAKE_SECONDS = 30
# How long a handshake waits for its process to start hearing session.end events.
LISTEN_WAIT_SECONDS = 2
# After (re)joining the events, when the sockets opened before are re-checked once.
CATCH_UP_SECONDS = 0.5
# Seconds to wait for Redis when a socket leaves its count (a stale id expires anyway).
UNCOUNT_TIMEOUT = 2
# Seconds the sockets leaving their counts gather before one round trip takes them all out: a
# user at the cap who closes a tab and opens another within it may be refused (4409) once.
UNCOUNT_LINGER = 0.05
LOG_EVERY_SECONDS = 5
COUNT_CHUNK = 500  # socket ids vouched for per script call
# Admit each socket (KEYS[i] holds ARGV[i]) while its user has fewer than the cap (the
# next-to-last ARGV) counted, in order; drop ids gone stale (the last ARGV) first.
ADMIT_SCRIPT = (
    ADMIT
    + """
local admitted = {}
for i, key in ipairs(KEYS) do
    admitted[i] = admit(key, ARGV[i])
end
return admitted
"""
)
# Vouch for open sockets: KEYS[i] holds ARGV[i]; the last ARGV is the staleness window.
# Each user's set is made to outlive the window once, however many of its sockets are here.
VOUCH_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local window = math.ceil(tonumber(ARGV[#ARGV]))
local kept = {}
for i, key in ipairs(KEYS) do
    redis.call('ZADD', key, now, ARGV[i])
    if not kept[key] then
        redis.call('EXPIRE', key, window)
        kept[key] = true
    end
end
return #KEYS
"""
# Take each socket ARGV[i] out of its user's count KEYS[i].
UNCOUNT_SCRIPT = """
for i, key in ipairs(KEYS) do
    redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""


class Upkeep:
    """The open sockets of one event loop, the task that keeps them, and its listener."""

    def __init__(self) -> None:
        self.consumers: set[Any] = set()
        # consumer -> (session_key, user_pk), logged-in sockets only
        self.sessions: dict[Any, tuple[str, Any]] = {}
        self.hashes: dict[Any, str] = {}  # consumer -> session_hash(session_key)
        self.ended: dict[Any, float] = {}  # session hash, or ("user", pk) -> when it ended
        self.task: asyncio.Task | None = None
        self.listener: asyncio.Task | None = None
        self.channel: str | None = None
        self.listening = asyncio.Event()  # set once this process hears session.end events
        self.catch_up: asyncio.Task | None = None
        self.joined_at = float("inf")  # when this process last began hearing session.end
        self.rejoined = time.monotonic()
        # consumer -> (Redis key, socket id): logged-in sockets counted against their user's cap
        self.counted: dict[Any, tuple[str, str]] = {}
        self.count_logged = 0.0
        self.broadcasts: dict[str, Broadcast] = {}  # group -> its sockets here

    def broadcast(self, group: str) -> Broadcast:
        """This process's members of `group`, and its one channel in it."""
        if group not in self.broadcasts:
            self.broadcasts[group] = Broadcast(group)
        return self.broadcasts[group]

    def add(
        self,
        consumer: Any,
        session_key: str | None = None,
        user_pk: Any = None,
        authenticated_at: float = 0.0,
    ) -> bool:
        """Keep a socket; False, and not kept, if its session ended since it was read."""
        if self.task is None:
            self.task = asyncio.create_task(self.run())
        if self.listener is None:
            self.listener = asyncio.create_task(self.listen())
        if session_key is not None and self.ended_since(session_key, user_pk, authenticated_at):
            return False
        self.consumers.add(consumer)
        if session_key is not None:
            self.sessions[consumer] = (session_key, user_pk)
            self.hashes[consumer] = session_hash(session_key)
            if authenticated_at <= self.joined_at:
                self.catch_up_soon()
        return True

    def ended_since(self, session_key: str, user_pk: Any, authenticated_at: float) -> bool:
        now = time.monotonic()
        self.ended = {k: t for k, t in self.ended.items() if now - t < ENDED_MEMORY_SECONDS}
        if now - authenticated_at > SLOWEST_HANDSHAKE_SECONDS:
            return True
        # Session keys are never reused: a remembered hash is ended, whenever it was read.
        # A user's sessions end only for handshakes that read them before the event.
        user_ended = self.ended.get(("user", user_pk), float("-inf"))
        return session_hash(session_key) in self.ended or user_ended >= authenticated_at

    async def ready(self) -> None:
        """Wait, briefly, until this process hears session.end events: a logout right after
        the first handshakes of a process must not be missed."""
        if self.listening.is_set():  # as it is for all but a process's first handshakes
            return
        # Past the wait, Redis is down: the re-check stands in until upkeep joins again.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listening.wait(), LISTEN_WAIT_SECONDS)

    def discard(self, consumer: Any) -> None:
        self.consumers.discard(consumer)
        self.sessions.pop(consumer, None)
        self.hashes.pop(consumer, None)

    async def run(self):
        try:
            while self.consumers:
                await asyncio.sleep(settings.WS_SESSION_RECHECK_SECONDS)
                await self.recheck_sessions()
                await self.rejoin_groups()
                await self.vouch_for_sockets()
        finally:
            self.task = None

    async def listen(self):
        """Close this process's sockets named by each session.end event, for good."""
        layer = get_channel_layer()
        self.channel = await layer.new_channel()
        await self.join_events(layer)
        while True:
            event = await layer.receive(self.channel)
            if event.get("type") == "session.end":
                await self.end_sessions(event)

    async def join_events(self, layer) -> bool:
        try:
            await layer.group_add(SESSION_EVENTS, self.channel)
        except LAYER_ERRORS as exc:
            # Sockets still end at the next re-check; upkeep joins again once Redis is back.
            logger.warning("channel layer unreachable, session events not joined: %r", exc)
            return False
        self.joined_at = time.monotonic()
        trusted_sessions().hearing_since = self.joined_at
        self.listening.set()
        if self.sessions:
            self.catch_up_soon()
        return True

    def catch_up_soon(self) -> None:
        """
        A logout sent before this process (re)joined the events was heard by nobody here:
        re-check, once, the sockets whose session was read before that, as soon as Django
        has deleted the session (it does right after sending the event).
        """
        if self.catch_up is None or self.catch_up.done():
            self.catch_up = asyncio.create_task(self.recheck_after_join())

    async def recheck_after_join(self):
        await self.listening.wait()
        await asyncio.sleep(CATCH_UP_SECONDS)
        await self.recheck_sessions()

    async def end_sessions(self, event: dict) -> None:
        # Remembered first: a handshake registering while the loop below runs sees it.
        now = time.monotonic()
        if "session" in event:
            self.ended[event["session"]] = now
        if "user" in event:
            self.ended[("user", event["user"])] = now
        trusted_sessions().end(event)
        for consumer, (_, user_pk) in list(self.sessions.items()):
            ended_session = "session" in event and self.hashes[consumer] == event["session"]
            ended_user = "user" in event and user_pk == event["user"]
            if ended_session or ended_user:
                self.discard(consumer)
                await consumer.end_session()

    async def recheck_sessions(self):
        pairs = set(self.sessions.values())
        if not pairs:
            return
        began = time.monotonic()
        try:
            standing = await sessions_standing(pairs)
        except DatabaseError as exc:
            # Keep the sockets: a database blip is not a logout.
            logger.warning("session re-check failed: %s", type(exc).__name__)
            return
        took = time.monotonic() - began
        metrics.RECHECK_SECONDS.observe(took)
        logger.info(
            "re-checked %d sessions of %d sockets in %.1f ms",
            len(pairs),
            len(self.sessions),
            took * 1000,
        )
        ended = pairs - standing
        for session_key, _ in ended:  # and the next handshake on it reads it again
            trusted_sessions().end(session_end(session_key=session_key))
        # Only the sessions read above are judged: a socket that registered while the query
        # ran stands on a session read by its own handshake, perhaps not among them.
        for consumer, pair in list(self.sessions.items()):
            if pair in ended:
                self.discard(consumer)
                await consumer.end_session()

    async def rejoin_groups(self):
        layer = get_channel_layer()
        due = time.monotonic() - self.rejoined > GROUP_REFRESH_SECONDS
        if getattr(layer, "last_outage", 0) > self.rejoined or due:
            started = time.monotonic()
            joined = self.channel is None or await self.join_events(layer)
            for broadcast in list(self.broadcasts.values()):
                joined = await broadcast.join(again=True) and joined
            # Counted as done only when every join went through: a Redis that came back on
            # a stale connection, or timed out, gets another try at the next interval.
            if joined:
                self.rejoined = started

    async def admit(self, consumer: Any, user_pk: Any, counted: tuple | None = None) -> bool:
        """
        Count a logged-in socket against its user's WS_MAX_SOCKETS_PER_USER, on every
        process; False if the user already holds that many. Redis unreachable: True.
        `counted`: (key, socket id, admitted) if its ticket's redemption counted it already.
        """
        if settings.WS_MAX_SOCKETS_PER_USER <= 0:
            return True
        if counted is not None:
            key, socket_id, admitted = counted
        else:
            key, socket_id = USER_SOCKETS_KEY.format(user_pk), uuid.uuid4().hex
            try:
                admitted = await admit_sockets((key, socket_id))
            except LAYER_ERRORS as exc:
                self.log_count_failure("not counted", exc)
                admitted = True  # fail open; the next re-check counts it
        if admitted:
            self.counted[consumer] = (key, socket_id)
            if consumer.closed:  # gone while Redis answered: it left without us
                await self.uncount(consumer)
        return admitted

    async def uncount(self, consumer: Any) -> None:
        """Take a socket out of its user's count; never raises."""
        entry = self.counted.pop(consumer, None)
        if entry is None:
            return
        try:
            async with asyncio.timeout(UNCOUNT_TIMEOUT):
                await uncount_sockets(entry)
        except (*LAYER_ERRORS, TimeoutError) as exc:
            # It stops counting counted_seconds() after its last vouching.
            self.log_count_failure("not uncounted", exc)

    async def vouch_for_sockets(self) -> None:
        """Refresh every counted socket's score, re-adding those Redis lost or never had."""
        entries = list(self.counted.items())
        try:
            for start in range(0, len(entries), COUNT_CHUNK):
                chunk = [entry for _, entry in entries[start : start + COUNT_CHUNK]]
                keys, ids = [key for key, _ in chunk], [socket_id for _, socket_id in chunk]
                await async_client().eval(VOUCH_SCRIPT, len(keys), *keys, *ids, counted_seconds())
        except LAYER_ERRORS as exc:
            self.log_count_failure("not vouched for", exc)
            return
        # A socket that left while the script ran may be back in its set: out again.
        gone = [(key, socket_id) for consumer, (key, socket_id) in entries
                if consumer not in self.counted]  # fmt: skip
        for key, socket_id in gone:
            with contextlib.suppress(*LAYER_ERRORS):
                await async_client().zrem(key, socket_id)

    def log_count_failure(self, what: str, exc: BaseException) -> None:
        if time.monotonic() - self.count_logged > LOG_EVERY_SECONDS:
            self.count_logged = time.monotonic()
            logger.warning("Redis unreachable, user socket count %s: %r", what, exc)


@batched
async def admit_sockets(sockets: list[tuple[str, str]]) -> list[bool]:
    """
    Called for one (Redis key, socket id): True if counted, False if its user is at the cap.
    Every handshake waiting at once is counted in one script call.
    """
    script = AsyncScript(async_client("admit"), ADMIT_SCRIPT)  # EVALSHA: the body is not resent
    keys, ids = [key for key, _ in sockets], [socket_id for _, socket_id in sockets]
    cap = settings.WS_MAX_SOCKETS_PER_USER
    return [bool(n) for n in await script(keys=keys, args=[*ids, cap, counted_seconds()])]


@batched(linger=UNCOUNT_LINGER)
async def uncount_sockets(sockets: list[tuple[str, str]]) -> list[None]:
    """Called for one (Redis key, socket id): out of its user's count. Every socket closing at
    once is taken out in one script call."""
    keys, ids = [key for key, _ in sockets], [socket_id for _, socket_id in sockets]
    await AsyncScript(async_client("uncount"), UNCOUNT_SCRIPT)(keys=keys, args=ids)
    return [None] * len(sockets)


_upkeeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Upkeep] = weakref.WeakKeyDictionary()


def upkeep() -> Upkeep:
    """The Upkeep of the running event loop (Daphne has one; tests make many)."""
    loop = asyncio.get_running_loop()
    if loop not in _upkeeps:
        _upkeeps[loop] = Upkeep()
    return _upkeeps[loop]


@database_sync_to_async
def sessions_standing(pairs: set[tuple[str, Any]]) -> set[tuple[str, Any]]:
    """
    Return the (session_key, user_pk) pairs whose session still exists, is unexpired and
    still authenticates that user: one query for the sessions, one for their users.
    """
    users = session_users({key for key, _ in pairs})
    return {(key, pk) for key, pk in pairs if key in users and users[key].pk == pk}
