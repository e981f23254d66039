"""
Fan-out per process and cheap ticket handshakes (issue 13).

Broadcast groups are joined once per Daphne process (asgi_site.broadcast), which hands each
event to its own sockets in memory: the layer's group holds one member per process however
many sockets there are, every socket still gets every announcement once and in order, and
what Redis carries per announcement does not grow with the sockets. A ticket names its
user: its handshake reads no session from the database, and logout or a password change
revokes the tickets still outstanding.

In process first (WebsocketCommunicator, the in-memory layer, the redis_server fixture's
Redis), then on the real stack.
"""

import asyncio
import json

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from asgi_site import auth
from asgi_site.asgi import application
from contract import history, tickets
from contract.groups import LIVE_GROUP, announcement, session_hash
from tests.sockets import whoami
from tests.stack import Stack, wait_until

HEADERS = [(b"host", b"realtime.localhost:8000"), (b"origin", b"http://app.localhost:8000")]
STREAM = "history:live"


@pytest.fixture
def clean_history(redis_server):
    redis_server.delete(STREAM)
    yield redis_server
    redis_server.delete(STREAM)


def live_socket():
    return WebsocketCommunicator(application, "/ws/live/", headers=HEADERS)


async def texts_until_quiet(socket, timeout=0.3):
    texts = []
    while not await socket.receive_nothing(timeout=timeout):
        texts.append((await socket.receive_json_from())["text"])
    return texts


def mint(client, path="/ws/whoami/"):
    response = client.post("/ws-ticket/", {"path": path}, content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()["ticket"]


# In process.


@pytest.mark.django_db
def test_one_membership_per_process_however_many_sockets(clean_history):
    """25 sockets: the layer's group holds one channel, every socket gets every event in
    order, and the process leaves the group with its last socket, not before."""
    layer = get_channel_layer()

    async def run():
        await layer.flush()
        sockets = [live_socket() for _ in range(25)]
        for socket in sockets:
            assert (await socket.connect())[0]
        members = len(layer.groups.get(LIVE_GROUP, {}))
        for i in range(5):
            event = await history.arecord(LIVE_GROUP, announcement("bob", f"m{i}"))
            await layer.group_send(LIVE_GROUP, event)
        got = [await texts_until_quiet(socket) for socket in sockets]
        for socket in sockets[1:]:
            await socket.disconnect()
        await asyncio.sleep(0.1)
        with_one = len(layer.groups.get(LIVE_GROUP, {}))
        await sockets[0].disconnect()
        for _ in range(50):
            if not layer.groups.get(LIVE_GROUP):
                break
            await asyncio.sleep(0.02)
        return members, got, with_one, len(layer.groups.get(LIVE_GROUP, {}))

    members, got, with_one, with_none = async_to_sync(run)()
    assert members == 1
    assert got == [[f"m{i}" for i in range(5)]] * 25
    assert (with_one, with_none) == (1, 0)


@pytest.mark.django_db
def test_events_out_of_order_reach_every_socket_once_in_order(clean_history):
    """The later of two events is sent first: every socket of the process reads the earlier
    from history (the slow path, in its own task) and skips it when it arrives."""
    layer = get_channel_layer()

    async def run():
        sockets = [live_socket() for _ in range(10)]
        for socket in sockets:
            assert (await socket.connect())[0]
        first = await history.arecord(LIVE_GROUP, announcement("bob", "first"))
        await layer.group_send(LIVE_GROUP, first)
        second = await history.arecord(LIVE_GROUP, announcement("bob", "second"))
        third = await history.arecord(LIVE_GROUP, announcement("bob", "third"))
        await layer.group_send(LIVE_GROUP, third)
        await layer.group_send(LIVE_GROUP, second)
        fourth = await history.arecord(LIVE_GROUP, announcement("bob", "fourth"))
        await layer.group_send(LIVE_GROUP, fourth)
        got = [await texts_until_quiet(socket) for socket in sockets]
        for socket in sockets:
            await socket.disconnect()
        return got

    assert async_to_sync(run)() == [["first", "second", "third", "fourth"]] * 10


@pytest.mark.django_db
def test_a_ticket_handshake_reads_no_session_from_the_database(alice, redis_server, session_reads):
    ticket = mint(alice)
    frame = whoami(subprotocols=["realtime", f"ticket.{ticket}"])
    assert (frame["user"], frame["auth"]) == ("alice", "ticket")
    assert session_reads == []
    # The control: the session key is looked up, once.
    key = alice.session.session_key
    assert whoami(query=f"session_key={key}")["auth"] == "session_key"
    assert session_reads == [key]


@pytest.mark.django_db
def test_the_ticket_user_loads_the_rest_lazily(alice, redis_server, django_assert_num_queries):
    user = get_user_model().objects.get(username="alice")
    grant = tickets.Grant("k" * 32, user.pk, "alice", "django.contrib.auth.backends.ModelBackend")
    with django_assert_num_queries(0):
        lazy = auth.TicketUser(grant)
        assert (lazy.pk, lazy.get_username(), lazy.username) == (user.pk, "alice", "alice")
        assert lazy.is_authenticated and not lazy.is_anonymous
    with django_assert_num_queries(1):
        assert lazy.date_joined == user.date_joined and lazy.is_active
    gone = auth.TicketUser(tickets.Grant("k" * 32, 10**6, "nobody", grant.backend))
    assert gone.load().is_authenticated is False


@pytest.mark.django_db
def test_a_password_change_revokes_the_users_outstanding_tickets(alice, redis_server):
    other = Client()
    assert other.login(username="alice", password="alice-pass")
    outstanding = [mint(alice), mint(other)]
    user = get_user_model().objects.get(username="alice")
    user.set_password("alice-pass-2")
    user.save()  # Django tells every password validator: ours revokes and ends sockets
    assert [whoami(query=f"ticket={t}")["authenticated"] for t in outstanding] == [False] * 2
    fresh = Client()
    assert fresh.login(username="alice", password="alice-pass-2")
    assert whoami(query=f"ticket={mint(fresh)}")["user"] == "alice"


@pytest.mark.django_db
def test_logout_revokes_only_that_sessions_tickets(alice, redis_server):
    other = Client()
    assert other.login(username="alice", password="alice-pass")
    mine, theirs = mint(alice), mint(other)
    digest = tickets.redis_key(mine).split(":")[1]
    assert redis_server.sismember(
        tickets.OF_SESSION_KEY.format(session_hash(alice.session.session_key)), digest
    )
    alice.post("/accounts/logout/")
    assert redis_server.exists(tickets.redis_key(mine)) == 0
    assert whoami(query=f"ticket={mine}")["authenticated"] is False
    assert whoami(query=f"ticket={theirs}")["user"] == "alice"


@pytest.mark.django_db
def test_log_out_everywhere_revokes_every_session_of_the_user(alice, redis_server):
    other = Client()
    assert other.login(username="alice", password="alice-pass")
    theirs = mint(other)
    alice.post("/accounts/logout-everywhere/")
    assert whoami(query=f"ticket={theirs}")["authenticated"] is False


# On the real stack.


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack("cross-domain", tmp_path_factory.mktemp("fanout")) as stack:
        yield stack
        stack.assert_no_secrets_logged()


def announce(stack, session, text):
    response = stack.csrf_post(session, "/announce/", json={"text": text})
    assert response.status_code == 200, response.text


def traffic(client):
    """(commands, bytes Redis sent) so far."""
    stats = client.info("stats")
    return stats["total_commands_processed"], stats["total_net_output_bytes"]


def test_stack_every_socket_on_both_processes_gets_every_announcement_in_order(stack):
    """
    Sockets on both Daphne processes, 10 then 200: the group holds one member per process,
    each socket gets 10 announcements from two senders at once, each once and in order, and
    Redis does no more per announcement (commands, bytes sent) with 20 times the sockets.
    """
    senders = [stack.login()[0] for _ in range(2)]
    client = redis.Redis(port=stack.redis_port)

    async def round_(sockets, tag):
        before = traffic(client)
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    lambda s=s, n=n: [announce(stack, s, f"{tag} {n} {i}") for i in range(5)]
                )
                for n, s in enumerate(senders)
            )
        )
        after = traffic(client)
        got = []
        for ws in sockets:
            frames = []
            while len(frames) < 10:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["text"].startswith(tag):
                    frames.append(frame)
            got.append(frames)
        return got, [(a - b) / 10 for a, b in zip(after, before, strict=True)]

    def in_order(frames):
        ids = [history.parse_id(f["id"]) for f in frames]
        per_sender = [[f["text"] for f in frames if f["text"].split()[1] == str(n)] for n in "01"]
        return (
            ids == sorted(ids)
            and len(set(ids)) == 10
            and per_sender
            == [[f"{frames[0]['text'].split()[0]} {n} {i}" for i in range(5)] for n in "01"]
        )

    async def run():
        sockets = []
        per_announcement = []
        for count in (10, 200):
            for i in range(count - len(sockets)):
                port = stack.daphne_ports[i % 2]
                sockets.append(await stack.connect("/ws/live/", port=port, open_timeout=30))
            members = client.zcard("asgi:group:live")
            got, cost = await round_(sockets, f"r{count}")
            assert all(in_order(frames) for frames in got), got[:2]
            per_announcement.append((members, cost))
        for ws in sockets:
            await ws.close()
        return per_announcement

    (small_members, small), (large_members, large) = asyncio.run(run())
    assert small_members == large_members == 2
    # The idle receive loops add a command now and then: a little slack, not 20 times more.
    assert large[0] <= small[0] + 3, (small, large)
    assert large[1] <= small[1] * 1.5 + 2000, (small, large)


def test_stack_tickets_minted_before_logout_or_a_password_change_are_refused(stack):
    stack.create_user("revoked", "revoked-pass-1")
    leaving, _ = stack.login("revoked", "revoked-pass-1")
    changer, _ = stack.login("revoked", "revoked-pass-1")
    other, _ = stack.login("revoked", "revoked-pass-1")
    before_logout = stack.ticket(leaving)
    assert stack.csrf_post(leaving, "/accounts/logout/").status_code in (200, 302)
    assert stack.whoami(f"ticket={before_logout}")["authenticated"] is False

    before_change = stack.ticket(other)
    page = stack.http(changer, "GET", "/accounts/password_change/")
    token = page.text.split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
    response = stack.http(
        changer, "POST", "/accounts/password_change/",
        data={"old_password": "revoked-pass-1", "new_password1": "revoked-pass-2",
              "new_password2": "revoked-pass-2", "csrfmiddlewaretoken": token},
    )  # fmt: skip
    assert response.status_code == 302, response.text
    assert stack.whoami(f"ticket={before_change}")["authenticated"] is False
    # The session that changed the password stays logged in: its new tickets work.
    frame = stack.whoami(f"ticket={stack.ticket(changer)}")
    assert (frame["user"], frame["auth"]) == ("revoked", "ticket")
    wait_until(lambda: "ticket refused" in stack.log_text(), 5, "the refusals were not logged")
