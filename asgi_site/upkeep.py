"""
Upkeep of every open socket in this Daphne process, done once for all of them.

Every WS_SESSION_RECHECK_SECONDS one task per process re-checks every session its
logged-in sockets stand on, in two queries however many sockets there are, and closes
(4401) the sockets whose session no longer stands: expired, deleted, user deactivated,
password changed elsewhere. Logout closes sockets at once, by a push through the
channel layer; this catches what no push announces.

The same task re-joins every socket's groups after the channel layer saw Redis go away
(Redis may have lost them), and every GROUP_REFRESH_SECONDS, before channels-redis'
group expiry (a day) drops a long-lived socket from its groups.
"""

import asyncio
import logging
import time
import weakref
from importlib import import_module

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError
from django.utils import timezone

from .auth import authenticated_user

logger = logging.getLogger(__name__)

GROUP_REFRESH_SECONDS = 12 * 3600
IN_CLAUSE = 500  # session keys per query, well under every database's parameter limit


class Upkeep:
    """The open sockets of one event loop, and the task that keeps them."""

    def __init__(self):
        self.sessions = {}  # consumer -> (session_key, user_pk), logged-in sockets only
        self.consumers = set()
        self.task = None
        self.rejoined = time.monotonic()

    def add(self, consumer, session_key=None, user_pk=None):
        self.consumers.add(consumer)
        if session_key is not None:
            self.sessions[consumer] = (session_key, user_pk)
        if self.task is None:
            self.task = asyncio.create_task(self.run())

    def discard(self, consumer):
        self.consumers.discard(consumer)
        self.sessions.pop(consumer, None)

    async def run(self):
        try:
            while self.consumers:
                await asyncio.sleep(settings.WS_SESSION_RECHECK_SECONDS)
                await self.recheck_sessions()
                await self.rejoin_groups()
        finally:
            self.task = None

    async def recheck_sessions(self):
        pairs = set(self.sessions.values())
        if not pairs:
            return
        try:
            standing = await sessions_standing(pairs)
        except DatabaseError as exc:
            # Keep the sockets: a database blip is not a logout.
            logger.warning("session re-check failed: %s", type(exc).__name__)
            return
        for consumer, pair in list(self.sessions.items()):
            if pair not in standing:
                self.discard(consumer)
                await consumer.end_session()

    async def rejoin_groups(self):
        layer_outage = max(
            (getattr(c.channel_layer, "last_outage", 0) for c in self.consumers), default=0
        )
        due = time.monotonic() - self.rejoined > GROUP_REFRESH_SECONDS
        if layer_outage > self.rejoined or due:
            self.rejoined = time.monotonic()
            for consumer in list(self.consumers):
                await consumer.join(*consumer.groups)


_upkeeps = weakref.WeakKeyDictionary()


def upkeep():
    """The Upkeep of the running event loop (Daphne has one; tests make many)."""
    loop = asyncio.get_running_loop()
    if loop not in _upkeeps:
        _upkeeps[loop] = Upkeep()
    return _upkeeps[loop]


@database_sync_to_async
def sessions_standing(pairs):
    """
    Return the (session_key, user_pk) pairs whose session still exists, is unexpired and
    still authenticates that user: one query for the sessions, one for their users.
    """
    store = import_module(settings.SESSION_ENGINE).SessionStore
    keys = sorted({key for key, _ in pairs})
    data = {}
    for start in range(0, len(keys), IN_CLAUSE):
        rows = store.get_model_class().objects.filter(
            session_key__in=keys[start:start + IN_CLAUSE], expire_date__gt=timezone.now()
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
        (key, pk) for key, pk in pairs
        if key in data and getattr(authenticated_user(data[key], get_user), "pk", None) == pk
    }
