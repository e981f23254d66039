"""The per-process re-check: every session of every socket, in two queries."""

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
