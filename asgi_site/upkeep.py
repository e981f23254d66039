"""
Upkeep of every open socket in this Daphne process, done once for all of them.

Logout ends sockets at once: the HTTP side sends one "session.end" event to the
SESSION_EVENTS group, where one listener per process closes (4401) its matching
sockets; no socket joins a group of its own for that. Every WS_SESSION_RECHECK_SECONDS
one task per process re-checks every session its logged-in sockets stand on, in two
queries however many sockets there are, and closes the sockets whose session no longer
stands: expired, deleted, user deactivated, password changed elsewhere.

The same task re-joins every socket's groups after the channel layer saw Redis go away
(Redis may have lost them), and every GROUP_REFRESH_SECONDS, before channels-redis'
group expiry (a day) drops a long-lived socket from its groups.
"""

import asyncio
import contextlib
import logging
import time
import weakref
from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError
from django.utils import timezone

from contract.groups import SESSION_EVENTS, session_hash
from contract.layers import LAYER_ERRORS

from .auth import authenticated_user

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
IN_CLAUSE = 500  # session keys per query, well under every database's parameter limit


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
        self.rejoined = time.monotonic()

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

    async def join_events(self, layer):
        try:
            await layer.group_add(SESSION_EVENTS, self.channel)
            self.listening.set()
        except LAYER_ERRORS as exc:
            # Sockets still end at the next re-check; upkeep joins again once Redis is back.
            logger.warning("channel layer unreachable, session events not joined: %r", exc)

    async def end_sessions(self, event: dict) -> None:
        # Remembered first: a handshake registering while the loop below runs sees it.
        now = time.monotonic()
        if "session" in event:
            self.ended[event["session"]] = now
        if "user" in event:
            self.ended[("user", event["user"])] = now
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
        logger.info(
            "re-checked %d sessions of %d sockets in %.1f ms",
            len(pairs),
            len(self.sessions),
            (time.monotonic() - began) * 1000,
        )
        for consumer, pair in list(self.sessions.items()):
            if pair not in standing:
                self.discard(consumer)
                await consumer.end_session()

    async def rejoin_groups(self):
        layer = get_channel_layer()
        due = time.monotonic() - self.rejoined > GROUP_REFRESH_SECONDS
        if getattr(layer, "last_outage", 0) > self.rejoined or due:
            self.rejoined = time.monotonic()
            if self.channel is not None:
                await self.join_events(layer)
            for consumer in list(self.consumers):
                await consumer.join(*consumer.groups)


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
    store = import_module(settings.SESSION_ENGINE).SessionStore
    keys = sorted({key for key, _ in pairs})
    data: dict[str, dict] = {}
    for start in range(0, len(keys), IN_CLAUSE):
        rows = store.get_model_class().objects.filter(
            session_key__in=keys[start : start + IN_CLAUSE], expire_date__gt=timezone.now()
        )
        data.update((row.session_key, store().decode(row.session_data)) for row in rows)
    user_pks = {pk for _, pk in pairs}
    users = get_user_model()._default_manager.in_bulk(user_pks)

    def get_user(backend, user_id):
        # What ModelBackend.get_user does, from the users fetched above.
        user = users.get(user_id)
        can_authenticate = getattr(backend, "user_can_authenticate", lambda user: True)
        return user if user is not None and can_authenticate(user) else None

    return {
        (key, pk)
        for key, pk in pairs
        if key in data and getattr(authenticated_user(data[key], get_user), "pk", None) == pk
    }
