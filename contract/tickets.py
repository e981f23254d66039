"""
Single-use tickets: the safer form of the session-key fallback.

The page asks Gunicorn for a ticket for one socket path (POST /ws-ticket/) and opens that
socket with it; Daphne redeems it exactly once (GETDEL) for the session it was minted for. A
ticket lives WS_TICKET_TTL seconds. Redis holds no credential: the entry is named by the
ticket's SHA-256, and holds a Grant sealed (AES-GCM) under a key derived from the ticket,
with the path as associated data. Whoever reads Redis learns neither the ticket nor the
session key, and a ticket opens no other path than its own.

A Grant names the session and, when the HTTP side minted it for a logged-in user (it always
does), who that user is: a handshake redeems it in that one GETDEL, with no database query.
So a ticket must not outlive what it vouches for: logout, "log out everywhere" and a
password change revoke every ticket still outstanding for the session or the user (each is
listed, by its hash, in a set per session and per user, which lives as long as they do).
"""

import dataclasses
import hashlib
import json
import os
import re
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings

from .groups import session_hash
from .redis_clients import async_client, sync_client

# secrets.token_urlsafe(32): 256 random bits in 43 URL-safe characters.
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
TICKET_KEY = "ws-ticket:{}"
# The outstanding tickets (their hashes) of one session, and of one user.
OF_SESSION_KEY = "ws-tickets-of-session:{}"
OF_USER_KEY = "ws-tickets-of-user:{}"
# Delete every ticket listed in the sets KEYS, and the sets.
REVOKE_SCRIPT = """
local revoked = 0
for _, set in ipairs(KEYS) do
    for _, digest in ipairs(redis.call('SMEMBERS', set)) do
        revoked = revoked + redis.call('DEL', 'ws-ticket:' .. digest)
    end
    redis.call('DEL', set)
end
return revoked
"""


@dataclasses.dataclass(frozen=True)
class Grant:
    """What a ticket gives its handshake: the session, and the user it was minted for."""

    session_key: str
    user_pk: Any = None  # as JSON holds it; None: minted without a user, look the session up
    username: str | None = None
    backend: str | None = None  # the authentication backend's dotted path


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def redis_key(ticket: str) -> str:
    return TICKET_KEY.format(_digest(ticket))


def _sealing_key(ticket: str) -> bytes:
    # Derived apart from the lookup hash above: knowing one tells nothing of the other.
    return hashlib.sha256(b"ws-ticket-seal:" + ticket.encode()).digest()


def seal(ticket: str, path: str, grant: Grant) -> bytes:
    """The grant, readable only with the ticket, and only for `path`."""
    nonce = os.urandom(12)
    plain = json.dumps(dataclasses.asdict(grant), separators=(",", ":")).encode()
    return nonce + AESGCM(_sealing_key(ticket)).encrypt(nonce, plain, path.encode())


def unseal_grant(ticket: str, path: str, sealed: bytes) -> Grant | None:
    """The grant `seal` hid, or None if the ticket was minted for another path."""
    try:
        plain = AESGCM(_sealing_key(ticket)).decrypt(sealed[:12], sealed[12:], path.encode())
    except InvalidTag:
        return None
    if not plain.startswith(b"{"):  # sealed before grants named the user: the key alone
        return Grant(plain.decode())
    return Grant(**json.loads(plain))


def unseal(ticket: str, path: str, sealed: bytes) -> str | None:
    """The session key `seal` hid, or None if the ticket was minted for another path."""
    grant = unseal_grant(ticket, path, sealed)
    return grant.session_key if grant is not None else None


def mint(
    session_key: str,
    path: str,
    *,
    user_pk: Any = None,
    username: str | None = None,
    backend: str | None = None,
) -> str:
    """
    Return a new ticket for the session (and its user, when given), on `path`. Raises
    RedisError if Redis is down.
    """
    ticket = secrets.token_urlsafe(32)
    grant = Grant(session_key, user_pk, username, backend)
    ttl, digest = settings.WS_TICKET_TTL, _digest(ticket)
    pipe = sync_client().pipeline()
    pipe.set(TICKET_KEY.format(digest), seal(ticket, path, grant), ex=ttl)
    for index in _indexes(session_key, user_pk):
        pipe.sadd(index, digest)
        pipe.expire(index, ttl)  # this ticket is the set's newest: it outlives the others
    pipe.execute()
    return ticket


def _indexes(session_key: str | None, user_pk: Any) -> list[str]:
    keys = []
    if session_key is not None:
        keys.append(OF_SESSION_KEY.format(session_hash(session_key)))
    if user_pk is not None:
        keys.append(OF_USER_KEY.format(user_pk))
    return keys


def revoke(*, session: str | None = None, user: Any = None) -> int:
    """
    Revoke every outstanding ticket of a session (named by its session_hash, as session.end
    events name it) or of a user; return how many. Raises RedisError if Redis is down.
    """
    keys = []
    if session is not None:
        keys.append(OF_SESSION_KEY.format(session))
    if user is not None:
        keys.append(OF_USER_KEY.format(user))
    return int(sync_client().eval(REVOKE_SCRIPT, len(keys), *keys)) if keys else 0


async def claim(ticket: str, path: str) -> Grant | None:
    """
    Return the grant the ticket was minted with, the first time only and on its own path,
    in one Redis command; else None. A ticket tried on another path is used up all the same.
    """
    sealed = await async_client().getdel(redis_key(ticket))
    return unseal_grant(ticket, path, sealed) if isinstance(sealed, bytes) else None


async def redeem(ticket: str, path: str) -> str | None:
    """claim(), for the session key alone."""
    grant = await claim(ticket, path)
    return grant.session_key if grant is not None else None
