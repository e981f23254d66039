"""Tickets and session-bound sockets on the real stack: nginx, Gunicorn, two Daphnes, Redis.

Two kinds of stack: cross_stack (conftest) re-checks sessions every second, so it proves the
re-check path; event_stack (here) re-checks every 600 s, so a socket that closes within a
second of a logout there was closed by the session.end event, nothing else.
"""

import asyncio
import collections
import hashlib
import json
import re
import subprocess
import time

import pytest
import requests
import websockets

from tests.stack import Stack, wait_until

CLOSE_WAIT = 5  # seconds a test waits for a close; what it asserts is stated per test
RECHECKED = re.compile(r"INFO asgi_site\.upkeep: re-checked (\d+) sessions")


def rechecks(stack):
    """How many re-checks of at least one session the stack's Daphnes have logged."""
    logs = "\n".join(
        p.read_text(errors="replace") for p in (stack.state_dir / "log").glob("daphne-*.log")
    )
    return sum(int(n) > 0 for n in RECHECKED.findall(logs))


@pytest.fixture(scope="module")
def event_stack(tmp_path_factory):
    """Cross-domain, two Daphne processes, re-checks 600 s apart: only events end sockets."""
    stack = Stack(
        "cross-domain",
        tmp_path_factory.mktemp("events"),
        env={"WS_SESSION_RECHECK_SECONDS": 600},
    )
    stack.start()
    yield stack
    took = stack.stop()
    assert took < 10, f"stopping took {took:.1f} s"
    assert stack.leftover_processes() == []
    assert rechecks(stack) == 0, "a re-check ran: the event stack's proofs do not hold"
    logs = stack.log_text()
    assert logs, "no logs were written: nothing to prove"
    leaked = [s for s in stack.secrets if s in logs]
    assert not leaked, f"{len(leaked)} session keys or tickets reached the logs"


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


def test_logout_closes_sockets_on_both_daphne_processes_within_a_second(event_stack):
    """
    README: "Logout over HTTP sends one `session.end` event ... closes that session's sockets
    with code **4401**, on every process, within a second." On the event stack (re-checks
    600 s apart), so the event, not a re-check, closes them.
    """
    session, key = event_stack.login()
    tickets = [event_stack.ticket(session) for _ in event_stack.daphne_ports]

    async def run():
        sockets = []
        for port, ticket in zip(event_stack.daphne_ports, tickets, strict=True):
            ws, frame = await opened(event_stack, port=port, query=f"?ticket={ticket}")
            assert frame["auth"] == "ticket"
            sockets.append(ws)
        ws, frame = await opened(event_stack, query=f"?session_key={key}")  # through nginx
        sockets.append(ws)
        logout = asyncio.to_thread(event_stack.csrf_post, session, "/accounts/logout/")
        began = time.monotonic()
        assert (await logout).status_code == 302
        results = await asyncio.gather(*(closed_within(ws) for ws in sockets))
        return [code for code, _ in results], time.monotonic() - began

    codes, took = asyncio.run(run())
    assert codes == [4401, 4401, 4401]
    assert took < 1.0, f"sockets closed {took:.2f} s after logout began"
    assert rechecks(event_stack) == 0


def test_log_out_everywhere_closes_sockets_of_both_sessions(event_stack):
    """
    README: "*Log out everywhere* ... deletes every session of the user ... and ends every
    socket of the user the same way" (the session.end event, within a second). On the event
    stack, so no re-check can do it instead.
    """
    event_stack.create_user("everywhere", "everywhere-pass")
    first, first_key = event_stack.login("everywhere", "everywhere-pass")
    second, second_key = event_stack.login("everywhere", "everywhere-pass")

    async def run():
        a, _ = await opened(event_stack, query=f"?session_key={first_key}")
        b, _ = await opened(
            event_stack, query=f"?session_key={second_key}", port=event_stack.daphne_ports[1]
        )
        response = await asyncio.to_thread(
            event_stack.csrf_post, first, "/accounts/logout-everywhere/"
        )
        assert response.status_code == 302
        return await asyncio.gather(closed_within(a), closed_within(b))

    (code_a, took_a), (code_b, took_b) = asyncio.run(run())
    assert (code_a, code_b) == (4401, 4401)
    assert max(took_a, took_b) < 1.0
    assert event_stack.whoami(query=f"session_key={second_key}")["authenticated"] is False
    assert rechecks(event_stack) == 0


def test_session_end_carries_the_hash_never_the_key(event_stack, tmp_path):
    """
    README: logout "sends one `session.end` event (the session key's SHA-256, never the
    key)". Every command Redis receives while a logout ends a socket (redis-cli MONITOR):
    the key's SHA-256 is there, the key is not.
    """
    session, key = event_stack.login()
    digest = hashlib.sha256(key.encode()).hexdigest()
    seen = tmp_path / "monitor.txt"

    async def run():
        ws, frame = await opened(event_stack, query=f"?session_key={key}")  # no Redis involved
        assert frame["auth"] == "session_key"
        with seen.open("w") as sink:
            command = ["redis-cli", "-p", str(event_stack.redis_port), "MONITOR"]
            monitor = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: "OK" in seen.read_text(), 5, "MONITOR did not start")
                response = await asyncio.to_thread(
                    event_stack.csrf_post, session, "/accounts/logout/"
                )
                assert response.status_code == 302
                code, _ = await closed_within(ws)
                wait_until(lambda: digest in seen.read_text(), 5, "no session.end seen in Redis")
            finally:
                monitor.terminate()
                monitor.wait(5)
        return code

    assert asyncio.run(run()) == 4401
    commands = seen.read_text()
    assert "session.end" in commands and digest in commands
    assert key not in commands


def recheck_close(stack, username, change, rechecked=True):
    """
    Open a socket as `username`, apply `change(key)`; return (close code, seconds after).
    With `rechecked`, for changes no session.end event can announce, assert a re-check ran
    (Daphne logged one) between the change and the close.
    """
    stack.create_user(username, f"{username}-pass")
    session, key = stack.login(username, f"{username}-pass")

    async def run():
        ws, frame = await opened(stack, query=f"?session_key={key}")
        assert frame["user"] == username
        # Counted before the change: applying it takes a second (a manage.py process), long
        # enough for the re-check that closes the socket to run meanwhile.
        before = rechecks(stack)
        await asyncio.to_thread(change, key)
        result = await closed_within(ws)
        if rechecked:
            wait_until(lambda: rechecks(stack) > before, 2, "socket closed, but no re-check ran")
        return result

    return asyncio.run(run())


def test_recheck_closes_after_password_change_elsewhere(cross_stack):
    """
    README ("What happens when"): the user "changes password ... the socket closes with
    **4401**". Through Django's password change form in another session, which may also
    send a session.end (wsgi_site.signals), so either path may close it: see the next test
    for the re-check alone.
    """

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

    code, took = recheck_close(
        cross_stack, "pw", change_password_in_another_session, rechecked=False
    )
    assert code == 4401 and took < 2.5  # re-check every 1 s


def test_recheck_closes_after_the_password_hash_changed_without_an_event(cross_stack):
    """
    README (re-checks): "password changed (the session auth hash no longer matches) closes
    the socket with 4401". The password is rewritten in the database with a queryset update,
    which no signal, validator or event sees: only a re-check can close the socket.
    """

    def rewrite_password(key):
        cross_stack.manage(
            "shell",
            "-c",
            "from django.contrib.auth.models import User; "
            "from django.contrib.auth.hashers import make_password; "
            "n = User.objects.filter(username='rehashed')"
            ".update(password=make_password('another-pass')); "
            "assert n == 1",
        )

    code, took = recheck_close(cross_stack, "rehashed", rewrite_password)
    assert code == 4401 and took < 2.5


def test_recheck_closes_after_deactivation(cross_stack):
    """README: at a re-check, "user deactivated ... closes the socket with 4401"."""

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
    """README: at a re-check, a session "deleted" closes the socket with 4401."""

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


def test_recheck_closes_an_expired_session(cross_stack):
    """
    README: re-checks close a socket whose session is "deleted or expired" with 4401 ("the
    rest at the next re-check"): the row stays, only its expire_date passes.
    """

    def expire(key):
        cross_stack.manage(
            "shell",
            "-c",
            "import os, datetime; from django.utils import timezone; "
            "from django.contrib.sessions.models import Session; "
            "n = Session.objects.filter(pk=os.environ['KEY'])"
            ".update(expire_date=timezone.now() - datetime.timedelta(seconds=1)); "
            "assert n == 1",
            KEY=key,
        )

    code, took = recheck_close(cross_stack, "expired", expire)
    assert code == 4401 and took < 2.5


def test_stale_cookie_does_not_hide_a_valid_ticket(cross_stack):
    """
    README ("What happens when"): "a stale cookie comes with a valid key or ticket → known:
    a cookie hides nothing unless it gives a logged-in user". Same-host cookie to Daphne.
    """
    session, key = cross_stack.login()
    stale = "sessionid=" + "0" * 32
    frame = cross_stack.whoami(query=f"ticket={cross_stack.ticket(session)}", cookie=stale)
    assert (frame["user"], frame["auth"]) == ("demo", "ticket")
    frame = cross_stack.whoami(query=f"session_key={key}", cookie=stale)
    assert (frame["user"], frame["auth"]) == ("demo", "session_key")


def session_row(stack, key):
    """The session's row as stored (data and expiry), or "[]" when there is none."""
    return stack.manage(
        "shell",
        "-c",
        "import os; from django.contrib.sessions.models import Session; "
        "print(list(Session.objects.filter(pk=os.environ['KEY'])"
        ".values_list('session_data', 'expire_date')))",
        KEY=key,
    ).splitlines()[-1]  # after Django's "N objects imported automatically"


def test_secret_key_rotation_with_fallbacks_keeps_the_socket_user(tmp_path):
    """
    README (key rotation): "rotating `SECRET_KEY` with the old key in the fallbacks keeps
    socket users logged in. It never writes to the session". Restart with a new SECRET_KEY:
    without SECRET_KEY_FALLBACKS the session is anonymous on the socket while its row is
    intact (no HTTP request has cycled its key: Django's get_user deletes the old key on a
    fallback match); with the old key in the fallbacks the same row is known, through the
    fallback auth hash, stays open through two re-checks, and is not written.
    """
    old, new = "old-secret-key-" + "x" * 40, "new-secret-key-" + "y" * 40
    settings = {"WS_SESSION_RECHECK_SECONDS": "1"}
    stack = Stack(
        "cross-domain", tmp_path, asgi_processes=1, env={"SECRET_KEY": old, **settings}
    ).start()
    port = stack.public_port
    try:
        session, key = stack.login()
        row = session_row(stack, key)
        assert row != "[]"
    finally:
        stack.stop()

    def restarted(**env):
        return Stack(
            "cross-domain", tmp_path, port=port, asgi_processes=1, env={**settings, **env}
        ).start()

    # The control first, before any HTTP request could cycle the key: the same row, no fallback.
    stack = restarted(SECRET_KEY=new)
    stack.secrets.add(key)
    try:
        assert session_row(stack, key) == row
        assert stack.whoami(query=f"session_key={key}")["authenticated"] is False
        assert session_row(stack, key) == row, "the control changed the session"
    finally:
        stack.stop()

    stack = restarted(SECRET_KEY=new, SECRET_KEY_FALLBACKS=old)
    stack.secrets.add(key)
    try:
        assert session_row(stack, key) == row
        # Only the fallback auth hash can know this session: the current key's does not match.
        hashes = stack.manage(
            "shell",
            "-c",
            "import os; from django.contrib.sessions.backends.db import SessionStore; "
            "from django.contrib.auth import get_user_model; "
            "data = SessionStore(os.environ['KEY']).load(); "
            "user = get_user_model().objects.get(pk=data['_auth_user_id']); "
            "print(data['_auth_user_hash'] == user.get_session_auth_hash(), "
            "data['_auth_user_hash'] in user.get_session_auth_fallback_hash())",
            KEY=key,
        ).split()[-2:]
        assert hashes == ["False", "True"]

        async def run():
            ws, frame = await opened(stack, query=f"?session_key={key}")
            before = rechecks(stack)
            await asyncio.to_thread(
                wait_until, lambda: rechecks(stack) >= before + 2, 10, "two re-checks did not run"
            )
            still_open = ws.close_code is None
            await ws.close()
            return frame, still_open

        frame, still_open = asyncio.run(run())
        assert frame["user"] == "demo" and still_open
        assert session_row(stack, key) == row, "the socket wrote the session"
        # Over HTTP, Django's get_user cycles the key on the fallback match: the old key ends.
        assert "You are <strong>demo</strong>" in stack.http(session, "GET", "/").text
        cycled = session.cookies["sessionid"]
        stack.secrets.add(cycled)
        assert cycled != key and session_row(stack, key) == "[]"
        assert stack.whoami(query=f"session_key={cycled}")["user"] == "demo"
    finally:
        stack.stop()
    logs = stack.log_text()
    assert not [secret for secret in stack.secrets if secret in logs]


def trusted_lookups(stack):
    """split_session_lookups_total{source="trusted"}, summed over the stack's Daphnes."""
    return stack.metric("split_session_lookups_total", source="trusted")


async def trust_on_each_process(stack, key):
    """
    Open and close sockets with `key` on each Daphne process until each trusts it: within a
    trust window (10 s), as a process trusts no session of a user whose session.end it heard
    in the last one (setting a password sends one: a new user's, or a changed one).
    """
    for port in stack.daphne_ports:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            before = trusted_lookups(stack)
            ws, frame = await opened(stack, port=port, query=f"?session_key={key}")
            await ws.close()
            assert frame["auth"] == "session_key"
            if trusted_lookups(stack) > before:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"Daphne on {port} never trusted the session it read")


def test_a_trusted_session_key_is_anonymous_right_after_logout(cross_stack):
    """
    README ("A session read lately is trusted"): logout ends the trust on every process as
    its session.end event arrives, and the next socket on the key is anonymous, not let in
    and then closed. (A read racing the logout itself is tests/test_trust.py's.)
    """
    session, key = cross_stack.login()

    async def run():
        await trust_on_each_process(cross_stack, key)
        response = await asyncio.to_thread(cross_stack.csrf_post, session, "/accounts/logout/")
        assert response.status_code == 302
        # The event reaches each Daphne within milliseconds of the response; a socket opened
        # sooner would be let in, and closed (4401) when it comes.
        await asyncio.sleep(0.5)
        frames = []
        for port in cross_stack.daphne_ports:
            ws, frame = await opened(cross_stack, port=port, query=f"?session_key={key}")
            await asyncio.sleep(0.2)
            frames.append((frame["authenticated"], ws.close_code))
            await ws.close()
        return frames

    assert asyncio.run(run()) == [(False, None)] * 2


def test_a_session_deleted_while_trusted_is_closed_at_the_first_recheck(cross_stack):
    """
    README: a session deleted another way than logout (an admin, `clearsessions`) while a
    process trusts it opens a socket, as an outstanding ticket would; the first re-check
    closes it with 4401.
    """
    cross_stack.create_user("trusted", "trusted-pass")
    session, key = cross_stack.login("trusted", "trusted-pass")
    port = cross_stack.daphne_ports[0]

    async def run():
        await trust_on_each_process(cross_stack, key)
        await asyncio.to_thread(
            cross_stack.manage,
            "shell",
            "-c",
            "import os; from django.contrib.sessions.models import "
            "Session; Session.objects.filter(pk=os.environ['KEY']).delete()",
            KEY=key,
        )
        before = trusted_lookups(cross_stack)
        ws, frame = await opened(cross_stack, port=port, query=f"?session_key={key}")
        assert trusted_lookups(cross_stack) > before, "the deleted session was read, not trusted"
        return frame["authenticated"], await closed_within(ws)

    known, (code, took) = asyncio.run(run())
    assert known and code == 4401 and took < 2.5


def test_no_socket_is_ended_by_a_recheck_that_did_not_read_its_session(cross_stack):
    """
    Sockets with sessions no process has read yet open while re-checks run every second: a
    re-check judges only the sessions it read, so none of them is refused (403) or closed
    (4401). A re-check used to take every socket that registered during its query for ended.
    """
    cross_stack.create_user("churn", "churn-pass")
    keys = cross_stack.new_sessions(1500, "churn")
    _, key = cross_stack.login("churn", "churn-pass")

    async def one(key, outcomes):
        try:
            ws, frame = await opened(cross_stack, query=f"?session_key={key}")
        except websockets.InvalidStatus as exc:
            outcomes.append(exc.response.status_code)
            return
        await asyncio.sleep(0.05)  # a re-check's close comes within milliseconds
        outcomes.append(ws.close_code or frame["auth"])
        await ws.close()

    async def run():
        # One socket held throughout, so every re-check has a session to read.
        held, _ = await opened(cross_stack, query=f"?session_key={key}")
        before, outcomes = rechecks(cross_stack), []
        queue = list(keys)

        async def worker():
            while queue:
                await one(queue.pop(), outcomes)

        await asyncio.gather(*(worker() for _ in range(16)))
        await held.close()
        return outcomes, rechecks(cross_stack) - before

    outcomes, rechecked = asyncio.run(run())
    assert rechecked >= 3, "too few re-checks ran while the sockets opened: nothing proven"
    assert collections.Counter(outcomes) == {"session_key": len(keys)}
