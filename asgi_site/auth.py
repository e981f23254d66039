"""
Authentication for sockets opened on a domain the session cookie never reaches.

Browsers send a cookie only to the host that set it, so a socket on REALTIME_HOST
arrives without one. The page then sends a credential instead, in the URL
(``?ticket=...``, ``?session_key=...``) or, keeping it out of URLs altogether, as a
WebSocket subprotocol (``ticket.<value>``, ``session_key.<value>``), and
FallbackSessionMiddleware loads the session it names. Precedence: a cookie that gives
a logged-in user, then a ticket, then the session key.
"""

import logging
import re
from importlib import import_module
from urllib.parse import parse_qsl

from channels import auth as channels_auth
from channels.db import database_sync_to_async
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.base import VALID_KEY_CHARS
from django.db import DatabaseError
from django.utils.crypto import constant_time_compare
from redis.exceptions import RedisError

from . import tickets

logger = logging.getLogger(__name__)

# What Django's session stores make and accept: their alphabet, at least the 8
# characters SessionBase._validate_session_key asks for, at most the 40 the
# database column holds. Anything else is refused before a query is made.
SESSION_KEY_RE = re.compile(f"[{VALID_KEY_CHARS}]{{8,40}}")
# A handshake carries a handful of parameters; more than this is an attack on the parser.
MAX_QUERY_FIELDS = 20


class FallbackSessionMiddleware:
    """
    When the cookie gave no logged-in user, replace scope["session"] with the session a
    ticket or a session key names, and set scope["auth"] to where the session came
    from: "cookie", "ticket", "session_key" or "none". Runs inside SessionMiddleware.
    """

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if "session" not in scope:
            raise ValueError(
                "FallbackSessionMiddleware needs to run inside of SessionMiddleware."
            )
        scope = dict(scope, auth="none")
        if await has_user(scope["session"]):
            scope["auth"] = "cookie"
        else:
            for source, find in [("ticket", session_from_ticket), ("session_key", session_from_key)]:
                session = await find(scope)
                if session is not None:
                    scope["session"], scope["auth"] = session, source
                    break
        return await self.inner(scope, receive, send)


class AuthMiddleware(channels_auth.AuthMiddleware):
    """
    Channels' AuthMiddleware, checking the session as Django's get_user does, old keys in
    SECRET_KEY_FALLBACKS included, and never writing to the session.
    """

    async def resolve_scope(self, scope):
        scope["user"]._wrapped = await database_sync_to_async(user_from_session)(scope["session"])


def SessionKeyAuthMiddlewareStack(inner):
    """Channels' AuthMiddlewareStack, with the ticket and session-key fallbacks inside it."""
    return CookieMiddleware(SessionMiddleware(FallbackSessionMiddleware(AuthMiddleware(inner))))


async def session_from_ticket(scope):
    """Return the logged-in session a ticket names, redeeming the ticket; else None."""
    ticket = credential(scope, "ticket")
    if ticket is None:
        return None
    if not tickets.TICKET_RE.fullmatch(ticket):
        return refuse("ticket", f"malformed ({len(ticket)} characters)")
    try:
        session_key = await tickets.redeem(ticket)
    except RedisError as exc:
        return refuse("ticket", f"Redis unreachable ({type(exc).__name__})")
    if session_key is None:
        return refuse("ticket", "unknown, expired or already used")
    return await logged_in_session("ticket", session_key)


async def session_from_key(scope):
    """Return the logged-in session the session-key credential names, or None."""
    name = settings.WS_SESSION_KEY_PARAM
    if not settings.WS_SESSION_KEY_FALLBACK:
        return None
    session_key = credential(scope, name)
    if session_key is None:
        return None
    if not SESSION_KEY_RE.fullmatch(session_key):
        return refuse(name, f"malformed ({len(session_key)} characters)")
    return await logged_in_session(name, session_key)


async def logged_in_session(name, session_key):
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    if not await has_user(session):
        return refuse(name, "unknown, expired or anonymous session")
    return session


def credential(scope, name):
    """
    Return credential `name` from the query string (name=value) or the subprotocols
    (name.value), or None. Given more than once, or both ways, it is refused.
    """
    prefix = name + "."
    values = query_values(scope, name) + [
        protocol[len(prefix):]
        for protocol in scope.get("subprotocols", [])
        if protocol.startswith(prefix)
    ]
    if len(values) > 1:
        return refuse(name, f"given {len(values)} times")
    return values[0] if values else None


def query_values(scope, name):
    """Return every value of `name` in the scope's query string ([] if unreadable)."""
    try:
        query = scope.get("query_string", b"").decode("ascii")
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        logger.info("query string ignored: %s", type(exc).__name__)
        return []
    return [value for key, value in pairs if key == name]


def refuse(name, reason):
    # The reason is logged; the value never is, not even in part.
    logger.info("%s refused: %s", name, reason)
    return None


@database_sync_to_async
def has_user(session):
    """Return True if the session exists, is unexpired and holds a logged-in user."""
    try:
        # Loading never creates or saves: an unknown key stays unknown.
        return SESSION_KEY in session
    except DatabaseError as exc:
        logger.warning("session store unreachable: %s", type(exc).__name__)
        return False


def authenticated_user(session, get_user):
    """
    Return the user the session data authenticates, or None: Django's get_user, except
    that a session verified by an old key is kept as it is (a socket cannot send the
    cycled key's cookie back) and a failed one is not flushed (the HTTP side does that).
    `get_user(backend, user_id)` fetches the user, so callers can fetch many at once.
    """
    try:
        user_id = get_user_model()._meta.pk.to_python(session[SESSION_KEY])
        backend_path = session[BACKEND_SESSION_KEY]
    except KeyError:
        return None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user = get_user(load_backend(backend_path), user_id)
    session_hash = session.get(HASH_SESSION_KEY)
    if user is None or not session_hash:
        return None
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    if any(constant_time_compare(session_hash, known) for known in hashes):
        return user
    return None


def user_from_session(session):
    """Return the session's user, or AnonymousUser."""
    user = authenticated_user(session, lambda backend, user_id: backend.get_user(user_id))
    return user or AnonymousUser()
