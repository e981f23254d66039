"""The mission on the real stack: nginx, Gunicorn, two Daphne processes and Redis on loopback."""

import asyncio
import json

import requests
import websockets


def test_same_domain_cookie_is_known(same_stack):
    session, key = same_stack.login()
    frame = same_stack.whoami(cookie=f"sessionid={key}")
    assert frame == {"type": "whoami", "user": "demo", "authenticated": True, "auth": "cookie"}


def test_same_domain_straight_to_daphne_port_cookie_is_known(same_stack):
    """Cookies ignore ports: Daphne's own port on the same host still gets the cookie."""
    session, key = same_stack.login()
    for port in same_stack.daphne_ports:
        frame = same_stack.whoami(cookie=f"sessionid={key}", port=port)
        assert (frame["user"], frame["auth"]) == ("demo", "cookie")


def test_same_domain_without_cookie_is_anonymous(same_stack):
    assert same_stack.whoami()["authenticated"] is False


def test_cross_domain_without_cookie_or_key_is_anonymous(cross_stack):
    cross_stack.login()  # logged in on APP_HOST; the browser keeps that cookie there
    assert cross_stack.whoami() == {
        "type": "whoami",
        "user": None,
        "authenticated": False,
        "auth": "none",
    }


def test_cross_domain_with_session_key_is_known(cross_stack):
    session, key = cross_stack.login()
    frame = cross_stack.whoami(query=f"session_key={key}")
    assert (frame["user"], frame["authenticated"], frame["auth"]) == ("demo", True, "session_key")


def test_cross_domain_key_dies_with_logout(cross_stack):
    session, key = cross_stack.login()
    assert cross_stack.csrf_post(session, "/accounts/logout/").status_code == 302
    assert cross_stack.whoami(query=f"session_key={key}")["authenticated"] is False


def test_foreign_origin_gets_403(cross_stack):
    session, key = cross_stack.login()
    status = cross_stack.whoami(query=f"session_key={key}", origin="http://www.evil.test")
    assert status == 403


def test_realtime_healthz_and_app_healthz(cross_stack):
    s = requests.Session()
    assert cross_stack.http(s, "GET", "/healthz").json() == {"status": "ok"}
    assert cross_stack.http(s, "GET", "/healthz", host=cross_stack.realtime_host).json() == {
        "status": "ok"
    }
    assert cross_stack.http(s, "GET", "/", host="unknown.test").status_code == 404


def test_announcement_reaches_sockets_on_both_daphne_processes(cross_stack):
    session, key = cross_stack.login()

    async def run():
        # One socket straight on each Daphne process, so both are surely in the group.
        sockets = [
            await websockets.connect(
                f"ws://{cross_stack.realtime_host}:{port}/ws/live/",
                host="127.0.0.1",
                port=port,
                origin=cross_stack.app_origin,
                open_timeout=10,
            )
            for port in cross_stack.daphne_ports
        ]
        try:
            response = await asyncio.to_thread(
                cross_stack.csrf_post, session, "/announce/", json={"text": "to everyone"}
            )
            assert response.status_code == 200, response.text
            return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for ws in sockets]
        finally:
            for ws in sockets:
                await ws.close()

    frames = asyncio.run(run())
    assert frames == [{"type": "announcement", "user": "demo", "text": "to everyone"}] * 2


def test_socket_message_crosses_daphne_processes(cross_stack):
    session, key = cross_stack.login()
    first, second = cross_stack.daphne_ports

    async def run():
        def open_on(port, query=""):
            return websockets.connect(
                f"ws://{cross_stack.realtime_host}:{port}/ws/live/{query}",
                host="127.0.0.1",
                port=port,
                origin=cross_stack.app_origin,
                open_timeout=10,
            )

        async with open_on(first, f"?session_key={key}") as sender, open_on(second) as watcher:
            await sender.send(json.dumps({"text": "across"}))
            return json.loads(await asyncio.wait_for(watcher.recv(), 5))

    assert asyncio.run(run()) == {"type": "message", "user": "demo", "text": "across"}


def test_announce_anonymous_gets_json_403(cross_stack):
    s = requests.Session()
    response = cross_stack.csrf_post(s, "/announce/", data={"text": "hi"})
    assert response.status_code == 403 and response.json() == {"error": "login required"}


def test_secrets_in_urls_stay_out_of_every_log(cross_stack):
    """Keys sent every way a URL can carry them: none reaches nginx, Gunicorn or Daphne logs."""
    session, key = cross_stack.login()
    made_up = "m" * 32
    cross_stack.secrets.add(made_up)
    cross_stack.whoami(query=f"session_key={key}")
    cross_stack.whoami(query=f"session_key={made_up}")
    cross_stack.whoami(query=f"session_key={key}", origin="http://www.evil.test")
    plain = requests.Session()
    # Plain HTTP on a socket path, and on pages, with the key in the query string.
    cross_stack.http(plain, "GET", f"/ws/whoami/?session_key={key}", host=cross_stack.realtime_host)
    cross_stack.http(plain, "GET", f"/healthz?session_key={key}", host=cross_stack.realtime_host)
    cross_stack.http(plain, "GET", f"/?session_key={key}")
    cross_stack.http(plain, "GET", f"/nope?session_key={made_up}")
    logs = cross_stack.log_text()
    assert "/ws/whoami/" in logs and "/nope" in logs  # the requests were logged...
    assert key not in logs and made_up not in logs  # ...without their query strings
