"""
Single-use tickets: the safer form of the session-key fallback.

The page asks Gunicorn for a ticket (POST /ws-ticket/) and opens its socket with it;
Daphne redeems it exactly once (GETDEL) for the session it was minted for. A ticket
lives WS_TICKET_TTL seconds, and Redis holds only its SHA-256, never the ticket itself.
"""

import asyncio
import functools
import hashlib
import re
import secrets
import weakref

import redis
import redis.asyncio
from django.conf import settings

# secrets.token_urlsafe(32): 256 random bits in 43 URL-safe characters.
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# Seconds: an unreachable Redis gets a prompt 503 or an anonymous socket, not a hang.
TIMEOUT = 2


def redis_key(ticket: str) -> str:
    return "ws-ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


@functools.cache
def sync_client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
    )


# One client per event loop: an asyncio connection cannot move between loops.
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
    weakref.WeakKeyDictionary()
)


def async_client() -> redis.asyncio.Redis:
    loop = asyncio.get_running_loop()
    if loop not in _async_clients:
        _async_clients[loop] = redis.asyncio.Redis.from_url(
            settings.REDIS_URL, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
        )
    return _async_clients[loop]


def mint(session_key: str) -> str:
    """Return a new ticket for the session. Raises redis.RedisError if Redis is unreachable."""
    ticket = secrets.token_urlsafe(32)
    sync_client().set(redis_key(ticket), session_key, ex=settings.WS_TICKET_TTL)
    return ticket


async def redeem(ticket: str) -> str | None:
    """Return the session key the ticket was minted for, the first time only; else None."""
    session_key = await async_client().getdel(redis_key(ticket))
    return session_key.decode() if isinstance(session_key, bytes) else None
