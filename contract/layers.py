"""
The channel layer both halves use, and what its failures look like to each of them.
"""

import asyncio
import logging
import time

from channels_redis.core import RedisChannelLayer
from django.core.exceptions import ImproperlyConfigured
from django.dispatch import Signal
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .redis_clients import async_pool

logger = logging.getLogger(__name__)

# What a channel-layer call raises when Redis is unreachable: a socket error, or redis-py's own.
LAYER_ERRORS = (OSError, RedisError)
# The one answer, over HTTP (503) and on a socket (an error frame), when the layer is down.
UNAVAILABLE = "realtime service unavailable, try again"

RETRY_SECONDS = 1
LOG_EVERY_SECONDS = 5
POOL_SIZE = 100  # redis-py's default
POOL_WAIT_SECONDS = 10
# How long receive() blocks in BZPOPMIN, and how long redis-py waits for any reply. The read
# timeout must outlast the block: redis-py's default of 5 s equals channels-redis' default
# block of 5 s, so an idle, healthy Redis timed out every few seconds ("unreachable").
BLOCK_SECONDS = 2
READ_TIMEOUT = 5
# A Redis that is down refuses at once; one that does not answer at all is given this long.
CONNECT_TIMEOUT = 2

# Sent with outage=True when receive() finds Redis gone (a lost connection), and with
# outage=False when Redis answers again; the socket side keeps a metric of it.
outage_changed = Signal()


class ResilientRedisChannelLayer(RedisChannelLayer):
    """
    channels-redis' RedisChannelLayer, except that receive() waits for Redis to come back
    instead of raising: the stock layer's error ends every consumer, and so every open
    socket, when Redis restarts. Sends still raise, so callers can answer 503. And a burst
    of commands waits for a pooled connection instead of failing. Its pools come from
    contract.redis_clients: with Sentinels, they follow the primary through a failover.
    """

    brpop_timeout = BLOCK_SECONDS
    _last_logged = 0.0
    # When receive() last found Redis gone: the socket side re-joins groups after it.
    last_outage = 0.0
    in_outage = False  # from then until Redis answers again (outage_changed)

    def create_pool(self, index):
        # The stock pool raises MaxConnectionsError on the 101st concurrent command: a burst
        # of handshakes, each joining a group, then leaves sockets out of their groups.
        host = dict(self.hosts[index])
        host.setdefault("socket_timeout", READ_TIMEOUT)
        host.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
        pool = async_pool(
            host.pop("address"), max_connections=POOL_SIZE, timeout=POOL_WAIT_SECONDS, **host
        )
        # A ?socket_timeout= in the URL wins over the default above: refuse one that would
        # bring the false outages back.
        read_timeout = pool.connection_kwargs.get("socket_timeout")
        if read_timeout is not None and read_timeout < self.brpop_timeout + 2:
            raise ImproperlyConfigured(
                f"Redis socket_timeout={read_timeout} must exceed the channel layer's "
                f"blocking read ({self.brpop_timeout} s) by 2 s or more."
            )
        return pool

    def consistent_hash(self, value):
        # Sharded over several hosts, a process's channels live on the shard its prefix (up to
        # "!") hashes to: receive() and group_send() hash that, but channels-redis 4.3's send()
        # hashes the whole name, so about half of the direct sends went to a shard no one reads.
        return super().consistent_hash(self.non_local_name(value))

    async def receive(self, channel):
        while True:
            try:
                return await super().receive(channel)
            except LAYER_ERRORS as exc:
                self._log_outage(exc)
                await asyncio.sleep(RETRY_SECONDS)
                await self._check_back()

    async def _check_back(self):
        # A receive that blocks until a message comes cannot say when Redis is back: ask.
        if not self.in_outage:
            return
        try:
            for index in range(self.ring_size):
                await self.connection(index).ping()
        except LAYER_ERRORS:
            return
        if self.in_outage:
            self.in_outage = False
            outage_changed.send(sender=type(self), outage=False)

    def _log_outage(self, exc):
        now = time.monotonic()
        # Only a lost connection can mean a Redis that restarted and lost our groups; a slow
        # command under load is retried without that.
        if isinstance(exc, (RedisConnectionError, ConnectionRefusedError, ConnectionResetError)):
            self.last_outage = now
            if not self.in_outage:
                self.in_outage = True
                outage_changed.send(sender=type(self), outage=True)
        # Every waiting consumer lands here; say it once every few seconds, not once each.
        if now - self._last_logged > LOG_EVERY_SECONDS:
            self._last_logged = now
            logger.warning("channel layer unreachable, retrying every %s s: %r", RETRY_SECONDS, exc)
