import asyncio
import logging
import time

from channels_redis.core import RedisChannelLayer
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1
LOG_EVERY_SECONDS = 5


class ResilientRedisChannelLayer(RedisChannelLayer):
    """
    channels-redis' RedisChannelLayer, except that receive() waits for Redis to come back
    instead of raising: the stock layer's error ends every consumer, and so every open
    socket, when Redis restarts. Sends still raise, so callers can answer 503.
    """

    _last_logged = 0.0
    # When receive() last found Redis gone: asgi_site.upkeep re-joins groups after it.
    last_outage = 0.0

    async def receive(self, channel):
        while True:
            try:
                return await super().receive(channel)
            except (OSError, RedisError) as exc:
                self._log_outage(exc)
                await asyncio.sleep(RETRY_SECONDS)

    def _log_outage(self, exc):
        # Every waiting consumer lands here; say it once every few seconds, not once each.
        now = self.last_outage = time.monotonic()
        if now - self._last_logged > LOG_EVERY_SECONDS:
            self._last_logged = now
            logger.warning("channel layer unreachable, retrying every %s s: %r", RETRY_SECONDS, exc)
