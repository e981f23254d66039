"""The live feed consumer and the HTTP views, in process."""

import asyncio
import json
import time

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client

from asgi_site.asgi import application

pytestmark = pytest.mark.django_db
HEADERS = [(b"host", b"realtime.localhost:8000"), (b"origin", b"http://app.localhost:8000")]


def live_exchange(cookie, *frames):
    """Connect two sockets to /ws/live/, send `frames` on the first, return what each got."""

    async def run():
        headers = HEADERS + ([(b"cookie", cookie.encode())] if cookie else [])
        sender = WebsocketCommunicator(application, "/ws/live/", headers=headers)
        watcher = WebsocketCommunicator(application, "/ws/live/", headers=HEADERS)
        assert (await sender.connect())[0] and (await watcher.connect())[0]
        got, seen = [], []
        for frame in frames:
            if isinstance(frame, bytes):
                await sender.send_to(bytes_data=frame)
            else:
                await sender.send_to(text_data=frame)
            got.append(await sender.receive_json_from())
        while not await watcher.receive_nothing(timeout=0.2):
            seen.append(await watcher.receive_json_from())
        await sender.disconnect()
        await watcher.disconnect()
        return got, seen

    return async_to_sync(run)()


def test_logged_in_message_reaches_every_socket(alice, redis_server):
    # The message is recorded in the live group's history (Redis) and carries its id.
    got, seen = live_exchange(f"sessionid={alice.session.session_key}", json.dumps({"text": "hi"}))
    expected = {"type": "message", "user": "alice", "text": "hi", "id": got[0].get("id")}
    assert got == [expected] and seen == [expected]
    assert redis_server.xrevrange("history:live", count=1)[0][0].decode() == expected["id"]


def test_anonymous_message_gets_an_error_and_stays_connected():
    got, seen = live_exchange(None, json.dumps({"text": "hi"}), json.dumps({"text": "again"}))
    assert got == [{"type": "error", "error": "login required"}] * 2
    assert seen == []


@pytest.mark.parametrize(
    "frame, error",
    [
        ("not json", "invalid JSON"),
        (b"\x00\x01", "text frames only"),
        ("[1, 2]", 'send {"text": "..."}'),
        (json.dumps({"text": 5}), 'send {"text": "..."}'),
        (json.dumps({"text": "x" * 1001}), "text longer than 1000 characters"),
    ],
)
def test_bad_frames_get_an_error_frame(alice, frame, error):
    got, seen = live_exchange(f"sessionid={alice.session.session_key}", frame)
    assert got == [{"type": "error", "error": error}] and seen == []


def test_announce_needs_login():
    response = Client(enforce_csrf_checks=False).post("/announce/", {"text": "hi"})
    assert response.status_code == 403
    assert response.json() == {"error": "login required"}


def test_announce_is_csrf_protected(alice):
    strict = Client(enforce_csrf_checks=True)
    strict.cookies = alice.cookies
    assert strict.post("/announce/", {"text": "hi"}).status_code == 403


@pytest.mark.parametrize("body", [{}, {"text": "   "}, {"text": "x" * 1001}])
def test_announce_rejects_bad_text(alice, body):
    response = alice.post("/announce/", json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and "error" in response.json()


def test_announce_rejects_invalid_json(alice):
    response = alice.post("/announce/", "{nope", content_type="application/json")
    assert response.status_code == 400


def test_announce_get_is_not_allowed(alice):
    assert alice.get("/announce/").status_code == 405


def test_home_shows_the_session_key_row_only_when_logged_in(alice):
    anonymous = Client().get("/")
    assert anonymous.status_code == 200 and b"?session_key=" not in anonymous.content
    page = alice.get("/").content.decode()
    assert f"?session_key={alice.session.session_key}" in page
    assert "Realtime host, cookie only" in page


def test_healthz():
    assert Client().get("/healthz").json() == {"status": "ok"}


def test_flood_limit_is_a_burst_of_20_then_10_a_second(settings):
    """
    README: "a socket sends more than `WS_MESSAGE_RATE` (10/s, burst 20) messages → closed
    with **4429**". 20 frames sent at once are all answered and the 21st closes the socket;
    on a second socket, 0.1 s after a burst of 20 one more frame is allowed (one token
    refilled at 10/s), and the next is not. Other rate or burst values fail this test.
    """
    assert (settings.WS_MESSAGE_RATE, settings.WS_MESSAGE_BURST) == (10, 20)
    frame = json.dumps({"text": "hi"})  # anonymous: each answered with an error frame

    async def burst(socket, count):
        for _ in range(count):
            await socket.send_to(text_data=frame)
        return [await socket.receive_json_from() for _ in range(count)]

    async def closed(socket):
        message = await socket.receive_output(timeout=2)
        return message["type"] == "websocket.close" and message.get("code")

    async def run():
        first = WebsocketCommunicator(application, "/ws/live/", headers=HEADERS)
        assert (await first.connect())[0]
        for _ in range(21):  # all at once: no time for a token to come back
            await first.send_to(text_data=frame)
        answered = [await first.receive_json_from() for _ in range(20)]
        first_close = await closed(first)

        second = WebsocketCommunicator(application, "/ws/live/", headers=HEADERS)
        assert (await second.connect())[0]
        began = time.monotonic()
        assert len(await burst(second, 20)) == 20
        await asyncio.sleep(0.1)
        one_more = await burst(second, 1)
        await second.send_to(text_data=frame)
        second_close = await closed(second)
        return answered, first_close, one_more, second_close, time.monotonic() - began

    answered, first_close, one_more, second_close, took = async_to_sync(run)()
    assert answered == [{"type": "error", "error": "login required"}] * 20
    assert first_close == 4429
    assert one_more == [{"type": "error", "error": "login required"}]
    assert took < 0.2, f"{took:.2f} s: too slow to tell one refilled token from two"
    assert second_close == 4429
