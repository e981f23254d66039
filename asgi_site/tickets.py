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
TIMEOUTS = {"socket_timeout": 2, "socket_connect_timeout": 2}


def redis_key(ticket):
    return "ws-ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


@functools.cache
def sync_client():
    return redis.Redis.from_url(settings.REDIS_URL, **TIMEOUTS)


# One client per event loop: an asyncio connection cannot move between loops.
_async_clients = weakref.WeakKeyDictionary()


def async_client():
    loop = asyncio.get_running_loop()
    if loop not in _async_clients:
        _async_clients[loop] = redis.asyncio.Redis.from_url(settings.REDIS_URL, **TIMEOUTS)
    return _async_clients[loop]


def mint(session_key):
    """Return a new ticket for the session. Raises redis.RedisError if Redis is unreachable."""
    ticket = secrets.token_urlsafe(32)
    sync_client().set(redis_key(ticket), session_key, ex=settings.WS_TICKET_TTL)
    return ticket


async def redeem(ticket):
    """Return the session key the ticket was minted for, the first time only; else None."""
    session_key = await async_client().getdel(redis_key(ticket))
    return session_key.decode() if session_key else None
