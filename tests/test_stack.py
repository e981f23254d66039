"""The mission on the real stack: nginx, Gunicorn, two Daphne processes and Redis on loopback."""

import asyncio
import json
import re
import uuid

import requests
import websockets

from tests.stack import Stack, wait_until


def test_same_domain_cookie_is_known(same_stack):
    session, key = same_stack.login()
    frame = same_stack.whoami(cookie=f"sessionid={key}")
    assert frame == {
        "type": "whoami",
        "user": "demo",
        "authenticated": True,
        "auth": "cookie",
        "cookies": ["sessionid"],
        "origin": same_stack.app_origin,
    }


def test_same_domain_straight_to_daphne_port_cookie_is_known(same_stack):
    """Cookies ignore ports: Daphne's own port on the same host still gets the cookie."""
    session, key = same_stack.login()
    for port in same_stack.daphne_ports:
        frame = same_stack.whoami(cookie=f"sessionid={key}", port=port)
        assert (frame["user"], frame["auth"]) == ("demo", "cookie")


def test_same_domain_without_cookie_is_anonymous(same_stack):
    assert same_stack.whoami()["authenticated"] is False


def same_domain_session_key_sockets(stack, key):
    """whoami with a valid session key and no cookie: in the URL, then as a subprotocol."""
    return [
        stack.whoami(query=f"session_key={key}"),
        stack.whoami(subprotocols=["realtime", f"session_key.{key}"]),
    ]


def test_same_domain_session_key_is_off_by_default(same_stack):
    """Same-domain the cookie always arrives: a session key alone authenticates nobody."""
    session, key = same_stack.login()
    anonymous = {
        "type": "whoami",
        "user": None,
        "authenticated": False,
        "auth": "none",
        "cookies": [],
        "origin": same_stack.app_origin,
    }
    assert same_domain_session_key_sockets(same_stack, key) == [anonymous, anonymous]
    assert same_stack.whoami(cookie=f"sessionid={key}")["auth"] == "cookie"


def test_same_domain_session_key_can_be_switched_on(tmp_path):
    """WS_SESSION_KEY_FALLBACK=true on a same-domain stack: the key is known again."""
    env = {"WS_SESSION_KEY_FALLBACK": "true"}
    with Stack("same-domain", tmp_path, asgi_processes=1, env=env) as stack:
        session, key = stack.login()
        frames = same_domain_session_key_sockets(stack, key)
        assert [(f["user"], f["auth"]) for f in frames] == [("demo", "session_key")] * 2
    stack.assert_no_secrets_logged()


def test_cross_domain_without_cookie_or_key_is_anonymous(cross_stack):
    cross_stack.login()  # logged in on APP_HOST; the browser keeps that cookie there
    assert cross_stack.whoami() == {
        "type": "whoami",
        "user": None,
        "authenticated": False,
        "auth": "none",
        "cookies": [],  # the server says so: no cookie arrived on the other domain
        "origin": cross_stack.app_origin,
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
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for ws in sockets]
            return response.json()["id"], frames
        finally:
            for ws in sockets:
                await ws.close()

    sent_id, frames = asyncio.run(run())
    expected = {"type": "announcement", "user": "demo", "text": "to everyone", "id": sent_id}
    assert frames == [expected] * 2


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

    frame = asyncio.run(run())
    assert re.fullmatch(r"\d+-\d+", frame.pop("id"))  # its place in the group's history
    assert frame == {"type": "message", "user": "demo", "text": "across"}


def test_announce_anonymous_gets_json_403(cross_stack):
    s = requests.Session()
    response = cross_stack.csrf_post(s, "/announce/", data={"text": "hi"})
    assert response.status_code == 403 and response.json() == {"error": "login required"}


def test_secrets_in_urls_stay_out_of_every_log(cross_stack):
    """
    Keys sent every way a URL can carry them: none reaches nginx, Gunicorn or Daphne logs.
    The requests carry a User-Agent (and a path) of their own, so the lines they left, and
    only those, are found: logged, and without their query strings.
    """
    session, key = cross_stack.login()
    made_up = "m" * 32
    cross_stack.secrets.add(made_up)
    marker = f"log-probe-{uuid.uuid4().hex}"
    agent = {"User-Agent": marker}
    cross_stack.whoami(query=f"session_key={key}", user_agent_header=marker)
    cross_stack.whoami(query=f"session_key={made_up}", user_agent_header=marker)
    cross_stack.whoami(
        query=f"session_key={key}", origin="http://www.evil.test", user_agent_header=marker
    )
    plain = requests.Session()
    # Plain HTTP on a socket path, and on pages, with the key in the query string.
    realtime = cross_stack.realtime_host
    for path, host in [
        (f"/ws/whoami/?session_key={key}", realtime),
        (f"/healthz?session_key={key}", realtime),
        (f"/?session_key={key}", None),
        (f"/{marker}?session_key={made_up}", None),
    ]:
        cross_stack.http(plain, "GET", path, host=host, headers=agent)

    def our_lines():
        # nginx writes a line once the response is sent: the last may still be on its way.
        lines = cross_stack.log_files()["nginx-access.log"].splitlines()
        ours = [line for line in lines if f'"{marker}"' in line]
        return ours if len(ours) >= 7 else None

    ours = wait_until(our_lines, 5, "the probe requests were not all logged")
    logs = cross_stack.log_files()
    requests_logged = [
        re.search(r'"(\w+) (\S+) HTTP/1\.1" (\d{3}) \d+ host=(\S+)', line).groups() for line in ours
    ]
    # The requests were logged, each once, as path and status, never a query string...
    assert requests_logged == [
        ("GET", "/ws/whoami/", "101", realtime),
        ("GET", "/ws/whoami/", "101", realtime),
        ("GET", "/ws/whoami/", "403", realtime),
        ("GET", "/ws/whoami/", "404", realtime),
        ("GET", "/healthz", "200", realtime),
        ("GET", "/", "200", cross_stack.app_host),
        ("GET", f"/{marker}", "404", cross_stack.app_host),
    ]

    def gunicorn_lines():
        # Gunicorn writes its access line after the response: nginx may have logged first.
        lines = cross_stack.log_files()["gunicorn.log"].splitlines()
        probe = [line for line in lines if f"/{marker}" in line]
        return probe if len(probe) >= 2 else None

    gunicorn = wait_until(gunicorn_lines, 5, "Gunicorn did not log the probe request")
    logs = cross_stack.log_files()
    # Gunicorn's access line, and Django's "Not Found" warning, both with the path alone.
    assert [line for line in gunicorn if f'"GET /{marker} HTTP/1.1" 404' in line] != [], gunicorn
    assert len(gunicorn) == 2 and f"Not Found: /{marker}" in "\n".join(gunicorn), gunicorn
    # ...and no log holds either key, in any form.
    assert not [line for line in ours + gunicorn if "?" in line or "session_key" in line]
    for text in logs.values():
        assert key not in text and made_up not in text
    cross_stack.assert_no_secrets_logged()


def test_the_log_check_catches_every_form_of_a_secret(tmp_path):
    """assert_no_secrets_logged fails on a secret as sent, upper-cased, %-encoded, or any
    credential's value after session_key=/ticket=; so its passing elsewhere means something."""
    secret = "abcdefgh12345678abcdefgh12345678"
    stack = Stack("cross-domain", tmp_path)
    stack.secrets.add(secret)
    (tmp_path / "log").mkdir()
    log = tmp_path / "log" / "nginx-access.log"
    log.write_text('"GET /ws/whoami/ HTTP/1.1" 101 0 host=realtime.localhost\n')
    stack.assert_no_secrets_logged()  # a clean log passes
    for leak in [
        secret,
        secret.upper(),
        "".join(f"%{ord(c):02x}" for c in secret),
        "".join(f"%{ord(c):02X}" for c in secret),
        "ticket=ZZZZ-not-recorded",
        "?SESSION_KEY=unrecorded123",
        "session_key%3Dunrecorded123",
        "subprotocols realtime, ticket.unrecorded",
    ]:
        log.write_text(f'"GET /ws/whoami/{leak} HTTP/1.1" 101\n')
        try:
            stack.assert_no_secrets_logged()
        except AssertionError:
            continue
        raise AssertionError(f"the log check missed {leak!r}")
