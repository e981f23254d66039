"""
A session a Daphne process read lately is trusted unread (asgi_site.auth.TrustedSessions):
the page's next socket on it costs no query, and logout or a password change ends the trust
at once. Every handshake of a test runs on one event loop, as in one Daphne process, through
the whole application (WebsocketCommunicator, the in-memory layer); on the real stack in
tests/test_sessions_stack.py.
"""

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.test import Client

from asgi_site import auth
from asgi_site.upkeep import upkeep
from contract.groups import session_end
from contract.layers import ResilientRedisChannelLayer
from tests.sockets import communicator

pytestmark = pytest.mark.django_db


async def frame(**kwargs):
    """Open /ws/whoami/ in this event loop; return its whoami frame."""
    socket = communicator(**kwargs)
    assert (await socket.connect())[0]
    answer = await socket.receive_json_from()
    await socket.disconnect()
    return answer


async def trusted_until_read(session_key, **kwargs):
    """Handshakes until one is trusted (the process's first read came before it heard
    session.end events, and is not trusted); return their frames."""
    frames = []
    while len(frames) < 5 and auth.trusted_sessions().get(session_key) is None:
        frames.append(await frame(**kwargs))
    return frames


def test_a_session_read_lately_costs_no_query(session_key, session_reads):
    async def run():
        first = await trusted_until_read(session_key, query=f"session_key={session_key}")
        after = [await frame(query=f"session_key={session_key}") for _ in range(5)]
        return first, after

    first, after = async_to_sync(run)()
    # Read until the process hears session.end events (at most twice), then trusted.
    assert len(first) <= 2 and len(session_reads) == len(first)
    frames = [(f["user"], f["auth"]) for f in first + after]
    assert frames == [("alice", "session_key")] * len(frames)


def test_a_cookie_session_is_trusted_too(session_key, session_reads):
    async def run():
        await trusted_until_read(session_key, cookie=f"sessionid={session_key}")
        before = len(session_reads)
        answer = await frame(cookie=f"sessionid={session_key}")
        return answer, len(session_reads) - before

    answer, new_reads = async_to_sync(run)()
    assert (answer["auth"], new_reads) == ("cookie", 0)


async def ended(session_key):
    """Wait until this process heard the session.end that ends `session_key`'s trust."""
    for _ in range(100):
        if auth.trusted_sessions().get(session_key) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session.end event never reached the trusted sessions")


def test_logout_ends_the_trust_and_the_next_socket_is_anonymous(alice, session_key, session_reads):
    async def run():
        await trusted_until_read(session_key, query=f"session_key={session_key}")
        await sync_to_async(alice.logout)()  # sends session.end, deletes the session
        await ended(session_key)
        before = len(session_reads)
        answer = await frame(query=f"session_key={session_key}")
        return answer, len(session_reads) - before

    answer, new_reads = async_to_sync(run)()
    assert (answer["authenticated"], new_reads) == (False, 1)


def test_a_password_change_ends_the_trust_in_every_session_of_the_user(alice, session_key):
    other = Client()
    assert other.login(username="alice", password="alice-pass")
    keys = [session_key, other.session.session_key]

    async def run():
        for key in keys:
            await trusted_until_read(key, query=f"session_key={key}")
        trusted = [auth.trusted_sessions().get(key) is not None for key in keys]
        user = await get_user_model().objects.aget(username="alice")
        user.set_password("alice-pass-2")
        await user.asave()  # Django tells our password validator: a session.end for the user
        for key in keys:
            await ended(key)
        return trusted, [await frame(query=f"session_key={key}") for key in keys]

    trusted, frames = async_to_sync(run)()
    assert trusted == [True, True]
    # Django keeps the changing session logged in over HTTP only by cycling its key; these
    # were changed from outside a request, so they no longer authenticate.
    assert [f["authenticated"] for f in frames] == [False, False]


def test_no_trust_while_the_channel_layer_is_out(session_key, session_reads, monkeypatch):
    # The in-memory layer of these tests has no outages: we set what the Redis layer would.
    assert {"in_outage", "last_outage"} <= set(vars(ResilientRedisChannelLayer))
    layer = get_channel_layer()

    async def run():
        await trusted_until_read(session_key, query=f"session_key={session_key}")
        # What the Redis layer (contract.layers) says while, and after, Redis was gone: no
        # session.end may have reached us, so nothing read before is trusted.
        monkeypatch.setattr(layer, "in_outage", True, raising=False)
        during = auth.trusted_sessions().get(session_key)
        monkeypatch.setattr(layer, "in_outage", False, raising=False)
        monkeypatch.setattr(layer, "last_outage", time.monotonic(), raising=False)
        after = auth.trusted_sessions().get(session_key)
        before = len(session_reads)
        answer = await frame(query=f"session_key={session_key}")
        # Upkeep joins the events again (asgi_site.upkeep.Upkeep.join_events): trusted again.
        auth.trusted_sessions().hearing_since = time.monotonic()
        await frame(query=f"session_key={session_key}")
        rejoined = len(session_reads) - before
        await frame(query=f"session_key={session_key}")
        return during, after, answer, rejoined, len(session_reads) - before

    during, after, answer, rejoined, reads = async_to_sync(run)()
    assert (during, after) == (None, None)
    assert answer["auth"] == "session_key"  # read again, still known
    assert (rejoined, reads) == (2, 2)  # read once after the rejoin, then trusted


def test_a_read_near_its_logout_is_not_kept(session_key, settings):
    """Django sends user_logged_out before it deletes the session: a read begun before the
    event, or just after it, may still find it, and must not be trusted. Once the window has
    passed, the event is forgotten (a read then would not find the session)."""
    settings.WS_SESSION_TRUST_SECONDS = 0.3

    async def run():
        trusted = auth.trusted_sessions()
        trusted.hearing_since = time.monotonic()
        user = await get_user_model().objects.aget(username="alice")
        read_at = time.monotonic()
        trusted.end(session_end(session_key=session_key))
        trusted.keep(session_key, user, read_at)
        straddling = trusted.get(session_key)
        trusted.keep(session_key, user, time.monotonic())
        after = trusted.get(session_key)
        await asyncio.sleep(0.35)
        trusted.keep(session_key, user, time.monotonic())
        return straddling, after, trusted.get(session_key)

    straddling, after, forgotten = async_to_sync(run)()
    assert (straddling, after) == (None, None)
    assert forgotten is not None and forgotten.get_username() == "alice"


def test_a_session_a_recheck_finds_gone_is_trusted_no_more(session_key):
    """Deleted with no session.end event: the re-check that closes its sockets (4401) also
    ends the trust, so the next handshake reads it, and finds it gone."""
    query = f"session_key={session_key}"

    async def run():
        await trusted_until_read(session_key, query=query)
        socket = communicator(query=query)
        assert (await socket.connect())[0]
        await socket.receive_json_from()
        await Session.objects.filter(pk=session_key).adelete()
        before = auth.trusted_sessions().get(session_key) is not None  # nothing told us
        await upkeep().recheck_sessions()
        closed = await socket.receive_output(timeout=3)
        return before, auth.trusted_sessions().get(session_key), closed

    before, after, closed = async_to_sync(run)()
    assert before is True and after is None
    assert closed == {"type": "websocket.close", "code": 4401}


def test_each_socket_gets_its_own_user(session_key):
    """A trusted user is copied for each socket: one socket changing it changes no other's."""

    async def run():
        await trusted_until_read(session_key, query=f"session_key={session_key}")
        first, second = (auth.trusted_sessions().get(session_key) for _ in range(2))
        first.first_name = "changed"
        return first is second, auth.trusted_sessions().get(session_key).first_name

    assert async_to_sync(run)() == (False, "")


def test_trust_lasts_ws_session_trust_seconds(session_key, session_reads, settings):
    settings.WS_SESSION_TRUST_SECONDS = 0.3

    async def run():
        await trusted_until_read(session_key, query=f"session_key={session_key}")
        before = len(session_reads)
        await frame(query=f"session_key={session_key}")
        trusted_reads = len(session_reads) - before
        await asyncio.sleep(0.35)
        await frame(query=f"session_key={session_key}")
        return trusted_reads, len(session_reads) - before

    assert async_to_sync(run)() == (0, 1)


def test_zero_reads_every_handshake(session_key, session_reads, settings):
    settings.WS_SESSION_TRUST_SECONDS = 0

    async def run():
        for _ in range(4):
            assert (await frame(query=f"session_key={session_key}"))["auth"] == "session_key"

    async_to_sync(run)()
    assert session_reads == [session_key] * 4
