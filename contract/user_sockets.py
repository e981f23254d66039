"""
The per-user count of open sockets (WS_MAX_SOCKETS_PER_USER), kept in Redis for every
Daphne process: one sorted set per user of socket ids, scored with Redis' clock when their
process last vouched for them. asgi_site.upkeep keeps it; a ticket's redemption
(contract.tickets) counts its socket in the same script, so ADMIT is shared Lua.
"""

from django.conf import settings

from .redis_clients import async_client

USER_SOCKETS_KEY = "ws-user-sockets:{}"

# Lua shared by the scripts that count sockets: the prefix of USER_SOCKETS_KEY (to name a
# user's count from the pk), `now` from Redis' clock, `cap` and `window`
# from the last two ARGV, and admit(key, socket_id): count the socket if the user has fewer
# than `cap` counted, after dropping ids not vouched for in the last `window` seconds.
ADMIT = f"""
local USER_SOCKETS_PREFIX = '{USER_SOCKETS_KEY.format("")}'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local cap, window = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
local function admit(key, socket_id)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    if redis.call('ZCARD', key) >= cap then
        return 0
    end
    redis.call('ZADD', key, now, socket_id)
    redis.call('EXPIRE', key, math.ceil(window))
    return 1
end
"""


def counted_seconds() -> float:
    """How long a socket id counts without its process vouching for it again."""
    return 3 * settings.WS_SESSION_RECHECK_SECONDS + 30


async def uncount(key: str, socket_id: str) -> None:
    """Take one socket out of its user's count at once. Raises RedisError if Redis is down."""
    await async_client().zrem(key, socket_id)
