"""
The channel layer sharded over two Redis servers (CHANNEL_LAYER_HOSTS), on the real stack:
the runtime's Redis and a second one this module starts. channels-redis puts each group on
the shard its name hashes to, and each process's channels on the shard their common prefix
(up to "!") hashes to; a group send reads the group on its shard and writes each message
on the shard of the process it is for.

With the two Daphne processes' channels on different shards (a process is restarted until
they are: its prefix is random), an announcement, a socket's message and a logout's
session.end event reach the sockets of both. Both Daphne processes are paused while an
announcement is sent, so its message is seen waiting on each process's own shard.
"""

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import requests
from asgiref.sync import async_to_sync
from channels_redis.utils import _consistent_hash

from contract.layers import ResilientRedisChannelLayer
from tests.stack import Stack, free_base_port, port_is_free, wait_until

LIVE = b"asgi:group:live"
SESSION_EVENTS = b"asgi:group:session-events"
BLOCK_SECONDS = 2  # contract.layers: how long a process's waiting read lasts in Redis
SESSION_ENDED = 4401
RESTARTS = 12  # a process's shard is a coin toss: 12 misses in a row is 1 run in 4,096


@contextmanager
def redis_server(port, folder) -> Iterator[redis.Redis]:
    """A real Redis on `port`, stopped on exit."""
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    server = subprocess.Popen([*command, "--dir", str(folder)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=2)

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 10, f"the Redis on {port} did not start")
        yield client
    finally:
        server.terminate()
        server.wait(10)


def shard_of(channel: bytes) -> int:
    """The shard (0 or 1) channels-redis keeps a process-local channel's messages on."""
    return _consistent_hash(channel.decode().split("!")[0] + "!", 2)


def queue_key(channel: bytes) -> bytes:
    """The key of the sorted set that holds a process's waiting messages."""
    return b"asgi" + channel.split(b"!")[0] + b"!"


def daphne_answers(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def pid_of(stack, program):
    return int(stack.supervisorctl("pid", program).strip())


def test_group_sends_reach_sockets_on_both_shards(tmp_path):
    base = free_base_port()
    shards_at = [base + 20, base + 21]  # the runtime's Redis, and this module's
    assert port_is_free(shards_at[1])
    hosts = ",".join(f"redis://127.0.0.1:{port}/0" for port in shards_at)
    env = {"CHANNEL_LAYER_HOSTS": hosts, "WS_SESSION_RECHECK_SECONDS": 600, "WS_DRAIN_SECONDS": 1}
    with (
        redis_server(shards_at[1], tmp_path) as second,
        Stack("cross-domain", tmp_path / "stack", port=base, env=env) as stack,
    ):
        shards = [redis.Redis(port=shards_at[0], socket_timeout=2), second]
        # Groups live on the shard their name hashes to: both of ours on the second.
        assert (_consistent_hash("live", 2), _consistent_hash("session-events", 2)) == (1, 1)
        session, key = stack.login()
        leaving, leaving_key = stack.login()

        async def run():
            sockets = {}  # Daphne port -> [its socket of `session`, its socket of `leaving`]
            channels = {}  # Daphne port -> the live-group channel of its process

            async def open_on(port):
                members = set(shards[1].zrange(LIVE, 0, -1))
                ws = await stack.connect("/ws/live/", port=port, cookie=f"sessionid={key}")
                new = await asyncio.to_thread(
                    wait_until, lambda: set(shards[1].zrange(LIVE, 0, -1)) - members, 5, "no join"
                )
                channels[port] = new.pop()
                going = await stack.connect(
                    "/ws/live/", port=port, cookie=f"sessionid={leaving_key}"
                )
                sockets[port] = [ws, going]

            first, second_port = stack.daphne_ports
            await open_on(first)
            await open_on(second_port)
            restarts = 0
            while shard_of(channels[first]) == shard_of(channels[second_port]):
                assert restarts < RESTARTS, "the processes' channels stayed on one shard"
                restarts += 1
                # Same shard: a new process of the second Daphne gets a new random prefix.
                for ws in sockets.pop(second_port):
                    await ws.close()
                await asyncio.to_thread(stack.supervisorctl, "restart", "asgi-2")
                await asyncio.to_thread(
                    wait_until, lambda: daphne_answers(second_port), 15, "asgi-2 not back"
                )
                await open_on(second_port)
            on = {port: shard_of(channel) for port, channel in channels.items()}

            # Both processes paused, past their blocking read: the announcement waits in
            # Redis, on the shard of each process, and on no other.
            daphnes = [pid_of(stack, "asgi-1"), pid_of(stack, "asgi-2")]
            for pid in daphnes:
                os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(BLOCK_SECONDS + 1)
                response = await asyncio.to_thread(
                    stack.csrf_post, session, "/announce/", json={"text": "sharded"}
                )
                assert response.status_code == 200, response.text
                waiting = {
                    port: [shard.zcard(queue_key(channels[port])) for shard in shards]
                    for port in stack.daphne_ports
                }
            finally:
                for pid in daphnes:
                    os.kill(pid, signal.SIGCONT)
            assert waiting == {port: [1, 0] if on[port] == 0 else [0, 1] for port in on}
            assert shards[1].exists(LIVE, SESSION_EVENTS) == 2
            assert shards[0].exists(LIVE, SESSION_EVENTS) == 0

            everyone = [ws for pair in sockets.values() for ws in pair]
            # Sockets on both processes get the announcement, then a message one of them sent.
            await sockets[first][0].send(json.dumps({"text": "from a socket"}))
            for ws in everyone:
                got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
                assert [(f["type"], f["text"]) for f in got] == [
                    ("announcement", "sharded"),
                    ("message", "from a socket"),
                ]
            # A logout's session.end event, on the groups' shard, ends the sockets of the
            # session on both processes, whichever shard each listens on.
            began = time.monotonic()
            logout = await asyncio.to_thread(stack.csrf_post, leaving, "/accounts/logout/")
            assert logout.status_code == 302
            for port in stack.daphne_ports:
                ws, going = sockets[port]
                await asyncio.wait_for(going.wait_closed(), 3)
                assert (going.close_code, ws.close_code) == (SESSION_ENDED, None)
            took = time.monotonic() - began
            for ws in everyone:
                await ws.close()
            return on, restarts, took

        on, restarts, took = asyncio.run(run())
        print(f"\nDaphne ports to shards {on} ({restarts} restarts); logout took {took:.2f} s")
        assert took < 2
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


@pytest.fixture
def two_shards(tmp_path):
    """Two real Redis servers on free ports, as channel-layer hosts."""
    base = free_base_port()
    ports = [base + 20, base + 21]
    with redis_server(ports[0], tmp_path) as a, redis_server(ports[1], tmp_path) as b:
        yield [f"redis://127.0.0.1:{port}/0" for port in ports], (a, b)


def test_direct_send_to_a_process_channel_reaches_it_on_either_shard(two_shards):
    """
    channels-redis 4.3's send() hashed a process-local channel's whole name, its receive()
    only the prefix: sharded, about half of such sends were left on a shard no one reads.
    ResilientRedisChannelLayer hashes the prefix for both.
    """
    hosts, _ = two_shards

    async def run():
        layer = ResilientRedisChannelLayer(hosts=hosts)
        received = 0
        for i in range(20):
            channel = await layer.new_channel()
            await layer.send(channel, {"type": "test.message", "n": i})
            message = await asyncio.wait_for(layer.receive(channel), 5)
            received += message["n"] == i
        await layer.flush()
        return received

    assert async_to_sync(run)() == 20
