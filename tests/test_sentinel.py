"""
Redis with failover on the real stack (REDIS_SENTINEL=1): supervisord runs a primary, its
replica and three Sentinels beside nginx, Gunicorn and two Daphne processes. The primary is
killed while sockets are open on both Daphne processes; the Sentinels promote the replica,
and announcements, socket messages, tickets and logouts work again, with no process restarted
and no socket closed.

Sessions are re-checked 600 s apart here: a socket closed within seconds of a logout was
closed by the session.end event, which went through the new primary.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
import websockets

from tests.stack import ROOT, Stack, wait_until

UNAVAILABLE = {"error": "realtime service unavailable, try again"}
PROMOTION_LIMIT = 15  # seconds, the bound from the primary's death to a new primary
SESSION_ENDED = 4401


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(
        "cross-domain",
        tmp_path_factory.mktemp("sentinel"),
        env={"REDIS_SENTINEL": "1", "WS_SESSION_RECHECK_SECONDS": 600},
    ).start()
    yield stack
    took = stack.stop()
    assert took < 10, f"stopping took {took:.1f} s"
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


def programs(stack) -> dict[str, int]:
    """Every program supervisord runs, with its pid (0 when it is not running)."""
    try:
        status = stack.supervisorctl("status")
    except subprocess.CalledProcessError as exc:  # exit status 3: some program is not running
        status = exc.stdout
    pids = {}
    for line in status.splitlines():
        running = re.search(r"RUNNING +pid (\d+)", line)
        pids[line.split()[0]] = int(running[1]) if running else 0
    return pids


def role(port) -> tuple:
    """What the Redis on `port` is: ("master",), ("slave", its primary's port), or ()."""
    try:
        reply = redis.Redis(port=port, socket_timeout=1).role()
    except redis.RedisError:
        return ()
    return ("master",) if reply[0] == b"master" else ("slave", reply[2])


def primary_named(stack) -> set:
    """The primary's port, as each Sentinel names it."""
    ports = set()
    for port in (stack.redis_port + 2, stack.redis_port + 3, stack.redis_port + 4):
        address = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name("split")
        assert isinstance(address, tuple), address
        ports.add(address[1])
    return ports


def is_primary(stack, port):
    """True once the Redis on `port` is a primary, and every Sentinel names it."""
    return role(port) == ("master",) and primary_named(stack) == {port}


def announce(stack, session, text):
    return stack.csrf_post(session, "/announce/", json={"text": text})


class Feeds:
    """Live-feed sockets, each recording every frame it gets."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.sockets: list[tuple[websockets.ClientConnection, list[dict]]] = []
        self.tasks: list[asyncio.Task] = []

    async def open(self, port: int, **kwargs: Any) -> websockets.ClientConnection:
        ws = await self.stack.connect("/ws/live/", port=port, **kwargs)
        frames: list[dict] = []
        self.tasks.append(asyncio.create_task(self.record(ws, frames)))
        self.sockets.append((ws, frames))
        return ws

    @staticmethod
    async def record(ws, frames):
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                frames.append(json.loads(message))

    async def every_socket_gets(self, kind, texts, timeout=5):
        def got():
            return all(
                set(texts) <= {f.get("text") for f in frames if f["type"] == kind}
                for _, frames in self.sockets
            )

        try:
            await asyncio.to_thread(wait_until, got, timeout, f"{kind}s {texts} did not reach all")
        except AssertionError as exc:
            seen = [
                [f.get("text") for f in frames if f["type"] == kind] for _, frames in self.sockets
            ]
            raise AssertionError(f"{exc}; each socket got {seen}") from None

    async def close(self):
        for ws, _ in self.sockets:
            await ws.close()
        await asyncio.gather(*self.tasks)


def test_primary_killed_replica_promoted_everything_works_on_without_restarts(stack):
    session, key = stack.login()
    leaving, leaving_key = stack.login()
    replica = stack.redis_port + 1
    assert (role(stack.redis_port), role(replica)) == (("master",), ("slave", stack.redis_port))
    assert primary_named(stack) == {stack.redis_port}
    # The runner said Ready only once the replica held its copy: a failover loses nothing.
    assert redis.Redis(port=replica).info("replication")["master_link_status"] == "up"

    async def run():
        feeds = Feeds(stack)
        for port in stack.daphne_ports:  # on each Daphne process: a cookie and a ticket
            await feeds.open(port, cookie=f"sessionid={key}")
            ticket = await asyncio.to_thread(stack.ticket, session, "/ws/live/")
            await feeds.open(port, subprotocols=["realtime", f"ticket.{ticket}"])
        staying = list(feeds.sockets)
        for port in stack.daphne_ports:
            await feeds.open(port, cookie=f"sessionid={leaving_key}")
        going = feeds.sockets[len(staying) :]
        # Each socket is logged in (an anonymous one is told "login required") and its
        # message reaches every socket, on both processes.
        for i, (ws, _) in enumerate(feeds.sockets):
            await ws.send(json.dumps({"text": f"hello {i}"}))
        await feeds.every_socket_gets("message", [f"hello {i}" for i in range(6)])
        assert (await asyncio.to_thread(announce, stack, session, "before")).status_code == 200
        await feeds.every_socket_gets("announcement", ["before"])
        before = programs(stack)
        assert all(before.values()), before

        os.kill(before["redis"], signal.SIGKILL)
        killed = time.monotonic()
        promoted = answered = None
        accepted, refused, slowest, n = ["before"], [], 0.0, 0
        # Until the new primary answers: the Sentinels' view, and an announcement every 0.2 s.
        while answered is None or promoted is None:
            assert time.monotonic() - killed < PROMOTION_LIMIT + 5, "no failover"
            if promoted is None and await asyncio.to_thread(is_primary, stack, replica):
                promoted = time.monotonic() - killed
            response = await asyncio.to_thread(announce, stack, session, f"failover {n}")
            if response.status_code == 200:
                accepted.append(f"failover {n}")
                answered = answered or time.monotonic() - killed
            else:
                refused.append((response.status_code, response.json()))
                slowest = max(slowest, response.elapsed.total_seconds())
            n += 1
            await asyncio.sleep(0.2)
        # While there was no primary: a prompt, plain 503, never a traceback or a hang.
        assert refused and all(answer == (503, UNAVAILABLE) for answer in refused), refused
        assert slowest < 5, f"a refusal took {slowest:.1f} s"

        for i in range(3):
            response = await asyncio.to_thread(announce, stack, session, f"after {i}")
            assert response.status_code == 200, response.text
            accepted.append(f"after {i}")
        await feeds.every_socket_gets("announcement", accepted)
        for i, (ws, _) in enumerate(feeds.sockets):
            await ws.send(json.dumps({"text": f"back {i}"}))
        await feeds.every_socket_gets("message", [f"back {i}" for i in range(6)])

        # Tickets mint (Gunicorn) and redeem (each Daphne) on the new primary.
        for port in stack.daphne_ports:
            ticket = await asyncio.to_thread(stack.ticket, session)
            frame = await asyncio.to_thread(stack.whoami, query=f"ticket={ticket}", port=port)
            assert (frame["user"], frame["auth"]) == ("demo", "ticket")
        # A logout's session.end event goes through it too: within a second or two, not 600 s.
        logout = await asyncio.to_thread(stack.csrf_post, leaving, "/accounts/logout/")
        assert logout.status_code == 302
        for ws, _ in going:
            await asyncio.wait_for(ws.wait_closed(), 3)
        codes = [ws.close_code for ws, _ in going]
        still_open = [ws.close_code is None for ws, _ in staying]
        frames = [frame for _, received in feeds.sockets for frame in received]
        await feeds.close()
        print(
            f"\nprimary killed: replica promoted in {promoted:.1f} s, answering in "
            f"{answered:.1f} s; {len(refused)} refusals, the slowest in {slowest:.3f} s"
        )
        return before, promoted, codes, still_open, frames

    before, promoted, codes, still_open, frames = asyncio.run(run())
    assert promoted < PROMOTION_LIMIT
    assert codes == [SESSION_ENDED, SESSION_ENDED]
    assert still_open == [True] * 4
    assert {frame["type"] for frame in frames} == {"message", "announcement"}  # no error frame

    # Nothing was restarted: every program but the dead primary runs with the pid it had.
    after = programs(stack)
    assert after.pop("redis") == 0, "supervisord restarted the dead primary"
    assert after == {name: pid for name, pid in before.items() if name != "redis"}
    logs = stack.log_files()
    assert not [name for name, text in logs.items() if "Traceback" in text]

    # The old primary, started again, is made a replica of the new one by the Sentinels.
    stack.supervisorctl("start", "redis")
    began = time.monotonic()
    wait_until(lambda: role(stack.redis_port) == ("slave", replica), 30, "not made a replica")
    print(f"old primary started again: a replica after {time.monotonic() - began:.1f} s")
    assert primary_named(stack) == {replica}
    session, key = stack.login()
    assert announce(stack, session, "still").status_code == 200


def settings_of(**env) -> subprocess.CompletedProcess:
    """Import the shared settings in a fresh interpreter with `env`; print the Redis ones."""
    code = (
        "from shared_settings import base as s; "
        "print(s.REDIS_SENTINELS, s.REDIS_SENTINEL_MASTER, s.CHANNEL_LAYER_HOSTS)"
    )
    environment = {**os.environ, "SECRET_KEY": "settings-test", "REDIS_PORT": "7000", **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, cwd=ROOT
    )


def test_sentinel_settings_default_from_the_topology_and_refuse_what_does_not_combine():
    assert settings_of().stdout.split("\n")[0] == "[] split ['redis://127.0.0.1:7000/0']"
    defaults = settings_of(REDIS_SENTINEL="1").stdout.strip()
    assert defaults == (
        "[('127.0.0.1', 7002), ('127.0.0.1', 7003), ('127.0.0.1', 7004)] split "
        "['redis://127.0.0.1:7000/0']"
    )
    named = settings_of(REDIS_SENTINEL="1", REDIS_SENTINELS="s1:26379,s2:26379")
    assert named.stdout.startswith("[('s1', 26379), ('s2', 26379)] split")
    for env, message in [
        ({"REDIS_SENTINELS": "s1"}, "REDIS_SENTINELS: 's1' is not host:port."),
        ({"CHANNEL_LAYER_HOSTS": "redis://a/0,redis://b/0"}, "unset CHANNEL_LAYER_HOSTS"),
        ({"CHANNEL_LAYER": "pubsub"}, "unset CHANNEL_LAYER_HOSTS and CHANNEL_LAYER"),
    ]:
        refused = settings_of(REDIS_SENTINEL="1", **env)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
