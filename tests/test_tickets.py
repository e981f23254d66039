"""
Tickets, credentials in the subprotocol header, precedence, re-checks and key rotation, in
process.

Tickets go through a real Redis (the redis_server fixture); sockets through Channels'
WebsocketCommunicator and the whole ASGI application.
"""

import asyncio
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone

from contract import tickets
from contract.redis_clients import close_async_clients
from tests.sockets import communicator, handshake, whoami

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _redis(redis_server):
    """Every test here mints or redeems tickets in a real Redis."""


def mint(client, **body):
    response = client.post("/ws-ticket/", body, content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()


def lookups(redis_server):
    """Tickets looked up in Redis so far: the redemption script asks each entry's TYPE once."""
    stats = redis_server.info("commandstats")
    return stats.get("cmdstat_type", {}).get("calls", 0)


def test_ticket_response(alice):
    answer = mint(alice)
    assert set(answer) == {"ticket", "expires_in", "url"}
    assert len(answer["ticket"]) == 43 and answer["expires_in"] == 30
    assert answer["url"] == f"ws://realtime.localhost:8000/ws/whoami/?ticket={answer['ticket']}"
    assert mint(alice, path="/ws/live/")["url"].startswith(
        "ws://realtime.localhost:8000/ws/live/?ticket="
    )


def test_ticket_needs_login_and_a_known_path(alice, redis_server):
    anonymous = Client().post("/ws-ticket/")
    assert anonymous.status_code == 403 and anonymous.json() == {"error": "login required"}
    bad = alice.post("/ws-ticket/", {"path": "/admin/"}, content_type="application/json")
    assert bad.status_code == 400 and "path must be one of" in bad.json()["error"]


def test_ticket_lives_30_seconds_in_redis(alice, redis_server):
    """
    README: tickets are "stored in Redis against the session for `WS_TICKET_TTL` seconds"
    (30 by default): the TTL of the ticket's own key in Redis, not just the echoed expires_in.
    """
    ticket = mint(alice)["ticket"]
    ttl_ms = redis_server.pttl(tickets.redis_key(ticket))
    assert 0 < ttl_ms <= 30_000
    assert ttl_ms > 25_000, f"{ttl_ms} ms left: the TTL set is not 30 s"


def test_ticket_is_csrf_protected(alice):
    strict = Client(enforce_csrf_checks=True)
    strict.cookies = alice.cookies
    assert strict.post("/ws-ticket/").status_code == 403


def test_ticket_in_query_string(alice):
    frame = whoami(query=f"ticket={mint(alice)['ticket']}")
    assert (frame["user"], frame["auth"]) == ("alice", "ticket")


def test_ticket_in_header_and_the_answer_never_echoes_it(alice):
    ticket = mint(alice)["ticket"]
    subprotocol, frame = handshake(subprotocols=["realtime", f"ticket.{ticket}"])
    assert (frame["user"], frame["auth"]) == ("alice", "ticket")
    assert subprotocol == "realtime"


def test_session_key_in_header(alice):
    key = alice.session.session_key
    subprotocol, frame = handshake(subprotocols=["realtime", f"session_key.{key}"])
    assert (frame["auth"], subprotocol) == ("session_key", "realtime")


def test_no_subprotocol_offered_none_answered(alice):
    subprotocol, frame = handshake(query=f"ticket={mint(alice)['ticket']}")
    assert subprotocol is None and frame["auth"] == "ticket"


def test_replayed_ticket_is_anonymous(alice):
    ticket = mint(alice)["ticket"]
    assert whoami(query=f"ticket={ticket}")["auth"] == "ticket"
    assert whoami(query=f"ticket={ticket}")["authenticated"] is False
    assert whoami(subprotocols=["realtime", f"ticket.{ticket}"])["authenticated"] is False


def test_expired_ticket_is_anonymous(alice, settings):
    settings.WS_TICKET_TTL = 1
    answer = mint(alice)
    assert answer["expires_in"] == 1
    time.sleep(1.3)
    assert whoami(query=f"ticket={answer['ticket']}")["authenticated"] is False


def test_forged_ticket_is_anonymous(alice, redis_server):
    before = lookups(redis_server)
    assert whoami(query="ticket=" + "A" * 43)["authenticated"] is False
    assert lookups(redis_server) == before + 1  # looked up, found nothing


@pytest.mark.parametrize("bad", ["short", "A" * 44, "A" * 42 + "!", "", "A" * 42 + "%00"])
def test_malformed_ticket_is_refused_before_redis(alice, redis_server, bad):
    before = lookups(redis_server)
    assert whoami(query=f"ticket={bad}")["authenticated"] is False
    assert lookups(redis_server) == before


def test_ticket_of_a_session_since_logged_out_is_anonymous(alice):
    ticket = mint(alice)["ticket"]
    alice.post("/accounts/logout/")
    assert whoami(query=f"ticket={ticket}")["authenticated"] is False


def test_redis_holds_the_tickets_hash_not_the_ticket(alice, redis_server):
    ticket = mint(alice)["ticket"]
    keys = [k.decode() for k in redis_server.keys("ws-ticket:*")]
    assert f"ws-ticket:{hashlib.sha256(ticket.encode()).hexdigest()}" in keys
    assert not any(ticket in k for k in keys)
    assert all(ticket.encode() not in b"".join(redis_server.hvals(k)) for k in keys)


def test_redis_holds_no_credential_behind_a_ticket(alice, redis_server):
    """
    README: "Redis holds no credential": what a reader of Redis finds behind a ticket is
    neither the session key nor anything that opens a socket without the ticket itself.
    """
    ticket = mint(alice, path="/ws/live/")["ticket"]
    stored = redis_server.hget(tickets.redis_key(ticket), "grant")
    key = alice.session.session_key
    assert stored and key.encode() not in stored and ticket.encode() not in stored
    # Redis' view alone (the entry's name and value) is not a ticket, nor does it open one.
    assert whoami(query=f"session_key={stored.hex()[:32]}")["authenticated"] is False
    assert tickets.unseal(ticket, "/ws/live/", stored) == key  # only the ticket unseals it


def test_a_ticket_opens_only_the_path_it_was_minted_for(alice, redis_server):
    """A ticket minted for /ws/live/ opens nothing else, and is used up by the attempt."""
    ticket = mint(alice, path="/ws/live/")["ticket"]
    assert whoami(query=f"ticket={ticket}")["authenticated"] is False  # /ws/whoami/
    assert redis_server.exists(tickets.redis_key(ticket)) == 0
    right = mint(alice, path="/ws/whoami/")["ticket"]
    assert whoami(query=f"ticket={right}")["user"] == "alice"


def test_concurrent_redemptions_of_one_ticket_open_one_socket(alice, redis_server):
    """
    README: tickets are "redeemed atomically, read and deleted in one Redis script": 20
    handshakes offering the same ticket at once, against the real Redis, make exactly one
    known socket.
    """
    ticket = mint(alice)["ticket"]

    async def run():
        sockets = [communicator(query=f"ticket={ticket}") for _ in range(20)]
        await asyncio.gather(*(socket.connect() for socket in sockets))
        frames = [await socket.receive_json_from() for socket in sockets]
        await asyncio.gather(*(socket.disconnect() for socket in sockets))
        return frames

    frames = async_to_sync(run)()
    assert sorted(frame["auth"] for frame in frames) == ["none"] * 19 + ["ticket"]


def test_concurrent_redeem_hands_out_the_session_key_once(redis_server):
    """
    README: a ticket opens "one socket, once", "read and deleted in one Redis script". 20
    redemptions race, as 20 Daphne processes would: each on an event loop of its own, so on a
    Redis connection of its own (within one loop, redemptions waiting at once share one
    script call: contract.batching). They get the key once. The control, GET then DEL in two
    commands, hands it out more than once in the same race: this test can tell an atomic
    redemption from one that is not.
    """

    def race(redeem):
        ticket = tickets.mint("s" * 32, "/ws/live/")
        start = threading.Barrier(20)

        async def one():
            for purpose in (None, "redeem"):  # connected first, then all at once
                await tickets.async_client(purpose).ping()
            start.wait()
            try:
                return await redeem(ticket, "/ws/live/")
            finally:
                await close_async_clients()

        with ThreadPoolExecutor(20) as pool:
            return list(pool.map(lambda _: asyncio.run(one()), range(20)))

    async def get_then_del(ticket, path):
        client = tickets.async_client()
        value = await client.hget(tickets.redis_key(ticket), "grant")
        await asyncio.sleep(0.01)  # what any other await in between would allow
        await client.delete(tickets.redis_key(ticket))
        return value and tickets.unseal(ticket, path, value)

    winners = race(tickets.redeem)
    assert winners.count("s" * 32) == 1 and winners.count(None) == 19
    assert race(get_then_del).count("s" * 32) > 1


def test_redemptions_waiting_at_once_share_one_round_trip(redis_server):
    """
    Within one process, 20 handshakes redeeming at once reach Redis as one request (one
    script call for the 20 tickets: Redis reads it in one go), not 20; each gets its own
    ticket's grant, and a ticket given twice is handed out once. The control, 20 DELs sent one
    by one at once, takes a read each.
    """
    minted = [tickets.mint(f"{i:032d}", "/ws/live/") for i in range(19)]
    minted.append(minted[0])

    async def reads_for(redeem):
        client = tickets.async_client()
        # The first redemption opens the connection they keep (a handshake of a few requests).
        assert await tickets.redeem("0" * 43, "/ws/live/") is None
        before = (await client.info("stats"))["total_reads_processed"]
        got = await asyncio.gather(*(redeem(ticket) for ticket in minted))
        reads = (await client.info("stats"))["total_reads_processed"] - before - 1  # an INFO
        await close_async_clients()
        return got, reads

    got, reads = asyncio.run(reads_for(lambda ticket: tickets.redeem(ticket, "/ws/live/")))
    assert got == [f"{i:032d}" for i in range(19)] + [None]
    assert reads == 1
    minted[:] = [tickets.mint("s" * 32, "/ws/live/") for _ in range(20)]
    _, control = asyncio.run(
        reads_for(lambda ticket: tickets.async_client().delete(tickets.redis_key(ticket)))
    )
    assert control >= 20  # and more: each new connection says hello first


def test_stale_cookie_does_not_hide_a_valid_ticket(alice):
    """
    README ("What happens when"): "a stale cookie comes with a valid key or ticket → known: a
    cookie hides nothing unless it gives a logged-in user". Unknown and anonymous cookies.
    """
    visitor = Client()
    session = visitor.session
    session["seen"] = True
    session.save()
    for stale in ("0" * 32, session.session_key):
        frame = whoami(query=f"ticket={mint(alice)['ticket']}", cookie=f"sessionid={stale}")
        assert (frame["user"], frame["auth"]) == ("alice", "ticket")


def test_ticket_refusals_are_logged_without_the_ticket(alice, caplog):
    ticket = mint(alice)["ticket"]
    with caplog.at_level("INFO", logger="asgi_site"):
        whoami(query=f"ticket={ticket}")
        whoami(query=f"ticket={ticket}")
    assert (
        "ticket refused: unknown, expired, already used, or minted for another path" in caplog.text
    )
    assert ticket not in caplog.text


# Precedence: a cookie that gives a logged-in user, then a ticket, then the session key.


def test_cookie_beats_ticket_and_leaves_it_unused(alice):
    ticket = mint(alice)["ticket"]
    cookie = f"sessionid={alice.session.session_key}"
    assert whoami(query=f"ticket={ticket}", cookie=cookie)["auth"] == "cookie"
    assert whoami(query=f"ticket={ticket}")["auth"] == "ticket"


def test_ticket_beats_session_key(alice):
    ticket, key = mint(alice)["ticket"], alice.session.session_key
    assert whoami(query=f"ticket={ticket}&session_key={key}")["auth"] == "ticket"


def test_bad_ticket_falls_back_to_session_key(alice):
    key = alice.session.session_key
    assert whoami(query=f"ticket={'B' * 43}&session_key={key}")["auth"] == "session_key"


def test_credential_given_both_ways_is_refused(alice):
    ticket = mint(alice)["ticket"]
    frame = whoami(query=f"ticket={ticket}", subprotocols=["realtime", f"ticket.{ticket}"])
    assert frame["authenticated"] is False


# Re-checks: a logged-in socket closes with 4401 once its session no longer stands.


def watch_close(client, change, settings):
    """Open a socket with the client's session key, apply `change`, return the close code."""
    settings.WS_SESSION_RECHECK_SECONDS = 0.2
    key = client.session.session_key

    async def run():
        socket = communicator(query=f"session_key={key}")
        assert (await socket.connect())[0]
        assert (await socket.receive_json_from())["authenticated"] is True
        await sync_to_async(change)()
        message = await socket.receive_output(timeout=3)
        await socket.wait()
        return message

    message = async_to_sync(run)()
    assert message["type"] == "websocket.close"
    return message["code"]


def test_recheck_closes_after_password_change(alice, settings):
    def change_password():
        user = get_user_model().objects.get(username="alice")
        user.set_password("new-pass")
        user.save()

    assert watch_close(alice, change_password, settings) == 4401


def test_recheck_closes_after_deactivation(alice, settings):
    def deactivate():
        get_user_model().objects.filter(username="alice").update(is_active=False)

    assert watch_close(alice, deactivate, settings) == 4401


def test_recheck_closes_an_expired_session(alice, settings):
    """
    README: a re-check closes the socket of a session "deleted or expired" with 4401: the
    session row stays, only its expire_date passes.
    """
    key = alice.session.session_key

    def expire():
        past = timezone.now() - timedelta(seconds=1)
        assert Session.objects.filter(pk=key).update(expire_date=past) == 1

    assert watch_close(alice, expire, settings) == 4401
    assert Session.objects.filter(pk=key).exists()


def test_recheck_closes_after_session_deletion(alice, settings):
    key = alice.session.session_key
    assert watch_close(alice, lambda: Session.objects.filter(pk=key).delete(), settings) == 4401


def rechecks(caplog):
    return sum(r.getMessage().startswith("re-checked 1 sessions") for r in caplog.records)


def test_recheck_keeps_a_valid_socket_open(alice, settings, caplog):
    """
    README: re-checks close only sockets whose session ended: a valid session's socket
    stays open through five re-checks, counted in asgi_site.upkeep's "re-checked" log lines.
    """
    settings.WS_SESSION_RECHECK_SECONDS = 0.1
    key = alice.session.session_key

    async def run():
        socket = communicator(query=f"session_key={key}")
        await socket.connect()
        await socket.receive_json_from()
        before = rechecks(caplog)
        deadline = time.monotonic() + 10
        while rechecks(caplog) < before + 5:  # five re-checks, seen to run
            assert time.monotonic() < deadline, f"{rechecks(caplog) - before} re-checks ran"
            await asyncio.sleep(0.05)
        quiet = await socket.receive_nothing(timeout=0.2)
        await socket.disconnect()
        return quiet

    with caplog.at_level("INFO", logger="asgi_site.upkeep"):
        assert async_to_sync(run)() is True


# SECRET_KEY rotation: Django's get_user honours SECRET_KEY_FALLBACKS; Channels' does not.


def test_secret_key_rotation_with_fallback_keeps_the_socket_user(alice, settings):
    old = settings.SECRET_KEY
    cookie = f"sessionid={alice.session.session_key}"
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-brand-new-secret-key", [old]
    assert whoami(cookie=cookie)["user"] == "alice"


def test_secret_key_rotation_without_fallback_logs_the_socket_out(alice, settings):
    """
    README: rotating SECRET_KEY "with the old key in the fallbacks keeps socket users logged
    in"; the control: without SECRET_KEY_FALLBACKS the same, untouched session is anonymous,
    and known again once the fallback is back (nothing cycled or deleted it meanwhile).
    """
    key = alice.session.session_key
    cookie = f"sessionid={key}"
    old = settings.SECRET_KEY
    row = Session.objects.values_list("session_data", "expire_date").get(pk=key)
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-brand-new-secret-key", []
    assert whoami(cookie=cookie)["authenticated"] is False
    assert Session.objects.values_list("session_data", "expire_date").get(pk=key) == row
    settings.SECRET_KEY_FALLBACKS = [old]
    assert whoami(cookie=cookie)["user"] == "alice"


def test_logout_everywhere_deletes_every_session_of_the_user(alice):
    second = Client()
    second.login(username="alice", password="alice-pass")
    keys = {alice.session.session_key, second.session.session_key}
    assert Session.objects.filter(pk__in=keys).count() == 2
    assert alice.post("/accounts/logout-everywhere/").status_code == 302
    assert Session.objects.filter(pk__in=keys).count() == 0
    assert second.get("/").context["user"].is_authenticated is False
