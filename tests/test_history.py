"""
History per broadcast group (issue #10): every announcement and live message is recorded in
a Redis Stream and carries its id; a socket that reconnects with ?since=<id> gets what it
missed, in order, exactly once, then the live messages; one too far behind gets a gap frame.

In process first (WebsocketCommunicator, the in-memory layer, the redis_server fixture's
Redis), then on the real stack. Every test here fails without the history: frames carried
no "id", since= was ignored and nothing was recorded in Redis.
"""

import asyncio
import json
import random
import re
import time

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from asgi_site.asgi import application
from contract import history
from contract.groups import LIVE_GROUP, announcement
from tests.load import Announcer
from tests.stack import Stack

HEADERS = [(b"host", b"realtime.localhost:8000"), (b"origin", b"http://app.localhost:8000")]
STREAM = "history:live"
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


def numeric(stream_id):
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


# In process.


@pytest.fixture
def clean_history(redis_server):
    redis_server.delete(STREAM)
    yield redis_server
    redis_server.delete(STREAM)


def announce(client, text):
    return client.post("/announce/", json.dumps({"text": text}), content_type="application/json")


async def frames_until_quiet(socket, timeout=0.2):
    frames = []
    while not await socket.receive_nothing(timeout=timeout):
        frames.append(await socket.receive_json_from())
    return frames


async def send_live(text):
    """What POST /announce/ does, from the test's event loop: record, then send."""
    event = await history.arecord(LIVE_GROUP, announcement("alice", text))
    await get_channel_layer().group_send(LIVE_GROUP, event)
    return event["id"]


def live_socket(query=""):
    return WebsocketCommunicator(application, f"/ws/live/{query}", headers=HEADERS)


@pytest.mark.django_db
def test_reconnect_with_since_replays_the_missed_then_live(alice, clean_history):
    ids = [announce(alice, f"missed {i}").json()["id"] for i in range(4)]

    async def run():
        socket = live_socket(f"?since={ids[0]}")
        assert (await socket.connect())[0]
        replayed = await frames_until_quiet(socket)
        await send_live("live")
        live = await frames_until_quiet(socket)
        await socket.disconnect()
        return replayed, live

    replayed, live = async_to_sync(run)()
    assert replayed == [
        {"type": "announcement", "user": "alice", "text": f"missed {i}", "id": ids[i]}
        for i in range(1, 4)
    ]
    assert [(f["text"], numeric(f["id"]) > numeric(ids[-1])) for f in live] == [("live", True)]


@pytest.mark.django_db
def test_no_since_no_replay_and_a_malformed_since_is_an_error_frame(alice, clean_history):
    announce(alice, "before")
    bad = "1-2-3"

    async def run():
        fresh, malformed = live_socket(), live_socket(f"?since={bad}")
        twice = live_socket("?since=1-0&since=2-0")
        for socket in (fresh, malformed, twice):
            assert (await socket.connect())[0]
        got = [await frames_until_quiet(s) for s in (fresh, malformed, twice)]
        await send_live("after")
        got += [await frames_until_quiet(s) for s in (fresh, malformed, twice)]
        for socket in (fresh, malformed, twice):
            await socket.disconnect()
        return got

    fresh, malformed, twice, *after = async_to_sync(run)()
    error = {
        "type": "error",
        "error": "since must be one message id (digits-digits): sending live messages only",
    }
    assert (fresh, malformed, twice) == ([], [error], [error])
    assert [[f["text"] for f in frames] for frames in after] == [["after"]] * 3


@pytest.mark.django_db
def test_since_no_longer_kept_gets_a_gap_then_what_is_kept(alice, clean_history):
    ids = [announce(alice, f"m{i}").json()["id"] for i in range(6)]
    # Trim as Redis would once more than WS_HISTORY_MAX were added: m0..m2 are gone.
    clean_history.xtrim(STREAM, maxlen=3, approximate=False)

    async def replay(since):
        socket = live_socket(f"?since={since}")
        assert (await socket.connect())[0]
        frames = await frames_until_quiet(socket)
        await socket.disconnect()
        return [f["type"] if f["type"] == "gap" else f["text"] for f in frames]

    # m1 was trimmed and m2 after it too: a gap. m2 was trimmed, but m3 (kept) follows it
    # directly: nothing is lost, no gap. An id that was never recorded: a gap.
    assert async_to_sync(replay)(ids[1]) == ["gap", "m3", "m4", "m5"]
    assert async_to_sync(replay)(ids[2]) == ["m3", "m4", "m5"]
    assert async_to_sync(replay)(ids[5]) == []
    assert async_to_sync(replay)("1-0") == ["gap", "m3", "m4", "m5"]
    future = f"{numeric(ids[5])[0] + 10**6}-0"  # e.g. Redis lost its data since
    assert async_to_sync(replay)(future) == ["gap"]


@pytest.mark.django_db
def test_live_events_sent_out_of_order_reach_a_socket_once_in_order(clean_history):
    """Two posts race: the later id is sent first. The socket reads the earlier from
    history before it, and skips it when its own event arrives."""
    layer = get_channel_layer()

    async def run():
        socket = live_socket()
        assert (await socket.connect())[0]
        first = await history.arecord(LIVE_GROUP, announcement("bob", "first"))
        await layer.group_send(LIVE_GROUP, first)
        second = await history.arecord(LIVE_GROUP, announcement("bob", "second"))
        third = await history.arecord(LIVE_GROUP, announcement("bob", "third"))
        await layer.group_send(LIVE_GROUP, third)
        await layer.group_send(LIVE_GROUP, second)
        frames = await frames_until_quiet(socket)
        await socket.disconnect()
        return frames, [first["id"], second["id"], third["id"]]

    frames, ids = async_to_sync(run)()
    assert [(f["text"], f["id"]) for f in frames] == list(
        zip(["first", "second", "third"], ids, strict=True)
    )


@pytest.mark.django_db
def test_an_announcement_that_cannot_be_sent_is_not_recorded(alice, clean_history, monkeypatch):
    """Recorded, then the send fails: 503, and the entry is taken back."""
    announce(alice, "kept")

    async def down(*args):
        raise ConnectionError("channel layer down")

    monkeypatch.setattr(get_channel_layer(), "group_send", down)
    response = announce(alice, "lost")
    assert response.status_code == 503
    assert response.json() == {"error": "realtime service unavailable, try again"}
    kept = [json.loads(fields[b"event"])["text"] for _, fields in clean_history.xrange(STREAM)]
    assert kept == ["kept"]


def test_malformed_ids_are_refused():
    assert history.parse_id("1700000000000-0") == (1700000000000, 0)
    assert history.parse_id("10-1") > history.parse_id("9-10")
    for bad in ["", "1", "1-", "-1", "1-a", " 1-0", "1-0 ", "1_0", "1-0-0", "1" * 21 + "-0",
                f"{2**64}-0", None, 5]:  # fmt: skip
        assert history.parse_id(bad) is None, bad


# On the real stack.


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack("cross-domain", tmp_path_factory.mktemp("history")) as stack:
        yield stack
        stack.assert_no_secrets_logged()


def post(stack, session, text):
    response = stack.csrf_post(session, "/announce/", json={"text": text})
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def recv(ws, timeout=5):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def quiet(ws, timeout=0.5):
    """Every frame until none comes for `timeout` seconds."""
    frames = []
    while True:
        try:
            frames.append(await recv(ws, timeout))
        except TimeoutError:
            return frames


def test_stack_reconnect_with_since_gets_the_missed_once_in_order_then_live(stack):
    """The demo's way: a fresh ticket in the header on each connect, and ?since=<last id>."""
    session, key = stack.login()

    def live(query=""):
        ticket = stack.ticket(session, path="/ws/live/")
        return stack.connect(f"/ws/live/{query}", subprotocols=["realtime", f"ticket.{ticket}"])

    async def run():
        async with live() as ws:
            await asyncio.to_thread(post, stack, session, "seen")
            seen = await recv(ws)
        # Disconnected: two announcements and a message from another socket are missed.
        await asyncio.to_thread(post, stack, session, "missed 1")
        async with stack.connect(f"/ws/live/?session_key={key}") as sender:
            await sender.send(json.dumps({"text": "missed 2"}))
            await recv(sender)  # its own message, once recorded and sent
        await asyncio.to_thread(post, stack, session, "missed 3")
        async with live(f"?since={seen['id']}") as ws:
            replayed = await quiet(ws)
            await asyncio.to_thread(post, stack, session, "live")
            after = await quiet(ws)
        return seen, replayed, after

    seen, replayed, after = asyncio.run(run())
    assert seen["text"] == "seen" and STREAM_ID.fullmatch(seen["id"])
    assert [(f["type"], f["user"], f["text"]) for f in replayed] == [
        ("announcement", "demo", "missed 1"),
        ("message", "demo", "missed 2"),
        ("announcement", "demo", "missed 3"),
    ]
    assert [f["text"] for f in after] == ["live"]
    ids = [numeric(f["id"]) for f in [seen, *replayed, *after]]
    assert ids == sorted(set(ids))


def test_stack_reconnects_under_load_see_every_message_once_in_order(stack):
    """
    Announcements every 10 ms while a client disconnects and reconnects with since= six
    times, to either Daphne process: every frame has an id, the ids only grow, and they
    are exactly the ids recorded between its first and last frame, none missing or twice.
    """
    session, _ = stack.login()
    client = redis.Redis(port=stack.redis_port)

    async def run():
        frames, since = [], None
        with Announcer(stack, session, text="race"):
            for round_ in range(6):
                query = f"?since={since}" if since else ""
                port = stack.daphne_ports[round_ % 2]
                # max_queue=None: a client that stops reading when 16 frames wait (the
                # default) sees the server's close frame only after close_timeout (10 s).
                async with stack.connect(f"/ws/live/{query}", port=port, max_queue=None) as ws:
                    for _ in range(random.randint(3, 15)):
                        frames.append(await recv(ws))
                        since = frames[-1]["id"]
                await asyncio.sleep(random.uniform(0.05, 0.3))
        newest = client.xrevrange(STREAM, count=1)[0][0].decode()
        async with stack.connect(f"/ws/live/?since={since}") as ws:
            while since != newest:
                frames.append(await recv(ws))
                since = frames[-1]["id"]
        return frames

    frames = asyncio.run(run())
    assert all(f["type"] == "announcement" and STREAM_ID.fullmatch(f["id"]) for f in frames)
    ids = [f["id"] for f in frames]
    recorded = [i.decode() for i, _ in client.xrange(STREAM, min=ids[0], max=ids[-1])]
    assert ids == recorded
    assert [numeric(i) for i in ids] == sorted({numeric(i) for i in ids})


def test_stack_fresh_client_without_since_gets_only_live_messages(stack):
    session, _ = stack.login()

    async def run():
        await asyncio.to_thread(post, stack, session, "before")
        async with stack.connect("/ws/live/") as ws:
            before = await quiet(ws)
            live_id = await asyncio.to_thread(post, stack, session, "after")
            return before, await quiet(ws), live_id

    before, after, live_id = asyncio.run(run())
    assert before == []
    assert after == [{"type": "announcement", "user": "demo", "text": "after", "id": live_id}]


def test_stack_redis_down_announce_503_and_nothing_half_recorded(stack):
    session, key = stack.login()
    client = redis.Redis(port=stack.redis_port)
    last = post(stack, session, "before the outage")
    length = client.xlen(STREAM)

    async def message_during_outage():
        async with stack.connect(f"/ws/live/?session_key={key}") as ws:
            await ws.send(json.dumps({"text": "during"}))
            return await recv(ws)

    stack.supervisorctl("stop", "redis")
    try:
        response = stack.csrf_post(session, "/announce/", json={"text": "during"})
        assert response.status_code == 503
        assert response.json() == {"error": "realtime service unavailable, try again"}
        assert asyncio.run(message_during_outage()) == {
            "type": "error",
            "error": "realtime service unavailable, try again",
        }
    finally:
        stack.supervisorctl("start", "redis")

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    deadline = time.monotonic() + 10
    while not answers():
        assert time.monotonic() < deadline, "Redis did not come back"
        time.sleep(0.1)
    # Redis saved on stop and loaded on start: the history is as it was, nothing added.
    assert client.xlen(STREAM) == length
    assert client.xrevrange(STREAM, count=1)[0][0].decode() == last

    # Announcements are accepted again once the layer finds Redis back.
    deadline = time.monotonic() + 5
    while (
        response := stack.csrf_post(session, "/announce/", json={"text": "after"})
    ).status_code != 200:
        assert time.monotonic() < deadline, "announcements did not come back within 5 s"
        time.sleep(0.2)
    after = response.json()["id"]

    async def reconnect():
        async with stack.connect(f"/ws/live/?since={last}") as ws:
            return await quiet(ws)

    # Reconnecting with the id seen before the outage: only what came after it.
    replayed = asyncio.run(reconnect())
    assert [(f["text"], f["id"]) for f in replayed] == [("after", after)]


def test_stack_two_senders_at_once_both_reach_every_new_socket(stack):
    """
    Two sockets on the two Daphne processes send at the same moment, ten times, each time to
    two sockets opened just before (no since=): each of those gets both messages, once, in
    history order. A new socket used to take the first message it saw as its place in the
    history and drop the other, recorded a moment earlier, as already sent.
    """
    session, key = stack.login()

    async def open_on(port):
        return await stack.connect(f"/ws/live/?session_key={key}", port=port)

    async def one_round(n):
        senders = [await open_on(port) for port in stack.daphne_ports]
        watchers = [await open_on(port) for port in stack.daphne_ports]
        texts = [f"round {n} from {i}" for i in range(2)]
        sends = [ws.send(json.dumps({"text": t})) for ws, t in zip(senders, texts, strict=True)]
        await asyncio.gather(*sends)
        got = []
        for ws in watchers:
            frames = []
            while len(frames) < 2:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            got.append(frames)
        for ws in senders + watchers:
            await ws.close()
        return texts, got

    async def run():
        return [await one_round(n) for n in range(10)]

    for texts, got in asyncio.run(run()):
        for frames in got:
            assert sorted(f["text"] for f in frames) == texts
            ids = [history.parse_id(f["id"]) for f in frames]
            assert ids == sorted(ids)


@pytest.fixture(scope="module")
def short_stack(tmp_path_factory):
    """A stack whose history keeps (at least) the last 5 messages."""
    with Stack(
        "cross-domain", tmp_path_factory.mktemp("short-history"), env={"WS_HISTORY_MAX": 5}
    ) as stack:
        yield stack
        stack.assert_no_secrets_logged()


def test_stack_client_too_far_behind_gets_a_gap_then_what_is_kept(short_stack):
    """
    WS_HISTORY_MAX=5, trimmed with MAXLEN ~ (whole nodes of 100 entries): after 250 more
    announcements the client's id is gone. It gets {"type": "gap"}, then every entry still
    kept, in order (the newest of those sent), then live messages.
    """
    stack = short_stack
    session, _ = stack.login()
    client = redis.Redis(port=stack.redis_port)

    async def run():
        async with stack.connect("/ws/live/") as ws:
            seen_id = await asyncio.to_thread(post, stack, session, "seen")
            assert (await recv(ws))["id"] == seen_id
        for i in range(250):
            await asyncio.to_thread(post, stack, session, f"bulk {i}")
        kept = client.xlen(STREAM)
        async with stack.connect(f"/ws/live/?since={seen_id}") as ws:
            replayed = await quiet(ws)
            await asyncio.to_thread(post, stack, session, "live")
            after = await quiet(ws)
        return kept, replayed, after

    kept, replayed, after = asyncio.run(run())
    assert 5 <= kept < 250, kept
    assert replayed[0] == {"type": "gap"}
    assert [f["text"] for f in replayed[1:]] == [f"bulk {i}" for i in range(250 - kept, 250)]
    assert [f["text"] for f in after] == ["live"]
