"""
Limits an anonymous client cannot exceed (issue #14, item 5), on the real stack: per-address
rates for login POSTs, /announce/, /ws-ticket/ and socket handshakes, and a cap on the
sockets an address holds, all answered 429 in JSON by nginx; the client address is nginx's
peer whatever X-Forwarded-For claims; a per-user cap on open sockets across every Daphne
process (close code 4409). Each test here failed before these limits existed.

Daphne serves this module's `application` in the `defaults` stack (ASGI_APP): the real
application plus one test path that echoes the client address Daphne believes.
"""

import asyncio
import json
import re
import time
import uuid

import pytest
import redis
import requests
import websockets

from shared_settings.topology import Limits
from tests.stack import Stack, wait_until

TOO_MANY = {"error": "too many requests, slow down"}
TOO_MANY_SOCKETS = 4409
ECHO_PATH = "/ws/echo-client/"
# Small limits, so the tests reach them in a few requests.
SMALL = {
    "LIMIT_LOGIN_RATE": "1r/m",
    "LIMIT_LOGIN_BURST": 3,
    "LIMIT_ANNOUNCE_RATE": "1r/m",
    "LIMIT_ANNOUNCE_BURST": 3,
    "LIMIT_TICKET_RATE": "1r/m",
    "LIMIT_TICKET_BURST": 3,
    "LIMIT_SOCKET_CONNECTIONS": 5,
    "WS_MAX_SOCKETS_PER_USER": 3,
    "WS_SESSION_RECHECK_SECONDS": 1,
}


def __getattr__(name):
    """`application` for Daphne (ASGI_APP=tests.test_limits:application), built on demand so
    that pytest, collecting this module, never sets up the socket half."""
    if name != "application":
        raise AttributeError(name)
    from asgi_site.asgi import application as real

    async def application(scope, receive, send):
        if scope["type"] == "websocket" and scope["path"] == ECHO_PATH:
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(scope["client"])})
            await send({"type": "websocket.close", "code": 1000})
            return
        await real(scope, receive, send)

    return application


def spoofed():
    """Headers a script would send to pass for another client each time."""
    address = f"10.{uuid.uuid4().int % 250}.0.1"
    return {"X-Forwarded-For": address, "X-Real-IP": address, "X-Forwarded-Port": "1"}


def connect_spoofed(stack, path):
    """Open a socket through nginx as the browser would, with spoofed() headers besides."""
    return websockets.connect(
        stack.ws_url(path),
        host="127.0.0.1",
        port=stack.public_port,
        origin=stack.app_origin,
        additional_headers=spoofed(),
        open_timeout=10,
    )


def assert_too_many(response):
    assert response.status_code == 429, response.text[:200]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == TOO_MANY


def post_until_limited(stack, session, path, tries, **kwargs):
    """POST `path` up to `tries` times; return the statuses up to the first 429, and it."""
    statuses, limited = [], None
    for _ in range(tries):
        headers = {"X-CSRFToken": session.cookies["csrftoken"], **spoofed()}
        response = stack.http(session, "POST", path, headers=headers, **kwargs)
        if response.status_code == 429:
            limited = response
            break
        statuses.append(response.status_code)
        if "ticket" in response.text:
            stack.secrets.add(response.json()["ticket"])  # no log may hold it
    return statuses, limited


def login_form(stack, session):
    page = stack.http(session, "GET", "/accounts/login/")
    assert page.status_code == 200
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)


def post_logins(stack, tries, password="wrong-password"):
    session = requests.Session()
    token = login_form(stack, session)
    data = {"username": "demo", "password": password, "csrfmiddlewaretoken": token}
    statuses, limited = [], None
    for _ in range(tries):
        response = stack.http(session, "POST", "/accounts/login/", data=data, headers=spoofed())
        if response.status_code == 429:
            limited = response
            break
        statuses.append(response.status_code)
    return session, statuses, limited


def redis_client(stack):
    return redis.Redis(port=stack.redis_port, socket_timeout=2)


def counted(stack):
    """{user socket set: how many sockets it counts}, straight from Redis."""
    client = redis_client(stack)
    return {key.decode(): client.zcard(key) for key in client.scan_iter("ws-user-sockets:*")}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A cross-domain stack with small limits, and the one login they leave room for."""
    with Stack("cross-domain", tmp_path_factory.mktemp("limits"), env=SMALL, limits={}) as stack:
        session, key = stack.login()
        yield stack, session, key
        stack.assert_no_secrets_logged()


def test_a_burst_of_logins_gets_429_in_json_and_the_page_stays(small):
    stack, _, _ = small
    _, statuses, limited = post_logins(stack, 10)
    # The fixture's login took the rate's slot; the burst (3) passes, the next is refused,
    # whatever X-Forwarded-For each one claimed.
    assert statuses == [200] * 3  # a wrong password: the form again
    assert_too_many(limited)
    # The right password is refused too: the address is limited, not the account...
    _, statuses, limited = post_logins(stack, 1, password="demo-pass")
    assert statuses == [] and limited is not None
    # ...and the login page itself is never limited.
    for _ in range(10):
        login_form(stack, requests.Session())


@pytest.mark.parametrize(
    "path, body",
    [("/announce/", {"text": "again"}), ("/ws-ticket/", {"path": "/ws/whoami/"})],
    ids=["announce", "ws-ticket"],
)
def test_a_burst_of_posts_gets_429_in_json(small, path, body):
    stack, session, _ = small
    statuses, limited = post_until_limited(stack, session, path, 10, json=body)
    assert statuses == [200] * 4  # the rate's slot and the burst of 3
    assert_too_many(limited)


def test_sockets_held_by_one_address_are_capped(small):
    """LIMIT_SOCKET_CONNECTIONS (5) open at once through nginx; the 6th gets 429, in JSON, and
    a socket that closes makes room."""
    stack, session, _ = small

    async def run():
        held = [await stack.connect("/ws/whoami/") for _ in range(5)]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect_spoofed(stack, "/ws/whoami/")
        page = await asyncio.to_thread(stack.http, session, "GET", "/")
        assert all(ws.close_code is None for ws in held)
        await held.pop().close()

        async def reopened():
            try:
                return await stack.connect("/ws/whoami/")
            except websockets.InvalidStatus:
                await asyncio.sleep(0.1)
                return None

        for _ in range(30):
            if ws := await reopened():
                held.append(ws)
                break
        for ws in held:
            await ws.close()
        return refused.value.response, page.status_code, len(held)

    response, page_status, reopened = asyncio.run(run())
    assert response.status_code == 429
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(response.body) == TOO_MANY
    assert page_status == 200  # pages are not sockets
    assert reopened == 5


async def whoami(stack, key, port):
    """A logged-in /ws/whoami/ straight to one Daphne; return it and its first frame."""
    ws = await stack.connect(f"/ws/whoami/?session_key={key}", port=port)
    try:
        return ws, json.loads(await asyncio.wait_for(ws.recv(), 5))
    except websockets.ConnectionClosed:
        return ws, None


def test_one_user_holds_at_most_the_cap_across_every_process(small):
    """WS_MAX_SOCKETS_PER_USER (3) sockets over both Daphne processes; the 4th, on either,
    is accepted and closed with 4409, and nothing else closes; a socket that closes makes
    room for the next."""
    stack, _, key = small
    first, second = stack.daphne_ports

    async def run():
        held = [await whoami(stack, key, port) for port in (first, second, first)]
        assert [frame["user"] for _, frame in held] == ["demo"] * 3
        codes = []
        for port in (second, first):
            extra, frame = await whoami(stack, key, port)
            await asyncio.wait_for(extra.wait_closed(), 5)
            codes.append((frame, extra.close_code))
        anonymous = await stack.connect("/ws/whoami/", port=second)
        await asyncio.sleep(1.5)  # past a re-check: still nothing else closed
        still_open = [ws.close_code for ws, _ in held] + [anonymous.close_code]
        for ws, _ in held:
            await ws.ping()
        at_cap = counted(stack)
        await held.pop()[0].close()
        await asyncio.to_thread(
            wait_until, lambda: list(counted(stack).values()) == [2], 5, "a closed socket counts"
        )
        again, frame = await whoami(stack, key, second)
        await asyncio.sleep(0.3)
        reopened = (frame and frame["user"], again.close_code)
        for ws in [again, anonymous, *(ws for ws, _ in held)]:
            await ws.close()
        await asyncio.to_thread(
            wait_until, lambda: counted(stack) == {}, 5, "closed sockets still count"
        )
        return codes, still_open, at_cap, reopened

    codes, still_open, at_cap, reopened = asyncio.run(run())
    assert codes == [(None, TOO_MANY_SOCKETS)] * 2
    assert still_open == [None] * 4
    assert list(at_cap.values()) == [3]  # the refused ones never counted
    assert reopened == ("demo", None)


def test_a_ticket_counts_its_socket_in_its_redemption(small):
    """
    A ticket's redemption counts its socket against the same cap, in the same Redis script:
    3 ticket sockets over both processes, the 4th closed with 4409; a ticket tried on
    another path is refused and leaves no count behind; a closed socket makes room.
    """
    stack, session, _ = small
    first, second = stack.daphne_ports

    def mint(path):
        # Straight to Gunicorn, past nginx's ticket rate limit, which the tests above use up.
        token = session.cookies.get("csrftoken") or stack._csrf_token(session)
        response = session.post(
            f"http://127.0.0.1:{stack.gunicorn_port}/ws-ticket/",
            json={"path": path},
            headers={
                "Host": f"{stack.app_host}:{stack.public_port}",
                "X-CSRFToken": token,
                "Origin": stack.app_origin,
            },
            timeout=10,
        )
        assert response.status_code == 200, response.text
        stack.secrets.add(response.json()["ticket"])
        return response.json()["ticket"]

    async def with_ticket(port, path="/ws/whoami/"):
        ticket = await asyncio.to_thread(mint, path)
        ws = await stack.connect("/ws/whoami/", port=port, subprotocols=[f"ticket.{ticket}"])
        try:
            return ws, json.loads(await asyncio.wait_for(ws.recv(), 5))
        except websockets.ConnectionClosed:
            return ws, None

    async def run():
        held = [await with_ticket(port) for port in (first, second)]
        elsewhere, frame = await with_ticket(first, path="/ws/live/")
        wrong_path = (frame["authenticated"], list(counted(stack).values()))
        held.append(await with_ticket(first))
        assert [frame["auth"] for _, frame in held] == ["ticket"] * 3
        extra, frame = await with_ticket(second)
        await asyncio.wait_for(extra.wait_closed(), 5)
        refused = (frame, extra.close_code)
        at_cap = counted(stack)
        await held.pop()[0].close()
        await asyncio.to_thread(
            wait_until, lambda: list(counted(stack).values()) == [2], 5, "a closed socket counts"
        )
        for ws in [elsewhere, *(ws for ws, _ in held)]:
            await ws.close()
        return refused, wrong_path, at_cap

    refused, wrong_path, at_cap = asyncio.run(run())
    assert refused == (None, TOO_MANY_SOCKETS)
    assert wrong_path == (False, [2])  # refused, and not counted
    assert list(at_cap.values()) == [3]  # neither the refused one nor the wrong path counts
    wait_until(lambda: counted(stack) == {}, 5, "closed sockets still count")


def test_the_cap_fails_open_without_redis_and_counts_again_after(small):
    """Redis down: logged-in sockets are admitted past the cap, and a warning logged. Redis
    back (empty): the next re-check counts them again, and the cap holds."""
    stack, _, key = small
    ports = stack.daphne_ports * 2

    async def run():
        stack.supervisorctl("stop", "redis")
        try:
            held = [await whoami(stack, key, port) for port in ports]
        finally:
            stack.supervisorctl("start", "redis")
        await asyncio.to_thread(
            wait_until, lambda: list(counted(stack).values()) == [4], 15, "not counted again"
        )
        extra, frame = await whoami(stack, key, ports[0])
        await asyncio.wait_for(extra.wait_closed(), 5)
        codes = [ws.close_code for ws, _ in held]
        for ws, _ in held:
            await ws.close()
        return [f and f["user"] for _, f in held], codes, (frame, extra.close_code)

    users, codes, extra = asyncio.run(run())
    assert users == ["demo"] * 4 and codes == [None] * 4
    assert extra == (None, TOO_MANY_SOCKETS)
    assert "user socket count not counted" in stack.log_text()


def test_a_burst_of_handshakes_gets_429_in_json(tmp_path):
    """Same-domain, on /ws/: past LIMIT_SOCKET_BURST handshakes at once, 429; pages go on."""
    env = {"LIMIT_SOCKET_RATE": "30r/m", "LIMIT_SOCKET_BURST": 40}
    with Stack("same-domain", tmp_path, env=env, limits={}) as stack:

        async def run():
            opened = 0
            for _ in range(80):
                try:
                    async with connect_spoofed(stack, "/ws/whoami/"):
                        opened += 1
                except websockets.InvalidStatus as exc:
                    return opened, exc.response
            return opened, None

        opened, response = asyncio.run(run())
        page = stack.http(requests.Session(), "GET", "/accounts/login/")
    # The readiness checks took a few; at most the burst and the rate's slot pass.
    assert 20 <= opened <= 41
    assert response is not None and response.status_code == 429
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(response.body) == TOO_MANY
    assert page.status_code == 200


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    """A cross-domain stack with every limit at its default, Daphne serving this module."""
    env = {"ASGI_APP": "tests.test_limits:application"}
    with Stack("cross-domain", tmp_path_factory.mktemp("defaults"), env=env, limits={}) as stack:
        yield stack
        stack.assert_no_secrets_logged()


@pytest.mark.parametrize("headers", [{}, spoofed()], ids=["plain", "spoofed"])
def test_daphne_sees_nginx_peer_not_x_forwarded_for(defaults, headers):
    """X-Forwarded-For: 6.6.6.6 (and a port) from the client: Daphne sees 127.0.0.1 and the
    client's own port."""
    headers = {**headers, "X-Forwarded-For": "6.6.6.6, 7.7.7.7"} if headers else headers

    async def run():
        async with websockets.connect(
            defaults.ws_url(ECHO_PATH),
            host="127.0.0.1",
            port=defaults.public_port,
            origin=defaults.app_origin,
            additional_headers=headers,
        ) as ws:
            return json.loads(await ws.recv()), ws.local_address[1]

    client, port = asyncio.run(run())
    assert client == ["127.0.0.1", port]


def test_a_page_load_is_never_limited_but_a_script_is(defaults):
    """The browser's sequence (the page, 3 tickets, 6 sockets), three times over as after a
    restart, passes every default limit; a script's burst of logins does not."""
    session, key = defaults.login()

    async def page_load():
        page = await asyncio.to_thread(defaults.http, session, "GET", "/")
        tickets = [await asyncio.to_thread(defaults.ticket, session) for _ in range(3)]
        queries = [
            "",
            *(f"ticket={t}" for t in tickets),
            f"session_key={key}",
            f"session_key={key}",
        ]
        sockets = await asyncio.gather(
            *(defaults.connect(f"/ws/whoami/?{q}" if q else "/ws/whoami/") for q in queries)
        )
        frames = [json.loads(await ws.recv()) for ws in sockets]
        return page.status_code, [f["authenticated"] for f in frames], sockets

    async def run():
        loads = [await page_load() for _ in range(3)]
        for _, _, sockets in loads:
            for ws in sockets:
                await ws.close()
        return [(status, known) for status, known, _ in loads]

    expected = (200, [False, True, True, True, True, True])
    assert asyncio.run(run()) == [expected] * 3
    log = (defaults.state_dir / "log" / "nginx-access.log").read_text()
    assert '" 429 ' not in log

    limits = Limits.from_env({})
    began = time.monotonic()
    _, statuses, limited = post_logins(defaults, limits.login_burst + 5)
    # The rate gives a slot back every 6 s (10r/m), and a login takes a while (the password
    # hash): those slots may pass too, and no more.
    refills = 1 + int((time.monotonic() - began) // 6)
    assert limited is not None and len(statuses) <= limits.login_burst + refills
    assert_too_many(limited)
