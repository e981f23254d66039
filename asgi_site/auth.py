"""
Authentication for sockets opened on a domain the session cookie never reaches.

Browsers send a cookie only to the host that set it, so a socket on REALTIME_HOST
arrives without one. The page then sends a credential instead, in the URL
(``?ticket=...``, ``?session_key=...``) or, keeping it out of URLs altogether, as a
WebSocket subprotocol (``ticket.<value>``, ``session_key.<value>``), and
SessionAuthMiddleware loads the session it names. Precedence: a cookie that gives
a logged-in user, then a ticket, then the session key.
"""

import asyncio
import contextlib
import copy
import logging
import math
import re
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from importlib import import_module
from typing import Any
from urllib.parse import parse_qsl

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.base import VALID_KEY_CHARS, SessionBase
from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.utils import timezone
from django.utils.crypto import constant_time_compare
from redis.exceptions import RedisError

from contract import tickets, user_sockets
from contract.batching import batched
from contract.groups import session_hash

from . import metrics

logger = logging.getLogger(__name__)

# What Django's session stores make and accept: their alphabet, at least the 8
# characters SessionBase._validate_session_key asks for, at most the 40 the
# database column holds. Anything else is refused before a query is made.
SESSION_KEY_RE = re.compile(f"[{VALID_KEY_CHARS}]{{8,40}}")
# A handshake carries a handful of parameters; more than this is an attack on the parser.
MAX_QUERY_FIELDS = 20
IN_CLAUSE = 500  # session keys per query, well under every database's parameter limit

Scope = dict[str, Any]


class SessionAuthMiddleware:
    """
    Populate scope["user"] from the session the socket brings: the cookie's, else a
    ticket's, else a session key's; scope["session"] becomes that session, and
    scope["auth"] says which ("cookie", "ticket", "session_key" or "none"). A cookie's or
    session key's session is checked as Django's get_user checks it, SECRET_KEY_FALLBACKS
    included; the sessions of every handshake waiting at once are read together, in one hop
    to the database thread, and one this process read lately is trusted unread
    (TrustedSessions). A ticket is not read: it was minted for a logged-in session at most
    WS_TICKET_TTL ago, and logout and password changes revoke it (contract.tickets), so it
    costs no query; a session deleted otherwise, or a user deactivated, within that window
    is caught by the socket's first re-check. Its redemption counts the socket against its
    user's cap in the same Redis script, and scope["counted"] says so: (the count's key,
    the socket id, admitted), for the consumer. scope["session"] is not loaded: it gives its
    session_key at once, its data only from sync code. Runs inside SessionMiddleware, in place
    of Channels' AuthMiddleware.
    """

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if "session" not in scope:
            raise ValueError("SessionAuthMiddleware needs to run inside of SessionMiddleware.")
        scope = dict(scope)
        # When the handshake looked its session up: a logout heard after this still ends the
        # socket (upkeep); one heard before it ended any trust in the session (TrustedSessions).
        scope["authenticated_at"] = time.monotonic()
        scope["session"], scope["auth"], scope["user"] = await authenticate(scope)
        return await self.inner(scope, receive, send)


def SessionAuthMiddlewareStack(inner):
    """
    Channels' AuthMiddlewareStack, with every credential a socket on another domain may
    bring: the cookie, a ticket, or the session key.
    """
    return CookieMiddleware(SessionMiddleware(SessionAuthMiddleware(inner)))


# The name this stack had when the session key was its only credential; kept for imports of it.
SessionKeyAuthMiddlewareStack = SessionAuthMiddlewareStack


async def authenticate(
    scope: Scope,
) -> tuple[SessionBase, str, "AbstractBaseUser | AnonymousUser | TicketUser"]:
    """Return (session, source, user): precedence is the cookie, a ticket, the session key."""
    # No cookie, no round trip: cross-domain sockets never bring one.
    if settings.SESSION_COOKIE_NAME in scope["cookies"]:
        session_key = scope["session"].session_key  # None if the cookie is malformed
        user = await known_user(session_key) if session_key else None
        if user is not None:
            return scope["session"], "cookie", user
    grant = await ticket_grant(scope)
    # Minted for a logged-in user, and revoked if that ended (contract.tickets): no query.
    if grant and grant.username and grant.backend in settings.AUTHENTICATION_BACKENDS:
        return session_store(grant.session_key), "ticket", TicketUser(grant)
    key, socket_id, admitted = scope.pop("counted", (None, None, False))
    if admitted:  # counted for a user we do not take from the ticket after all
        with contextlib.suppress(RedisError):
            await user_sockets.uncount(key, socket_id)
    fallbacks = [  # (scope["auth"], the name refusals are logged under, the session key)
        ("ticket", "ticket", grant.session_key if grant is not None else None),
        ("session_key", settings.WS_SESSION_KEY_PARAM, session_key_credential(scope)),
    ]
    for source, name, session_key in fallbacks:
        if session_key is None:
            continue
        user = await known_user(session_key)
        if user is not None:
            return session_store(session_key), source, user
        refuse(scope, name, "unknown_session", "unknown, expired or anonymous session")
    return scope["session"], "none", AnonymousUser()


def session_store(session_key: str) -> SessionBase:
    """The session named `session_key`, unread: loading it waits for its first use."""
    return import_module(settings.SESSION_ENGINE).SessionStore(session_key)


class TicketUser:
    """
    The user a ticket was minted for, as far as the ticket says: pk, username, logged in;
    no query made. Any other attribute loads the user from the database, once: as it is in
    sync code (a database_sync_to_async helper), with `await user.aload()` in async code.
    """

    is_authenticated = True
    is_anonymous = False

    def __init__(self, grant: tickets.Grant) -> None:
        model = get_user_model()
        self.pk = model._meta.pk.to_python(grant.user_pk)
        self.backend = grant.backend
        self._username = grant.username
        self._user: AbstractBaseUser | AnonymousUser | None = None
        setattr(self, model.USERNAME_FIELD, grant.username)

    def get_username(self) -> str | None:
        return self._username

    def __str__(self) -> str:
        return str(self._username)

    def __getattr__(self, name: str) -> Any:
        # Only names not set above reach here: those of the user itself.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.load(), name)

    def load(self) -> AbstractBaseUser | AnonymousUser:
        """The user from the database (sync code); AnonymousUser if it is gone."""
        if self._user is None:
            user = load_backend(str(self.backend)).get_user(self.pk)
            self._user = user if user is not None else AnonymousUser()
        return self._user

    async def aload(self) -> AbstractBaseUser | AnonymousUser:
        """load(), from async code."""
        return self._user or await database_sync_to_async(self.load)()


async def ticket_grant(scope: Scope) -> tickets.Grant | None:
    """Redeem the ticket the socket brings; return its grant, or None."""
    ticket = credential(scope, "ticket")
    if ticket is None:
        return None
    if not tickets.TICKET_RE.fullmatch(ticket):
        refuse(scope, "ticket", "malformed_credential", f"malformed ({len(ticket)} characters)")
        return None
    socket_id = uuid.uuid4().hex
    try:
        grant, counted = await tickets.claim(ticket, scope["path"], socket_id)
    except RedisError as exc:
        refuse(scope, "ticket", "redis_unreachable", f"Redis unreachable ({type(exc).__name__})")
        return None
    if grant is None:
        reason = "unknown, expired, already used, or minted for another path"
        refuse(scope, "ticket", "unknown_ticket", reason)
        return None
    metrics.TICKETS_REDEEMED.inc()
    if counted is not None:  # for the consumer's cap check (asgi_site.upkeep.Upkeep.admit)
        key, admitted = counted
        scope["counted"] = (key, socket_id, admitted)
    return grant


def session_key_credential(scope: Scope) -> str | None:
    """Return the well-formed session key the socket brings, or None."""
    name = settings.WS_SESSION_KEY_PARAM
    if not settings.WS_SESSION_KEY_FALLBACK:
        return None
    session_key = credential(scope, name)
    if session_key is not None and not SESSION_KEY_RE.fullmatch(session_key):
        return refuse(
            scope, name, "malformed_credential", f"malformed ({len(session_key)} characters)"
        )
    return session_key


def credential(scope: Scope, name: str) -> str | None:
    """
    Return credential `name` from the query string (name=value) or the subprotocols
    (name.value), or None. Given more than once, or both ways, it is refused.
    """
    prefix = name + "."
    values = query_values(scope, name) + [
        protocol[len(prefix) :]
        for protocol in scope.get("subprotocols", [])
        if protocol.startswith(prefix)
    ]
    if len(values) > 1:
        return refuse(scope, name, "repeated_credential", f"given {len(values)} times")
    return values[0] if values else None


def query_values(scope: Scope, name: str) -> list[str]:
    """Return every value of `name` in the scope's query string ([] if unreadable)."""
    try:
        query = scope.get("query_string", b"").decode("ascii")
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        logger.info("query string ignored: %s", type(exc).__name__)
        return []
    return [value for key, value in pairs if key == name]


def refuse(scope: Scope, name: str, code: str, reason: str) -> str | None:
    # Log why a credential was refused, and stand in for it as None ("return refuse(...)").
    # The reason is logged; the value never is, not even in part. The first refusal's code
    # is the handshake's reason in metrics.HANDSHAKES, should it stay anonymous.
    logger.info("%s refused: %s", name, reason)
    scope.setdefault("refusal", code)
    return None


async def known_user(session_key: str) -> "AbstractBaseUser | None":
    """The user the session authenticates, or None: as this process read it lately, or read now."""
    trusted = trusted_sessions()
    user = trusted.get(session_key)
    if user is not None:
        metrics.SESSION_LOOKUPS.labels("trusted").inc()
        return user
    metrics.SESSION_LOOKUPS.labels("database").inc()
    read_at = time.monotonic()
    user = await session_user(session_key)
    if user is not None:
        trusted.keep(session_key, user, read_at)
    return user


class TrustedSessions:
    """
    The users of the sessions this process read lately, by session key: a page's next
    socket on the same session costs no query. One is trusted WS_SESSION_TRUST_SECONDS from
    its read, and only while the process hears session.end events (asgi_site.upkeep tells
    it what it hears), so logout and password change end the trust at once. A session
    deleted otherwise, expired, or whose user was deactivated in that window is trusted as
    an outstanding ticket would be: the socket's first re-check closes it.
    """

    def __init__(self) -> None:
        # session_hash(key) -> (user, read at): a session.end event names the session so.
        self.users: dict[str, tuple[AbstractBaseUser, float]] = {}
        self.ended: dict[Any, float] = {}  # session hash, or ("user", pk) -> when heard
        self.hearing_since = float("inf")  # when this process (re)joined session.end events
        self.pruned = 0.0

    def get(self, session_key: str) -> AbstractBaseUser | None:
        user, read_at = self.users.get(session_hash(session_key), (None, 0.0))
        if user is None or time.monotonic() - read_at >= settings.WS_SESSION_TRUST_SECONDS:
            return None
        layer = get_channel_layer()
        # Read while Redis was out, or before we (re)joined the events after an outage: an
        # event may have been lost, so it is read again.
        if getattr(layer, "in_outage", False):
            return None
        if not read_at >= self.hearing_since > getattr(layer, "last_outage", 0.0):
            return None
        return copy.copy(user)  # each socket its own, as a read would give it

    def keep(self, session_key: str, user: AbstractBaseUser, read_at: float) -> None:
        """Trust what was read at `read_at`, unless its session or user ended lately."""
        self.prune_when_due()
        digest = session_hash(session_key)
        heard = max(self.ended.get(digest, -math.inf), self.ended.get(("user", user.pk), -math.inf))
        # Not even a read begun after the event: Django sends user_logged_out before it
        # deletes the session, so such a read may still have found it. (A read older than
        # the window is refused by get() anyway.)
        if time.monotonic() - heard < settings.WS_SESSION_TRUST_SECONDS:
            return
        if settings.WS_SESSION_TRUST_SECONDS > 0:
            self.users[digest] = (copy.copy(user), read_at)  # apart from the reader's

    def end(self, event: dict) -> None:
        """
        A session.end event heard, or a re-check that found a session gone: what it names is
        read from the database for every handshake for WS_SESSION_TRUST_SECONDS.
        """
        self.prune_when_due()
        now = time.monotonic()
        if "session" in event:
            self.ended[event["session"]] = now
            self.users.pop(event["session"], None)
        if "user" in event:
            self.ended[("user", event["user"])] = now
            self.users = {
                k: entry for k, entry in self.users.items() if entry[0].pk != event["user"]
            }

    def prune_when_due(self) -> None:
        # Whatever is older than the window is of no use: get() refuses reads that old, and
        # a read that straddled a forgotten event is one of them.
        now, window = time.monotonic(), settings.WS_SESSION_TRUST_SECONDS
        if now - self.pruned <= window:
            return
        self.users = {k: entry for k, entry in self.users.items() if now - entry[1] < window}
        self.ended = {k: heard for k, heard in self.ended.items() if now - heard < window}
        self.pruned = now


_trusted: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TrustedSessions] = (
    weakref.WeakKeyDictionary()
)


def trusted_sessions() -> TrustedSessions:
    """The TrustedSessions of the running event loop (Daphne has one; tests make many)."""
    loop = asyncio.get_running_loop()
    if loop not in _trusted:
        _trusted[loop] = TrustedSessions()
    return _trusted[loop]


@batched
async def session_user(session_keys: list[str]) -> list["AbstractBaseUser | None"]:
    """
    Called for one session key: the user its session authenticates, or None. The sessions
    of every handshake waiting at once are read together, in one hop to the database
    thread and two queries.
    """
    try:
        users = await database_sync_to_async(session_users)(set(session_keys))
    except DatabaseError as exc:
        logger.warning("session store unreachable: %s", type(exc).__name__)
        users = {}
    return [users.get(session_key) for session_key in session_keys]


def session_users(session_keys: Iterable[str]) -> dict[str, AbstractBaseUser]:
    """
    The user each session authenticates, by session key; a session that authenticates no
    one is left out. Two queries however many sessions, one for the unexpired sessions, one
    for their users (a backend other than ModelBackend fetches its own). A session whose
    user id is unreadable authenticates no one. Loading never creates or saves a session.
    """
    store = import_module(settings.SESSION_ENGINE).SessionStore
    keys = sorted(session_keys)
    data: dict[str, dict] = {}
    for start in range(0, len(keys), IN_CLAUSE):
        rows = store.get_model_class().objects.filter(
            session_key__in=keys[start : start + IN_CLAUSE], expire_date__gt=timezone.now()
        )
        data.update((row.session_key, store().decode(row.session_data)) for row in rows)
    pks = {pk for pk in map(user_id, data.values()) if pk is not None}
    fetched = get_user_model()._default_manager.in_bulk(pks) if pks else {}

    def get_user(backend, user_id):
        # ModelBackend.get_user, from the users fetched above; another backend fetches its own.
        if type(backend).get_user is not ModelBackend.get_user:
            return backend.get_user(user_id)
        user = fetched.get(user_id)
        return user if user is not None and backend.user_can_authenticate(user) else None

    users = {key: authenticated_user(session, get_user) for key, session in data.items()}
    return {key: user for key, user in users.items() if user is not None}


def user_id(session: Any) -> Any:
    """The user id a session names, as the user model's pk; None if none, or unreadable."""
    try:
        return get_user_model()._meta.pk.to_python(session[SESSION_KEY])
    except (KeyError, ValidationError):
        return None


def authenticated_user(
    session: Any, get_user: Callable[[Any, Any], AbstractBaseUser | None]
) -> AbstractBaseUser | None:
    """
    Return the user the session data authenticates, or None: Django's get_user, except
    that a session verified by an old key is kept as it is (a socket cannot send the
    cycled key's cookie back) and a failed one is not flushed (the HTTP side does that).
    `get_user(backend, user_id)` fetches the user, so callers can fetch many at once.
    """
    pk, backend_path = user_id(session), session.get(BACKEND_SESSION_KEY)
    if pk is None or backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user = get_user(load_backend(backend_path), pk)
    stored_hash = session.get(HASH_SESSION_KEY)
    if user is None or not stored_hash:
        return None
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    if any(constant_time_compare(stored_hash, known) for known in hashes):
        return user
    return None
