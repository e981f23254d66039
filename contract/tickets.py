"""
Single-use tickets: the safer form of the session-key fallback.

The page asks Gunicorn for a ticket for one socket path (POST /ws-ticket/) and opens that
socket with it; Daphne redeems it exactly once (GETDEL) for the session it was minted for. A
ticket lives WS_TICKET_TTL seconds. Redis holds no credential: the entry is named by the
ticket's SHA-256, and holds the session key sealed (AES-GCM) under a key derived from the
ticket, with the path as associated data. Whoever reads Redis learns neither the ticket nor
the session key, and a ticket opens no other path than its own.
"""

import asyncio
import functools
import hashlib
import os
import re
import secrets
import weakref

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from redis.backoff import NoBackoff

# secrets.token_urlsafe(32): 256 random bits in 43 URL-safe characters.
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# Seconds: an unreachable Redis gets a prompt 503 or an anonymous socket, not a hang.
TIMEOUT = 2


def redis_key(ticket: str) -> str:
    return "ws-ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


def _sealing_key(ticket: str) -> bytes:
    # Derived apart from the lookup hash above: knowing one tells nothing of the other.
    return hashlib.sha256(b"ws-ticket-seal:" + ticket.encode()).digest()


def seal(ticket: str, path: str, session_key: str) -> bytes:
    """The session key, readable only with the ticket, and only for `path`."""
    nonce = os.urandom(12)
    return nonce + AESGCM(_sealing_key(ticket)).encrypt(nonce, session_key.encode(), path.encode())


def unseal(ticket: str, path: str, sealed: bytes) -> str | None:
    """The session key `seal` hid, or None if the ticket was minted for another path."""
    try:
        plain = AESGCM(_sealing_key(ticket)).decrypt(sealed[:12], sealed[12:], path.encode())
    except InvalidTag:
        return None
    return plain.decode()


# A pooled connection that Redis closed (it restarted) fails its next command: retry that
# once, at once, on a new connection, or the first command after every Redis restart fails.
# A timeout is not retried: an unreachable Redis still answers within TIMEOUT.
@functools.cache
def sync_client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        retry=redis.retry.Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )


# One client per event loop: an asyncio connection cannot move between loops.
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
    weakref.WeakKeyDictionary()
)


def async_client() -> redis.asyncio.Redis:
    loop = asyncio.get_running_loop()
    if loop not in _async_clients:
        _async_clients[loop] = redis.asyncio.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=redis.asyncio.retry.Retry(
                NoBackoff(), 1, supported_errors=(redis.ConnectionError,)
            ),
        )
    return _async_clients[loop]


def mint(session_key: str, path: str) -> str:
    """Return a new ticket for the session, on `path`. Raises RedisError if Redis is down."""
    ticket = secrets.token_urlsafe(32)
    sealed = seal(ticket, path, session_key)
    sync_client().set(redis_key(ticket), sealed, ex=settings.WS_TICKET_TTL)
    return ticket


async def redeem(ticket: str, path: str) -> str | None:
    """
    Return the session key the ticket was minted for, the first time only and on its own
    path; else None. A ticket tried on another path is used up all the same.
    """
    sealed = await async_client().getdel(redis_key(ticket))
    return unseal(ticket, path, sealed) if isinstance(sealed, bytes) else None
