"""
contract.batching, and the handshake lookups made with it: callers waiting at once share
one round trip, each gets its own answer, and a failure reaches exactly its batch.
"""

import asyncio
import math

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import Client

from asgi_site import auth, upkeep
from contract.batching import batched
from contract.redis_clients import async_client, close_async_clients
from contract.user_sockets import counted_seconds
from tests.sockets import communicator


def recorder():
    """A batched function that doubles numbers, fails on 13, and records its batches."""
    batches = []

    @batched
    async def double(items):
        batches.append(list(items))
        await asyncio.sleep(0.01)  # a round trip: callers arriving now wait for the next
        if 13 in items:
            raise ValueError("13")
        return [item * 2 for item in items]

    return double, batches


def test_callers_waiting_at_once_share_a_batch_and_get_their_own_answers():
    double, batches = recorder()

    async def run():
        first = await asyncio.gather(*(double(n) for n in range(5)))
        lone = await double(7)
        return first, lone

    assert asyncio.run(run()) == ([0, 2, 4, 6, 8], 14)
    assert batches == [[0, 1, 2, 3, 4], [7]]


def test_callers_arriving_during_a_batch_wait_for_the_next():
    double, batches = recorder()

    async def run():
        early = asyncio.gather(*(double(n) for n in range(3)))
        await asyncio.sleep(0.005)  # the first batch is in flight
        late = asyncio.gather(*(double(n) for n in range(3, 6)))
        return await early, await late

    assert asyncio.run(run()) == ([0, 2, 4], [6, 8, 10])
    assert batches == [[0, 1, 2], [3, 4, 5]]


def test_a_failure_reaches_its_batch_only_and_a_cancelled_caller_no_one_else():
    double, batches = recorder()

    async def run():
        failing = asyncio.gather(double(1), double(13), return_exceptions=True)
        await asyncio.sleep(0.005)
        cancelled = asyncio.ensure_future(double(2))
        fine = asyncio.ensure_future(double(3))
        await asyncio.sleep(0)
        cancelled.cancel()
        results = await failing
        return [type(r).__name__ for r in results], await fine, cancelled.cancelled()

    assert asyncio.run(run()) == (["ValueError", "ValueError"], 6, True)
    assert batches == [[1, 13], [2, 3]]


def sessions(count):
    keys = []
    for i in range(count):
        get_user_model().objects.create_user(f"batch{i}", password="pass-word")
        client = Client()
        assert client.login(username=f"batch{i}", password="pass-word")
        keys.append(client.session.session_key)
    return keys


@pytest.mark.django_db(transaction=True)
def test_handshakes_at_once_read_their_sessions_together(monkeypatch, redis_server):
    """20 session-key handshakes at once: every one is its own user, in far fewer database
    hops than 20 (each hop is two queries, however many sessions it reads)."""
    keys = [*sessions(20), "0" * 32]  # and one session that does not exist
    hops = []
    real = auth.session_users

    def spy(session_keys):
        hops.append(len(session_keys))
        return real(session_keys)

    monkeypatch.setattr(auth, "session_users", spy)

    async def run():
        sockets = [communicator(query=f"session_key={key}") for key in keys]
        await asyncio.gather(*(socket.connect() for socket in sockets))
        frames = [await socket.receive_json_from() for socket in sockets]
        await asyncio.gather(*(socket.disconnect() for socket in sockets))
        return frames

    frames = async_to_sync(run)()
    assert [frame["user"] for frame in frames] == [f"batch{i}" for i in range(20)] + [None]
    assert sum(hops) == 21 and len(hops) <= 3, hops


def test_admissions_at_once_keep_the_cap_in_one_script_call(redis_server, settings):
    """10 sockets of one user counted at once under a cap of 3 (one counted before): the
    first 2 in, in order, and Redis reads one request for all of them."""
    settings.WS_MAX_SOCKETS_PER_USER = 3

    async def run():
        client = async_client()
        # Its first call connects the pool of the "admit" batches (a handshake of a few requests).
        await upkeep.admit_sockets(("ws-user-sockets:batch", "first"))
        before = (await client.info("stats"))["total_reads_processed"]
        admitted = await asyncio.gather(
            *(upkeep.admit_sockets(("ws-user-sockets:batch", f"socket{n}")) for n in range(10))
        )
        reads = (await client.info("stats"))["total_reads_processed"] - before - 1  # an INFO
        await client.delete("ws-user-sockets:batch")
        await close_async_clients()
        return admitted, reads

    assert asyncio.run(run()) == ([True] * 2 + [False] * 8, 1)


def test_sockets_leaving_at_once_are_taken_out_in_one_script_call(redis_server):
    """10 counted sockets of two users close at once: all leave their counts, in one request
    to Redis, and a socket still open stays counted."""

    async def run():
        client = async_client()
        sockets = [(f"ws-user-sockets:leave{n % 2}", f"socket{n}") for n in range(11)]
        assert all(await asyncio.gather(*(upkeep.admit_sockets(s) for s in sockets)))
        await upkeep.uncount_sockets(("ws-user-sockets:leave0", "none"))  # opens its connection
        before = (await client.info("stats"))["total_reads_processed"]
        scripts = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"]
        await asyncio.gather(*(upkeep.uncount_sockets(s) for s in sockets[:10]))
        reads = (await client.info("stats"))["total_reads_processed"] - before - 2  # INFOs
        scripts = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] - scripts
        left = [await client.zrange(f"ws-user-sockets:leave{n}", 0, -1) for n in (0, 1)]
        await client.delete("ws-user-sockets:leave0", "ws-user-sockets:leave1")
        await close_async_clients()
        return reads, scripts, left

    assert asyncio.run(run()) == (1, 1, [[b"socket10"], []])  # one request, one script call


def test_a_recheck_vouches_for_each_users_count_once(redis_server):
    """A re-check vouches for 12 sockets of 3 users: each socket's score is refreshed, and
    each user's set made to outlive the window once, not once per socket (EXPIRE 3 times)."""

    class Socket:
        closed = False

    async def run():
        client = async_client()
        keep = upkeep.Upkeep()
        for n in range(12):
            keep.counted[Socket()] = (f"ws-user-sockets:vouch{n % 3}", f"socket{n}")
        calls = "cmdstat_expire", "cmdstat_zadd"
        before = await client.info("commandstats")
        await keep.vouch_for_sockets()
        after = await client.info("commandstats")
        done = [after[c]["calls"] - before.get(c, {}).get("calls", 0) for c in calls]
        sizes = [await client.zcard(f"ws-user-sockets:vouch{n}") for n in range(3)]
        ttls = [await client.ttl(f"ws-user-sockets:vouch{n}") for n in range(3)]
        await client.delete(*(f"ws-user-sockets:vouch{n}" for n in range(3)))
        await close_async_clients()
        return done, sizes, ttls

    done, sizes, ttls = asyncio.run(run())
    assert done == [3, 12] and sizes == [4, 4, 4]
    assert all(0 < ttl <= math.ceil(counted_seconds()) for ttl in ttls), ttls


@pytest.mark.django_db(transaction=True)
def test_a_session_naming_an_unreadable_user_spoils_only_itself(redis_server):
    """A session whose user id is not a pk (a user model changed under it) authenticates no
    one, and the handshakes read in the same batch keep their users."""
    from datetime import timedelta

    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.utils import timezone

    data = {
        SESSION_KEY: "not-a-pk",
        HASH_SESSION_KEY: "x",
        BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
    }
    bad = Session(
        session_key="b" * 32,
        session_data=SessionStore().encode(data),
        expire_date=timezone.now() + timedelta(days=1),
    )
    Session.objects.bulk_create([bad])  # no signals: they would refuse to record its user
    keys = [*sessions(3), bad.session_key]

    async def run():
        sockets = [communicator(query=f"session_key={key}") for key in keys]
        await asyncio.gather(*(socket.connect() for socket in sockets))
        frames = [await socket.receive_json_from() for socket in sockets]
        await asyncio.gather(*(socket.disconnect() for socket in sockets))
        return [frame["user"] for frame in frames]

    assert async_to_sync(run)() == ["batch0", "batch1", "batch2", None]
