"""
Churn and races on the real stack (issue: hardening under churn and abuse): sockets closed
while broadcasts are in flight, handshakes that straddle a logout, a password change, and
an idle Redis. Each test here failed on the main it was written against.
"""

import asyncio
import contextlib
import json
import re
import time

import pytest
import redis
import websockets

from contract import tickets
from tests import raw
from tests.load import Announcer
from tests.stack import Stack, wait_until

GROUP_KEY = "asgi:group:live"  # channels-redis: f"{prefix}:group:{name}"
TRACEBACK = re.compile(r"Traceback|Exception inside application")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack(
        "cross-domain", tmp_path_factory.mktemp("hardening"), env={"WS_SESSION_RECHECK_SECONDS": 1}
    ) as stack:
        yield stack
        stack.assert_no_secrets_logged()


def daphne_logs(stack):
    return [(stack.state_dir / "log" / f"daphne-{i + 1}.log").read_text() for i in range(2)]


async def live(stack, key=None, port=None):
    query = f"?session_key={key}" if key else ""
    return await stack.connect(f"/ws/live/{query}", port=port, open_timeout=30)


async def flood(ws):
    """Send 100 messages a second, ten times the limit, until the server closes us."""

    async def send():
        with contextlib.suppress(websockets.ConnectionClosed):
            for i in range(1500):
                await ws.send(json.dumps({"text": f"flood {i}"}))
                await asyncio.sleep(0.01)

    sender = asyncio.create_task(send())
    code = await drain_until_closed(ws)
    sender.cancel()
    return code


async def drain_until_closed(ws, timeout=30):
    async def drain():
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass

    await asyncio.wait_for(drain(), timeout)
    return ws.close_code


def test_sockets_closed_while_broadcasts_are_in_flight_leave_nothing_behind(stack):
    """
    Closed with 4429 (flood), 4401 (logout) or by the client while announcements arrive: no
    traceback, no dead group member, and upkeep counts only the sockets really open.
    """
    announcer_session, _ = stack.login()
    kept_session, kept_key = stack.login()
    doomed_session, doomed_key = stack.login()
    layer = redis.Redis(port=stack.redis_port)

    def upkeep_counts_one_socket_each():
        counts = [re.findall(r"of (\d+) sockets", log) for log in daphne_logs(stack)]
        return all(found and found[-1] == "1" for found in counts)

    async def run():
        # One logged-in socket stays open on each Daphne process: the bookkeeping's reference.
        kept = [await live(stack, kept_key, port=port) for port in stack.daphne_ports]
        flooders = [await live(stack) for _ in range(60)]
        logged_out = [await live(stack, doomed_key) for _ in range(40)]
        leaving = [await live(stack, doomed_key) for _ in range(40)]
        with Announcer(stack, announcer_session):
            await asyncio.sleep(0.3)
            logout = asyncio.to_thread(stack.csrf_post, doomed_session, "/accounts/logout/")
            codes = await asyncio.gather(
                *(flood(ws) for ws in flooders),
                *(ws.close() for ws in leaving),
                logout,
                *(drain_until_closed(ws) for ws in logged_out),
            )
            await asyncio.sleep(0.5)
        # Only the two kept sockets are members and counted, once the closes have settled.
        await asyncio.to_thread(
            wait_until, lambda: layer.zcard(GROUP_KEY) == 2, 10, "dead members stay in the group"
        )
        await asyncio.to_thread(
            wait_until, upkeep_counts_one_socket_each, 5, "upkeep counts sockets that are gone"
        )
        for ws in kept:
            await ws.close()
        await asyncio.to_thread(
            wait_until, lambda: layer.zcard(GROUP_KEY) == 0, 10, "a closed socket stays a member"
        )
        return codes

    codes = asyncio.run(run())
    assert codes[:60] == [4429] * 60
    assert codes[-40:] == [4401] * 40
    assert [log for log in daphne_logs(stack) if TRACEBACK.search(log)] == []


@pytest.fixture(scope="module")
def events_only(tmp_path_factory):
    """A stack whose re-checks are ten minutes apart: only session.end events end sockets."""
    with Stack(
        "cross-domain", tmp_path_factory.mktemp("events"), env={"WS_SESSION_RECHECK_SECONDS": 600}
    ) as stack:
        yield stack
        stack.assert_no_secrets_logged()


async def whoami_socket(stack, query):
    """Open /ws/whoami/; return (socket, frame), or None if the handshake was refused."""
    try:
        ws = await stack.connect(f"/ws/whoami/?{query}", open_timeout=30)
    except websockets.InvalidStatus:
        return None
    try:
        return ws, json.loads(await asyncio.wait_for(ws.recv(), 10))
    except websockets.ConnectionClosed:
        return ws, {"authenticated": False, "closed": ws.close_code}


def test_no_handshake_that_straddles_a_logout_stays_logged_in(events_only):
    """150 handshakes with a logout in the middle: none logged in 1 s after the logout."""
    for attempt in range(5):
        session, key = events_only.login()

        async def run(session, key, attempt):
            opening = [
                asyncio.create_task(whoami_socket(events_only, f"session_key={key}"))
                for _ in range(150)
            ]
            await asyncio.sleep(0.05 * attempt)
            await asyncio.to_thread(events_only.csrf_post, session, "/accounts/logout/")
            logged_out = time.monotonic()
            opened = [pair for pair in await asyncio.gather(*opening) if pair]
            await asyncio.sleep(max(0.0, logged_out + 1.0 - time.monotonic()))
            known = [ws for ws, frame in opened if frame["authenticated"]]
            survivors = [ws for ws in known if ws.close_code is None]
            for ws, _ in opened:
                await ws.close()
            return len(known), len(survivors)

        known, survivors = asyncio.run(run(session, key, attempt))
        assert survivors == 0, (
            f"try {attempt}: {survivors} of {known} known sockets outlived logout"
        )


def test_password_change_closes_the_sockets_of_every_other_session(events_only):
    """Within 1 s every socket of the user's other sessions closes with 4401; the session
    that changed the password stays logged in over HTTP, as Django keeps it."""
    events_only.create_user("changer", "changer-pass-1")
    mine, _ = events_only.login("changer", "changer-pass-1")
    other, other_key = events_only.login("changer", "changer-pass-1")
    page = events_only.http(mine, "GET", "/accounts/password_change/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)

    async def run():
        sockets = [await whoami_socket(events_only, f"session_key={other_key}") for _ in range(3)]
        assert all(frame["authenticated"] for _, frame in sockets)
        response = await asyncio.to_thread(
            events_only.http, mine, "POST", "/accounts/password_change/",
            data={"old_password": "changer-pass-1", "new_password1": "changer-pass-2",
                  "new_password2": "changer-pass-2", "csrfmiddlewaretoken": token},
        )  # fmt: skip
        changed = time.monotonic()
        assert response.status_code == 302, response.text
        for ws, _ in sockets:
            await asyncio.wait_for(ws.wait_closed(), 5)
        return time.monotonic() - changed, [ws.close_code for ws, _ in sockets]

    took, codes = asyncio.run(run())
    assert codes == [4401] * 3
    assert took < 1.0
    assert "You are <strong>changer</strong>" in events_only.http(mine, "GET", "/").text


def test_an_idle_healthy_redis_is_not_an_outage(events_only):
    """Sockets open on both processes, nothing sent for 13 s: no 'unreachable' warning, and a
    logout still closes at once."""
    session, key = events_only.login()

    async def run():
        sockets = [
            await events_only.connect(f"/ws/whoami/?session_key={key}", port=port)
            for port in events_only.daphne_ports
        ]
        before = events_only.log_text().count("channel layer unreachable")
        await asyncio.sleep(13)
        after = events_only.log_text().count("channel layer unreachable")
        await asyncio.to_thread(events_only.csrf_post, session, "/accounts/logout/")
        logged_out = time.monotonic()
        for ws in sockets:
            await asyncio.wait_for(ws.wait_closed(), 5)
        return after - before, time.monotonic() - logged_out, [ws.close_code for ws in sockets]

    warnings, took, codes = asyncio.run(run())
    assert warnings == 0
    assert codes == [4401, 4401]
    assert took < 1.0


def test_redis_holds_no_reusable_credential_behind_a_ticket(stack):
    """HGETALL ws-ticket:<sha256> gives neither the session key nor the ticket."""
    session, key = stack.login()
    ticket = stack.ticket(session, path="/ws/live/")
    entry = redis.Redis(port=stack.redis_port).hgetall(tickets.redis_key(ticket))
    assert sorted(entry) == [b"grant", b"user"]
    stored = b" ".join(entry.values())
    assert key.encode() not in stored and ticket.encode() not in stored


def test_a_ticket_opens_only_the_path_it_was_minted_for(stack):
    session, _ = stack.login()
    live_ticket = stack.ticket(session, path="/ws/live/")
    assert stack.whoami(query=f"ticket={live_ticket}")["authenticated"] is False
    assert stack.whoami(query=f"ticket={stack.ticket(session)}")["user"] == "demo"


@pytest.mark.parametrize(
    "origin",
    ["{realtime}", "{app}#", "{app}?", "{app}/"],
    ids=["the realtime origin", "empty fragment", "empty query", "a path"],
)
def test_only_the_app_origin_opens_sockets(stack, origin):
    origin = origin.format(app=stack.app_origin, realtime=stack.realtime_origin)
    assert stack.whoami(origin=origin) == 403
    assert stack.whoami(origin=stack.app_origin)["type"] == "whoami"


def test_each_half_answers_only_its_own_host(stack):
    """Gunicorn serves no page for the realtime host; Daphne answers no other host."""
    app, realtime = stack.app_host, stack.realtime_host
    # An absolute-form request line picks nginx's app server; the Host header names the other.
    target = f"http://{app}:{stack.public_port}/accounts/login/"
    answer = raw.request(stack.public_port, target, [("Host", f"{realtime}:{stack.public_port}")])
    assert answer.status == 400
    assert raw.request(stack.public_port, "/accounts/login/", [("Host", app)]).status == 200
    daphne = stack.daphne_ports[0]
    assert raw.request(daphne, "/healthz", [("Host", "evil.test")]).status == 400
    assert raw.request(daphne, "/healthz", [("Host", realtime)]).status == 200
    assert raw.request(daphne, "/healthz", [("Host", f"127.0.0.1:{daphne}")]).status == 200
    handshake = raw.handshake_headers("evil.test", stack.app_origin)
    assert raw.request(daphne, "/ws/whoami/", handshake).status == 403
    handshake = raw.handshake_headers(f"{realtime}:{daphne}", stack.app_origin)
    assert raw.request(daphne, "/ws/whoami/", handshake).status == 101
