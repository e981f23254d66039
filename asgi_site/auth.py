"""
Authentication for sockets opened on a domain the session cookie never reaches.

Browsers send a cookie only to the host that set it, so a socket on REALTIME_HOST
arrives without one. The page then puts its session key in the socket URL
(``?session_key=...``) and SessionKeyMiddleware loads that session instead: the job of
Channels 1.x's ``http_session`` decorator, as middleware.
"""

import logging
import re
from importlib import import_module
from urllib.parse import parse_qsl

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.contrib.sessions.backends.base import VALID_KEY_CHARS
from django.db import DatabaseError

logger = logging.getLogger(__name__)

# What Django's session stores make and accept: their alphabet, at least the 8
# characters SessionBase._validate_session_key asks for, at most the 40 the
# database column holds. Anything else is refused before a query is made.
SESSION_KEY_RE = re.compile(f"[{VALID_KEY_CHARS}]{{8,40}}")
# A handshake carries a handful of parameters; more than this is an attack on the parser.
MAX_QUERY_FIELDS = 20


class SessionKeyMiddleware:
    """
    Replace scope["session"] with the session named by the session-key query parameter
    when the cookie gave no logged-in user, and set scope["auth"] to where the session
    came from: "cookie", "session_key" or "none". Runs inside SessionMiddleware.
    """

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if "session" not in scope:
            raise ValueError(
                "SessionKeyMiddleware needs to run inside of SessionMiddleware."
            )
        scope = dict(scope, auth="none")
        if await has_user(scope["session"]):
            scope["auth"] = "cookie"
        elif settings.WS_SESSION_KEY_FALLBACK:
            session = await session_from_query(scope)
            if session is not None:
                scope["session"], scope["auth"] = session, "session_key"
        return await self.inner(scope, receive, send)


async def session_from_query(scope):
    """Return the logged-in session the query string names, or None."""
    name = settings.WS_SESSION_KEY_PARAM
    values = query_values(scope, name)
    if not values:
        return None
    if len(values) > 1:
        return refuse(name, f"given {len(values)} times")
    if not SESSION_KEY_RE.fullmatch(values[0]):
        return refuse(name, f"malformed ({len(values[0])} characters)")
    session = import_module(settings.SESSION_ENGINE).SessionStore(values[0])
    if not await has_user(session):
        return refuse(name, "unknown, expired or anonymous session")
    return session


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


def SessionKeyAuthMiddlewareStack(inner):
    """Channels' AuthMiddlewareStack, with the session-key fallback between its layers."""
    return CookieMiddleware(SessionMiddleware(SessionKeyMiddleware(AuthMiddleware(inner))))
