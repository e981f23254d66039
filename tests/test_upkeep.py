"""The per-process re-check: every session of every socket, in two queries."""

import asyncio
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from asgi_site.upkeep import sessions_standing

pytestmark = pytest.mark.django_db


def logged_in(count):
    pairs = set()
    for i in range(count):
        user = get_user_model().objects.create_user(f"user{i}", password="pass-word")
        client = Client()
        client.force_login(user)
        pairs.add((client.session.session_key, user.pk))
    return pairs


@pytest.mark.parametrize("count", [1, 10, 120])
def test_two_queries_however_many_sessions(count):
    pairs = logged_in(count)
    with CaptureQueriesContext(connection) as queries:
        assert async_to_sync(sessions_standing)(pairs) == pairs
    assert len(queries) == 2


def test_ended_sessions_are_left_out():
    pairs = sorted(logged_in(4))
    (deleted, _), (deactivated, pk), (changed, pk2), kept = pairs
    Session.objects.filter(pk=deleted).delete()
    get_user_model().objects.filter(pk=pk).update(is_active=False)
    user = get_user_model().objects.get(pk=pk2)
    user.set_password("another-pass")
    user.save()
    wrong_user = (kept[0], kept[1] + 1000)
    assert async_to_sync(sessions_standing)({*pairs, wrong_user}) == {kept}


def test_a_session_end_closes_only_the_matching_sockets():
    from asgi_site.upkeep import Upkeep
    from contract.groups import session_hash

    class Socket:
        ended = False

        async def end_session(self):
            self.ended = True

    keep = Upkeep()
    mine, other_session, other_user, anonymous = Socket(), Socket(), Socket(), Socket()
    keep.sessions = {mine: ("k1", 1), other_session: ("k2", 1), other_user: ("k3", 2)}
    keep.hashes = {s: session_hash(k) for s, (k, _) in keep.sessions.items()}
    keep.consumers = {mine, other_session, other_user, anonymous}
    async_to_sync(keep.end_sessions)({"type": "session.end", "session": session_hash("k1")})
    assert [s.ended for s in (mine, other_session, other_user, anonymous)] == [
        True,
        False,
        False,
        False,
    ]
    async_to_sync(keep.end_sessions)({"type": "session.end", "user": 1})
    assert [s.ended for s in (other_session, other_user, anonymous)] == [True, False, False]


def many_sessions(sessions, users):
    """`sessions` logged-in sessions spread over `users` users, made in bulk; their pairs."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore
    from django.utils import timezone
    from django.utils.crypto import get_random_string

    model = get_user_model()
    people = model.objects.bulk_create(
        [model(username=f"bulk{i}", password=f"md5$salt${i:032x}") for i in range(users)]
    )
    store, expiry = SessionStore(), timezone.now() + timedelta(days=1)
    rows, pairs = [], set()
    for i in range(sessions):
        user = people[i % users]
        key = get_random_string(32, "abcdefghijklmnopqrstuvwxyz0123456789")
        data = {
            SESSION_KEY: str(user.pk),
            BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
            HASH_SESSION_KEY: user.get_session_auth_hash(),
        }
        rows.append(Session(session_key=key, session_data=store.encode(data), expire_date=expiry))
        pairs.add((key, user.pk))
    Session.objects.bulk_create(rows)
    return pairs


@pytest.mark.parametrize(
    "sessions, users, session_queries, user_queries",
    [
        (500, 1, 1, 1),  # the most one IN clause holds: still two queries
        (1001, 1, 3, 1),  # IN_CLAUSE=500: one session query per 500 keys
        (1001, 1001, 3, 2),  # and Django's in_bulk splits 1,001 user pks (SQLite: 999 a query)
    ],
)
def test_query_count_above_500_sessions(sessions, users, session_queries, user_queries):
    """
    README: re-checks load every session "in two queries however many sockets there are".
    True up to 500 sessions (asgi_site.auth.IN_CLAUSE); above it the session query is
    batched by 500 and, on SQLite, the user query by 999 (Django's in_bulk): 1,001 sessions
    of 1,001 users take 3 + 2 queries. Still a constant per 500 sessions, never per socket.
    """
    from asgi_site.auth import IN_CLAUSE

    assert IN_CLAUSE == 500
    pairs = many_sessions(sessions, users)
    with CaptureQueriesContext(connection) as queries:
        assert async_to_sync(sessions_standing)(pairs) == pairs
    sql = [q["sql"] for q in queries]
    assert sum("django_session" in s for s in sql) == session_queries, sql
    assert sum("auth_user" in s for s in sql) == user_queries, sql
    assert len(sql) == session_queries + user_queries


def test_group_refresh_rejoins_every_socket_when_due_and_not_before():
    """
    README: the re-check task "re-joins every socket's groups ... every 12 hours
    (channels-redis expires group memberships after a day)". With the in-memory layer: a
    live socket dropped from its group is re-joined by Upkeep.rejoin_groups once
    GROUP_REFRESH_SECONDS have passed since the last re-join, and not a moment before.
    """
    from channels.layers import get_channel_layer

    from asgi_site.upkeep import GROUP_REFRESH_SECONDS, upkeep
    from contract.groups import LIVE_GROUP, SESSION_EVENTS
    from tests.sockets import communicator

    assert GROUP_REFRESH_SECONDS == 12 * 3600

    async def run():
        layer = get_channel_layer()
        await layer.flush()
        socket = communicator(path="/ws/live/")
        assert (await socket.connect())[0]
        keep = upkeep()
        for _ in range(100):  # the listener joins SESSION_EVENTS as a task of its own
            if keep.channel is not None and keep.channel in layer.groups.get(SESSION_EVENTS, {}):
                break
            await asyncio.sleep(0.01)
        (channel,) = layer.groups[LIVE_GROUP]

        def joined():
            return (
                channel in layer.groups.get(LIVE_GROUP, {}),
                keep.channel in layer.groups.get(SESSION_EVENTS, {}),
            )

        assert joined() == (True, True)
        seen = []
        try:
            for age in (GROUP_REFRESH_SECONDS - 60, GROUP_REFRESH_SECONDS + 1):
                # What channels-redis' expiry does to a long-lived socket, on both groups.
                await layer.group_discard(LIVE_GROUP, channel)
                await layer.group_discard(SESSION_EVENTS, keep.channel)
                keep.rejoined = time.monotonic() - age
                # An outage seen before the last re-join asks for none: only the age decides
                # (the layer's default, 0, would count as later while the host's monotonic
                # clock is younger than 12 h).
                layer.last_outage = keep.rejoined - 1
                await keep.rejoin_groups()
                seen.append(joined())
        finally:
            del layer.last_outage
            await socket.disconnect()
        return seen

    not_due, due = async_to_sync(run)()
    assert not_due == (False, False)
    assert due == (True, True)


def test_a_socket_registered_during_a_recheck_is_not_judged_by_it():
    """
    A re-check judges the sessions it read. A handshake that registers while the re-check's
    query runs brings a session that query did not read; it must not be taken for ended
    (it was, and the socket closed with 4401, or 403 if not yet accepted).
    """
    from asgi_site.upkeep import Upkeep

    (first, first_pk), (later, later_pk) = sorted(logged_in(2))

    class Socket:
        ended = False

        async def end_session(self):
            self.ended = True

    async def run():
        keep, old, new = Upkeep(), Socket(), Socket()
        keep.sessions = {old: (first, first_pk)}
        recheck = asyncio.create_task(keep.recheck_sessions())
        await asyncio.sleep(0)  # the re-check has read what it judges, and awaits its query
        keep.sessions[new] = (later, later_pk)
        await recheck
        return old.ended, new.ended, new in keep.sessions

    assert async_to_sync(run)() == (False, False, True)
