"""
Every Redis client the project makes, built from settings here and nowhere else: the clients
of tickets, history and socket upkeep (REDIS_URL), and the channel layer's connection pools
(CHANNEL_LAYER_HOSTS, contract.layers).

With REDIS_SENTINELS set (Redis with failover), a client asks the Sentinels which Redis is the
primary of REDIS_SENTINEL_MASTER each time it opens a connection, so once they have promoted
a replica the next connection goes to it: no process restarts. REDIS_URL then gives the
database, password and TLS, not the address.
"""

import asyncio
import functools
import weakref
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from django.conf import settings
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import parse_url

# Seconds: an unreachable Redis gets a prompt 503 or an anonymous socket, not a hang.
TIMEOUT = 2
CLIENT_OPTIONS: dict[str, Any] = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
# Connections of one asyncio client; past them a command waits (up to TIMEOUT) for a free one.
POOL_SIZE = 100


def _primary_options(url: str) -> dict[str, Any]:
    """What a Sentinel-found primary takes from `url`: all but the address."""
    options = parse_url(url)
    for name in ("host", "port", "path", "connection_class"):
        options.pop(name, None)
    # redis-py's Sentinel pools pick their TLS connection class from this flag.
    options["ssl"] = url.startswith("rediss://")
    return options


def _reconnect_once(retry_class):
    # A pooled connection that Redis closed (it restarted, or died and the Sentinels named
    # another primary) fails its next command: retry that once, at once, on a new connection,
    # or the first command after every restart or failover fails. A timeout is not retried:
    # an unreachable Redis still answers within the client's timeout.
    return retry_class(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def _sentinel_options(retry_class) -> dict[str, Any]:
    # For the Sentinels themselves: one that is down is skipped at once, not retried with
    # redis-py's default backoff (10 tries) before the next one is asked.
    return {**CLIENT_OPTIONS, "retry": retry_class(NoBackoff(), 0)}


@functools.cache
def sync_client() -> redis.Redis:
    """The client of the HTTP side (and of any sync code): one per process, thread-safe."""
    retry = _reconnect_once(redis.retry.Retry)
    if not settings.REDIS_SENTINELS:
        return redis.Redis.from_url(settings.REDIS_URL, retry=retry, **CLIENT_OPTIONS)
    sentinel = redis.sentinel.Sentinel(
        settings.REDIS_SENTINELS, sentinel_kwargs=_sentinel_options(redis.retry.Retry)
    )
    options = {**CLIENT_OPTIONS, **_primary_options(settings.REDIS_URL)}
    return sentinel.master_for(settings.REDIS_SENTINEL_MASTER, retry=retry, **options)


# The clients of each event loop, by purpose: an asyncio connection cannot move between loops.
_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str | None, redis.asyncio.Redis]
] = weakref.WeakKeyDictionary()


def async_client(purpose: str | None = None) -> redis.asyncio.Redis:
    """
    The client of the socket side, for the running event loop. With a `purpose`, a client
    with a pool of its own, for a caller that never has two commands under way (a @batched
    function runs one batch at a time): redis-py's stock pool, which skips the blocking
    pool's condition and timeout on every command (about 70 of the 290 µs of CPU a short
    script call took here).
    """
    clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
    if purpose not in clients:
        if purpose is None:
            # Blocking: redis-py's stock pool raises MaxConnectionsError on the 101st
            # concurrent command, which a burst of handshakes (each reading history) reaches.
            pool = async_pool(
                settings.REDIS_URL, max_connections=POOL_SIZE, timeout=TIMEOUT, **CLIENT_OPTIONS
            )
        else:
            pool = async_pool(settings.REDIS_URL, blocking=False, **CLIENT_OPTIONS)
        clients[purpose] = redis.asyncio.Redis.from_pool(pool)
    return clients[purpose]


async def close_async_clients() -> None:
    """Close every client of the running event loop (one that is about to end)."""
    for client in _async_clients.pop(asyncio.get_running_loop(), {}).values():
        await client.aclose()


class BlockingSentinelConnectionPool(SentinelConnectionPool, redis.asyncio.BlockingConnectionPool):
    """redis-py's Sentinel pool, that waits for a free connection instead of raising."""


def async_pool(url: str, *, blocking: bool = True, **options) -> redis.asyncio.ConnectionPool:
    """
    An asyncio pool for `url` (with Sentinels: for the primary). Blocking, a command waits
    for a free connection when all are busy, and `options` are those of
    BlockingConnectionPool; else it is redis-py's stock pool. Options in the URL's query
    string win over `options`, as in redis-py's from_url.
    """
    retry = _reconnect_once(redis.asyncio.retry.Retry)
    if not settings.REDIS_SENTINELS:
        plain = redis.asyncio.BlockingConnectionPool if blocking else redis.asyncio.ConnectionPool
        return plain.from_url(url, **{"retry": retry, **options})
    # A Sentinel client per pool: like the pool's connections, its own belong to one loop.
    sentinel = redis.asyncio.sentinel.Sentinel(
        settings.REDIS_SENTINELS,
        sentinel_kwargs=_sentinel_options(redis.asyncio.retry.Retry),
    )
    options = {"retry": retry, **options, **_primary_options(url)}
    pool_class = BlockingSentinelConnectionPool if blocking else SentinelConnectionPool
    return pool_class(settings.REDIS_SENTINEL_MASTER, sentinel, **options)
