"""Tickets and session-bound sockets on the real stack: nginx, Gunicorn, two Daphnes, Redis."""

import asyncio
import json
import re
import time

import requests

from tests.stack import Stack

CLOSE_WAIT = 5  # seconds a test waits for a close; what it asserts is stated per test


async def opened(stack, port=None, **kwargs):
    """An open /ws/whoami/ socket and its whoami frame."""
    ws = await stack.connect("/ws/whoami/" + kwargs.pop("query", ""), port=port, **kwargs)
    return ws, json.loads(await asyncio.wait_for(ws.recv(), 5))


async def closed_within(ws):
    """Wait for the server to close `ws`; return (close code, seconds waited)."""
    began = time.monotonic()
    await asyncio.wait_for(ws.wait_closed(), CLOSE_WAIT)
    return ws.close_code, time.monotonic() - began


def test_ticket_in_query_string(cross_stack):
    session, key = cross_stack.login()
    frame = cross_stack.whoami(query=f"ticket={cross_stack.ticket(session)}")
    assert (frame["user"], frame["auth"]) == ("demo", "ticket")


def test_ticket_in_header_answer_is_realtime_only(cross_stack):
    session, key = cross_stack.login()
    ticket = cross_stack.ticket(session)

    async def run():
        ws, frame = await opened(cross_stack, subprotocols=["realtime", f"ticket.{ticket}"])
        answer = ws.response.headers.get_all("Sec-WebSocket-Protocol")
        await ws.close()
        return frame, ws.subprotocol, answer

    frame, subprotocol, answer = asyncio.run(run())
    assert (frame["user"], frame["auth"]) == ("demo", "ticket")
    assert subprotocol == "realtime" and answer == ["realtime"]


def test_ticket_replayed_through_nginx_is_anonymous(cross_stack):
    session, key = cross_stack.login()
    ticket = cross_stack.ticket(session)
    assert cross_stack.whoami(query=f"ticket={ticket}")["auth"] == "ticket"
    assert cross_stack.whoami(query=f"ticket={ticket}")["authenticated"] is False


def test_ticket_needs_login_over_http(cross_stack):
    response = cross_stack.csrf_post(requests.Session(), "/ws-ticket/")
    assert response.status_code == 403 and response.json() == {"error": "login required"}


def test_logout_closes_sockets_on_both_daphne_processes_within_a_second(cross_stack):
    session, key = cross_stack.login()
    tickets = [cross_stack.ticket(session) for _ in cross_stack.daphne_ports]

    async def run():
        sockets = []
        for port, ticket in zip(cross_stack.daphne_ports, tickets, strict=True):
            ws, frame = await opened(cross_stack, port=port, query=f"?ticket={ticket}")
            assert frame["auth"] == "ticket"
            sockets.append(ws)
        ws, frame = await opened(cross_stack, query=f"?session_key={key}")  # through nginx
        sockets.append(ws)
        logout = asyncio.to_thread(cross_stack.csrf_post, session, "/accounts/logout/")
        began = time.monotonic()
        assert (await logout).status_code == 302
        results = await asyncio.gather(*(closed_within(ws) for ws in sockets))
        return [code for code, _ in results], time.monotonic() - began

    codes, took = asyncio.run(run())
    assert codes == [4401, 4401, 4401]
    assert took < 1.0, f"sockets closed {took:.2f} s after logout began"


def test_log_out_everywhere_closes_sockets_of_both_sessions(cross_stack):
    cross_stack.create_user("everywhere", "everywhere-pass")
    first, first_key = cross_stack.login("everywhere", "everywhere-pass")
    second, second_key = cross_stack.login("everywhere", "everywhere-pass")

    async def run():
        a, _ = await opened(cross_stack, query=f"?session_key={first_key}")
        b, _ = await opened(
            cross_stack, query=f"?session_key={second_key}", port=cross_stack.daphne_ports[1]
        )
        response = await asyncio.to_thread(
            cross_stack.csrf_post, first, "/accounts/logout-everywhere/"
        )
        assert response.status_code == 302
        return await asyncio.gather(closed_within(a), closed_within(b))

    (code_a, took_a), (code_b, took_b) = asyncio.run(run())
    assert (code_a, code_b) == (4401, 4401)
    assert max(took_a, took_b) < 1.0
    assert cross_stack.whoami(query=f"session_key={second_key}")["authenticated"] is False


def recheck_close(stack, username, change):
    """Open a socket as `username`, apply `change(key)`; return (close code, seconds after)."""
    stack.create_user(username, f"{username}-pass")
    session, key = stack.login(username, f"{username}-pass")

    async def run():
        ws, frame = await opened(stack, query=f"?session_key={key}")
        assert frame["user"] == username
        await asyncio.to_thread(change, key)
        return await closed_within(ws)

    return asyncio.run(run())


def test_recheck_closes_after_password_change_elsewhere(cross_stack):
    def change_password_in_another_session(key):
        other, _ = cross_stack.login("pw", "pw-pass")
        page = cross_stack.http(other, "GET", "/accounts/password_change/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = cross_stack.http(
            other,
            "POST",
            "/accounts/password_change/",
            data={
                "csrfmiddlewaretoken": token,
                "old_password": "pw-pass",
                "new_password1": "a-new-password-1",
                "new_password2": "a-new-password-1",
            },
        )
        assert response.status_code == 302, response.text

    code, took = recheck_close(cross_stack, "pw", change_password_in_another_session)
    assert code == 4401 and took < 2.5  # re-check every 1 s


def test_recheck_closes_after_deactivation(cross_stack):
    def deactivate(key):
        cross_stack.manage(
            "shell",
            "-c",
            "from django.contrib.auth.models import User; "
            "User.objects.filter(username='inactive').update(is_active=False)",
        )

    code, took = recheck_close(cross_stack, "inactive", deactivate)
    assert code == 4401 and took < 2.5


def test_recheck_closes_after_session_deletion(cross_stack):
    def delete_session(key):
        cross_stack.manage(
            "shell",
            "-c",
            "import os; from django.contrib.sessions.models import "
            "Session; Session.objects.filter(pk=os.environ['KEY']).delete()",
            KEY=key,
        )

    code, took = recheck_close(cross_stack, "deleted", delete_session)
    assert code == 4401 and took < 2.5


def test_secret_key_rotation_with_fallbacks_keeps_the_socket_user(tmp_path):
    """Restart with a new SECRET_KEY and the old one in SECRET_KEY_FALLBACKS: still known."""
    old, new = "old-secret-key-" + "x" * 40, "new-secret-key-" + "y" * 40
    settings = {"WS_SESSION_RECHECK_SECONDS": "1"}
    stack = Stack(
        "cross-domain", tmp_path, asgi_processes=1, env={"SECRET_KEY": old, **settings}
    ).start()
    port = stack.public_port
    try:
        session, key = stack.login()
    finally:
        stack.stop()

    def restarted(**env):
        return Stack(
            "cross-domain", tmp_path, port=port, asgi_processes=1, env={**settings, **env}
        ).start()

    stack = restarted(SECRET_KEY=new, SECRET_KEY_FALLBACKS=old)
    stack.secrets.add(key)
    try:

        async def run():
            ws, frame = await opened(stack, query=f"?session_key={key}")
            await asyncio.sleep(2.5)  # two re-checks
            still_open = ws.close_code is None
            await ws.close()
            return frame, still_open

        frame, still_open = asyncio.run(run())
        assert frame["user"] == "demo" and still_open
        assert "You are <strong>demo</strong>" in stack.http(session, "GET", "/").text
    finally:
        stack.stop()

    # Without the fallback, the same session is worth nothing: the test above can fail.
    stack = restarted(SECRET_KEY=new)
    try:
        assert stack.whoami(query=f"session_key={key}")["authenticated"] is False
    finally:
        stack.stop()
    assert key not in stack.log_text()
