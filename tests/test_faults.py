"""
Faults on the real stack, with a stack of its own (on free ports): Redis going away, a
Daphne process killed, a Gunicorn worker killed. Nothing is restarted by hand during a
test; after each one the stack is put back as it was (Redis running, every Daphne serving),
so no test depends on what an earlier one broke.
"""

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest
import redis
import requests

from tests.stack import Stack, wait_until

# channels-redis keeps a group as a sorted set under "<prefix>:group:<name>" ("asgi" prefix).
GROUP_KEYS = "asgi:group:*"
# How Listeners record a {"type": "gap"} frame among announcement texts.
GAP = "<gap>"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(
        "cross-domain", tmp_path_factory.mktemp("faults"), env={"WS_SESSION_RECHECK_SECONDS": "1"}
    ).start()
    yield stack
    took = stack.stop()
    assert took < 10
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


def redis_client(stack):
    return redis.Redis(port=stack.redis_port, socket_timeout=2)


def redis_answers(stack):
    try:
        return redis_client(stack).ping()
    except redis.ConnectionError:
        return False


def daphne_answers(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


@pytest.fixture(autouse=True)
def restored(stack):
    """Whatever a test broke, put the stack back: Redis up, every Daphne awake and serving."""
    yield
    for program in stack.daphne_programs:
        pid = pid_of(stack, program)
        if pid:
            os.kill(pid, signal.SIGCONT)  # a no-op unless a test stopped it
    if not pid_of(stack, "redis"):  # stopped by the test: start it, as an operator would
        stack.supervisorctl("start", "redis")
    wait_until(lambda: redis_answers(stack), 15, "Redis did not come back")
    for port in stack.daphne_ports:
        wait_until(lambda p=port: daphne_answers(p), 15, f"Daphne on {port} did not come back")


def pid_of(stack, program):
    """The program's pid, or 0 while it is not running."""
    try:
        return int(stack.supervisorctl("pid", program).strip())
    except (subprocess.CalledProcessError, ValueError):
        return 0


def announce(stack, session, text):
    return stack.csrf_post(session, "/announce/", json={"text": text})


class Listeners:
    """Live-feed sockets on every Daphne process, recording every announcement they get."""

    def __init__(self, stack, key):
        self.stack, self.key, self.sockets, self.seen = stack, key, [], []

    async def __aenter__(self):
        for port in self.stack.daphne_ports:
            ws = await self.stack.connect(f"/ws/live/?session_key={self.key}", port=port)
            seen = []
            self.sockets.append((ws, asyncio.create_task(self.record(ws, seen))))
            self.seen.append(seen)
        return self

    async def record(self, ws, seen):
        async for message in ws:
            frame = json.loads(message)
            if frame["type"] == "announcement":
                seen.append(frame["text"])
            elif frame["type"] == "gap":
                seen.append(GAP)

    async def wait_for(self, texts, timeout=5):
        def every_socket_has_them():
            return all(set(texts) <= set(seen) for seen in self.seen)

        message = f"missing: {texts} vs {self.seen}"
        await asyncio.to_thread(wait_until, every_socket_has_them, timeout, message)

    def open(self):
        return [ws.close_code is None for ws, _ in self.sockets]

    async def __aexit__(self, *exc):
        for ws, task in self.sockets:
            task.cancel()
            await ws.close()


def test_redis_outage_refuses_cleanly_and_loses_nothing(stack):
    session, key = stack.login()

    async def run():
        async with Listeners(stack, key) as listeners:
            accepted = []
            for i in range(3):
                assert (
                    await asyncio.to_thread(announce, stack, session, f"before {i}")
                ).status_code == 200
                accepted.append(f"before {i}")
            await listeners.wait_for(accepted)

            stack.supervisorctl("stop", "redis")
            for path, body in [("/announce/", {"text": "during"}), ("/ws-ticket/", {})]:
                response = await asyncio.to_thread(stack.csrf_post, session, path, json=body)
                assert response.status_code == 503, response.text
                assert response.json() == {"error": "realtime service unavailable, try again"}
            await asyncio.sleep(3)
            assert listeners.open() == [True, True]  # open sockets stay open

            stack.supervisorctl("start", "redis")
            back = time.monotonic()
            while (await asyncio.to_thread(announce, stack, session, "after 0")).status_code != 200:
                assert time.monotonic() - back < 5, "announcements did not come back within 5 s"
                await asyncio.sleep(0.2)
            recovered = time.monotonic() - back
            accepted.append("after 0")
            for i in range(1, 3):
                assert (
                    await asyncio.to_thread(announce, stack, session, f"after {i}")
                ).status_code == 200
                accepted.append(f"after {i}")
            await listeners.wait_for(accepted)
            assert listeners.open() == [True, True]
            return recovered

    recovered = asyncio.run(run())
    assert recovered < 5
    ticket = stack.ticket(stack.login()[0])  # tickets work again too
    assert stack.whoami(query=f"ticket={ticket}")["auth"] == "ticket"


def test_redis_outage_new_sockets_open_anonymous_unless_a_cookie_or_key(stack):
    """
    README: while Redis is stopped, "new sockets open, anonymous unless a cookie or key
    authenticates them". A ticket lives in Redis, so one minted before the outage opens
    an anonymous socket; the session key and the cookie live in the database.
    """
    session, key = stack.login()
    ticket = stack.ticket(session)
    stack.supervisorctl("stop", "redis")
    assert not redis_answers(stack)

    async def live_opens():
        async with stack.connect(f"/ws/live/?session_key={key}") as ws:
            await ws.send(json.dumps({"text": "during the outage"}))
            return json.loads(await asyncio.wait_for(ws.recv(), 5))

    for port in stack.daphne_ports:  # on every Daphne process, not just one
        assert stack.whoami(port=port) == {
            "type": "whoami",
            "user": None,
            "authenticated": False,
            "auth": "none",
            "cookies": [],
            "origin": stack.app_origin,
        }
        frame = stack.whoami(query=f"session_key={key}", port=port)
        assert (frame["user"], frame["auth"]) == ("demo", "session_key")
        frame = stack.whoami(cookie=f"sessionid={key}", port=port)
        assert (frame["user"], frame["auth"]) == ("demo", "cookie")
    assert stack.whoami(query=f"ticket={ticket}")["authenticated"] is False
    assert stack.whoami(subprotocols=["realtime", f"ticket.{ticket}"])["authenticated"] is False
    # The live feed opens too; what needs Redis answers with an error frame, not a close.
    assert asyncio.run(live_opens()) == {
        "type": "error",
        "error": "realtime service unavailable, try again",
    }


def test_redis_killed_and_its_data_lost_sockets_rejoin(stack):
    """
    Redis dies with SIGKILL (no save) and supervisord restarts it empty: the groups are
    gone, and the sockets re-join them at their next upkeep once Redis is back.

    To see the groups gone before any upkeep rebuilds them, the Daphne processes are
    paused (SIGSTOP) from just before the kill; once the empty Redis is seen, it is held
    down while they resume and find it gone, as they would have during the restart, then
    started again. (Resuming them on the restarted Redis instead is the notes' finding.)
    """
    session, key = stack.login()
    client = redis_client(stack)

    async def run():
        async with Listeners(stack, key) as listeners:
            assert (await asyncio.to_thread(announce, stack, session, "ready")).status_code == 200
            await listeners.wait_for(["ready"])
            before = sorted(client.keys(GROUP_KEYS))
            assert before == [b"asgi:group:live", b"asgi:group:session-events"]
            daphnes = [pid_of(stack, program) for program in stack.daphne_programs]
            old_redis = pid_of(stack, "redis")
            for pid in daphnes:
                os.kill(pid, signal.SIGSTOP)
            try:
                os.kill(old_redis, signal.SIGKILL)
                (stack.state_dir / "redis" / "dump.rdb").unlink(missing_ok=True)

                def restarted():
                    return pid_of(stack, "redis") not in (0, old_redis) and redis_answers(stack)

                await asyncio.to_thread(wait_until, restarted, 15, "Redis was not restarted")
                lost = client.keys(GROUP_KEYS)
                loaded = client.info("persistence").get("rdb_last_load_keys_loaded", 0)
                # Announcements are accepted again, and reach no one: the groups are gone.
                response = await asyncio.to_thread(announce, stack, session, "into the void")
                assert response.status_code == 200
                stack.supervisorctl("stop", "redis")
            finally:
                for pid in daphnes:
                    os.kill(pid, signal.SIGCONT)
            assert (lost, loaded) == ([], 0), "Redis came back with its data"
            await asyncio.sleep(3)  # each process's layer finds Redis gone (it retries every 1 s)
            stack.supervisorctl("start", "redis")

            # Sockets re-join their groups at their next upkeep (every second here).
            await asyncio.to_thread(
                wait_until,
                lambda: sorted(client.keys(GROUP_KEYS)) == before,
                10,
                "the groups were not rebuilt",
            )

            def rejoined():
                assert announce(stack, session, "rejoined").status_code == 200
                time.sleep(0.5)
                return all("rejoined" in seen for seen in listeners.seen)

            await asyncio.to_thread(wait_until, rejoined, 5, "sockets never re-joined their groups")
            # What no group carried, history gives back: each socket is told of the gap (Redis
            # lost its data), then gets the announcement it missed, before the next one.
            for seen in listeners.seen:
                assert seen.index(GAP) < seen.index("into the void") < seen.index("rejoined")
            assert listeners.open() == [True, True]

    asyncio.run(run())


def test_daphne_killed_new_handshakes_go_to_the_survivor_and_it_comes_back(stack):
    session, key = stack.login()
    victim = stack.daphne_programs[0]
    old_pid = pid_of(stack, victim)
    os.kill(old_pid, signal.SIGKILL)
    # nginx sends every new handshake to the survivor at once: none waits, none fails.
    for _ in range(10):
        began = time.monotonic()
        assert stack.whoami(query=f"session_key={key}")["user"] == "demo"
        assert time.monotonic() - began < 1.0

    # supervisord restarts the dead one.
    def answers():
        try:
            return requests.get(f"http://127.0.0.1:{stack.daphne_ports[0]}/healthz", timeout=1).ok
        except requests.ConnectionError:
            return False

    wait_until(answers, 15, "the killed Daphne was not restarted")
    assert pid_of(stack, victim) != old_pid


def test_gunicorn_worker_killed_is_replaced(stack):
    master = pid_of(stack, "wsgi")
    workers = subprocess.run(
        ["pgrep", "-P", str(master)], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGKILL)
    plain = requests.Session()
    for _ in range(10):
        assert stack.http(plain, "GET", "/healthz").status_code == 200

    def replaced():
        now = subprocess.run(
            ["pgrep", "-P", str(master)], capture_output=True, text=True
        ).stdout.split()
        return len(now) == 2 and workers[0] not in now

    wait_until(replaced, 10, "the killed worker was not replaced")
