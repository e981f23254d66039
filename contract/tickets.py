"""
Single-use tickets: the safer form of the session-key fallback.

The page asks Gunicorn for a ticket for one socket path (POST /ws-ticket/) and opens that
socket with it; Daphne redeems it exactly once (one script reads and deletes it) for the
session it was minted for. A ticket lives WS_TICKET_TTL seconds. Redis holds no credential:
the entry is named by the ticket's SHA-256, and holds a Grant sealed (AES-GCM) under a key
derived from the ticket, with the path as associated data, beside the user's pk in the
clear. Whoever reads Redis learns neither the ticket nor the session key, and a ticket opens
no other path than its own.

A Grant names the session and, when the HTTP side minted it for a logged-in user (it always
does), who that user is: a handshake redeems it in that one script, with no database query,
and the same script counts the socket against the user's cap (contract.user_sockets). So a
ticket must not outlive what it vouches for: logout, "log out everywhere" and a password
change revoke every ticket still outstanding for the session or the user (each is listed,
by its hash, in a set per session and per user, which lives as long as they do).
"""

import contextlib
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
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from .batching import batched
from .groups import session_hash
from .redis_clients import async_client, sync_client
from .user_sockets import ADMIT, USER_SOCKETS_KEY, counted_seconds, uncount

# secrets.token_urlsafe(32): 256 random bits in 43 URL-safe characters.
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
TICKET_KEY = "ws-ticket:{}"
# The outstanding tickets (their hashes) of one session, and of one user.
OF_SESSION_KEY = "ws-tickets-of-session:{}"
OF_USER_KEY = "ws-tickets-of-user:{}"
# Redeem each ticket KEYS[i] (GET and DEL), and count its socket ARGV[i] against its user's
# cap (the next-to-last ARGV; the counting window is the last) when both are known: per
# ticket, {sealed grant, user pk, 1 counted / 0 at the cap / -1 not counted}. A ticket
# minted as a plain string, before the user was stored beside it, is redeemed uncounted.
REDEEM_SCRIPT = (
    ADMIT
    + """
local answers = {}
for i, key in ipairs(KEYS) do
    local sealed, user = false, false
    if redis.call('TYPE', key)['ok'] == 'string' then
        sealed = redis.call('GET', key)
    else
        local fields = redis.call('HMGET', key, 'grant', 'user')
        sealed, user = fields[1], fields[2]
    end
    redis.call('DEL', key)
    local counted = -1
    if sealed and user and ARGV[i] ~= '' and cap > 0 then
        counted = admit(USER_SOCKETS_PREFIX .. user, ARGV[i])
    end
    answers[i] = {sealed, user, counted}
end
return answers
"""
)
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
    # The user's pk in the clear (the index below names it too): the redemption counts the
    # socket against that user's cap in the same script.
    pipe.hset(TICKET_KEY.format(digest), "grant", seal(ticket, path, grant))
    if user_pk is not None:
        pipe.hset(TICKET_KEY.format(digest), "user", str(user_pk))
    pipe.expire(TICKET_KEY.format(digest), ttl)
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


async def claim(
    ticket: str, path: str, socket_id: str = ""
) -> tuple[Grant | None, tuple[str, bool] | None]:
    """
    Return the grant the ticket was minted with, the first time only and on its own path
    (else None), and, if its socket `socket_id` was counted against the user's cap
    (contract.user_sockets) in the same script, (the count's key, admitted); else None (no
    socket id, no user named, no cap, or no grant). A ticket tried on another path is used
    up all the same, and its socket not counted.
    """
    sealed, user, admitted = await redeem_and_count((redis_key(ticket), socket_id))
    grant = unseal_grant(ticket, path, sealed) if isinstance(sealed, bytes) else None
    if admitted is None:
        return grant, None
    key = USER_SOCKETS_KEY.format(user.decode())
    if grant is None:  # minted for another path: this socket is not that user's
        if admitted:
            with contextlib.suppress(RedisError):  # else it stops counting in counted_seconds()
                await uncount(key, socket_id)
        return None, None
    return grant, (key, admitted)


async def redeem(ticket: str, path: str) -> str | None:
    """claim(), for the session key alone (no socket counted)."""
    grant, _ = await claim(ticket, path)
    return grant.session_key if grant is not None else None


@batched
async def redeem_and_count(entries: list[tuple[str, str]]) -> list[tuple[Any, Any, bool | None]]:
    """
    Called for one (ticket's Redis key, socket id): its sealed grant or None, the user pk it
    names, and whether the socket was counted. The tickets of every handshake waiting at
    once go in one script call.
    """
    keys, ids = [key for key, _ in entries], [socket_id for _, socket_id in entries]
    cap = settings.WS_MAX_SOCKETS_PER_USER
    script = AsyncScript(async_client("redeem"), REDEEM_SCRIPT)  # EVALSHA: the body is not resent
    answers = await script(keys=keys, args=[*ids, cap, counted_seconds()])
    return [(sealed, user, {1: True, 0: False}.get(n)) for sealed, user, n in answers]
