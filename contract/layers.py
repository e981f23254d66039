"""
The channel layer both halves use, and what its failures look like to each of them.
"""

import asyncio
import logging
import time

from channels_redis.core import RedisChannelLayer
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

# What a channel-layer call raises when Redis is unreachable: a socket error, or redis-py's own.
LAYER_ERRORS = (OSError, RedisError)
# The one answer, over HTTP (503) and on a socket (an error frame), when the layer is down.
UNAVAILABLE = "realtime service unavailable, try again"

RETRY_SECONDS = 1
LOG_EVERY_SECONDS = 5
POOL_SIZE = 100  # redis-py's default
POOL_WAIT_SECONDS = 10


class ResilientRedisChannelLayer(RedisChannelLayer):
    """
    channels-redis' RedisChannelLayer, except that receive() waits for Redis to come back
    instead of raising: the stock layer's error ends every consumer, and so every open
    socket, when Redis restarts. Sends still raise, so callers can answer 503. And a burst
    of commands waits for a pooled connection instead of failing.
    """

    _last_logged = 0.0
    # When receive() last found Redis gone: the socket side re-joins groups after it.
    last_outage = 0.0

    def create_pool(self, index):
        # The stock pool raises MaxConnectionsError on the 101st concurrent command: a burst
        # of handshakes, each joining a group, then leaves sockets out of their groups.
        host = dict(self.hosts[index])
        return BlockingConnectionPool.from_url(
            host.pop("address"), max_connections=POOL_SIZE, timeout=POOL_WAIT_SECONDS, **host
        )

    async def receive(self, channel):
        while True:
            try:
                return await super().receive(channel)
            except LAYER_ERRORS as exc:
                self._log_outage(exc)
                await asyncio.sleep(RETRY_SECONDS)

    def _log_outage(self, exc):
        now = time.monotonic()
        # Only a lost connection can mean a Redis that restarted and lost our groups; a slow
        # command under load is retried without that.
        if isinstance(exc, (RedisConnectionError, ConnectionRefusedError, ConnectionResetError)):
            self.last_outage = now
        # Every waiting consumer lands here; say it once every few seconds, not once each.
        if now - self._last_logged > LOG_EVERY_SECONDS:
            self._last_logged = now
            logger.warning("channel layer unreachable, retrying every %s s: %r", RETRY_SECONDS, exc)
