"""
Faults on the real stack, with a stack of its own (ports 22000-22020): Redis going away,
a Daphne process killed, a Gunicorn worker killed. Nothing is restarted by hand.
"""

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest
import requests

from tests.stack import Stack, wait_until


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(
        "cross-domain", tmp_path_factory.mktemp("faults"), env={"WS_SESSION_RECHECK_SECONDS": "1"}
    ).start()
    yield stack
    stack.stop()
    assert stack.leftover_processes() == []
    assert not [s for s in stack.secrets if s in stack.log_text()]


def pid_of(stack, program):
    return int(stack.supervisorctl("pid", program).strip())


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


def test_redis_killed_and_its_data_lost_sockets_rejoin(stack):
    """Redis dies with SIGKILL (no save) and supervisord restarts it empty: groups are rebuilt."""
    session, key = stack.login()

    async def run():
        async with Listeners(stack, key) as listeners:
            os.kill(pid_of(stack, "redis"), signal.SIGKILL)
            (stack.state_dir / "redis" / "dump.rdb").unlink(missing_ok=True)
            back = time.monotonic()
            while (
                await asyncio.to_thread(announce, stack, session, "after kill")
            ).status_code != 200:
                assert time.monotonic() - back < 10
                await asyncio.sleep(0.2)

            # Sockets re-join their groups at their next upkeep (every second here).
            def rejoined():
                assert announce(stack, session, "rejoined").status_code == 200
                time.sleep(0.5)
                return all("rejoined" in seen for seen in listeners.seen)

            await asyncio.to_thread(wait_until, rejoined, 5, "sockets never re-joined their groups")
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
