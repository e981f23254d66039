"""
The channel-layer groups, and the events the halves send to them: wsgi_site sends,
asgi_site listens. Each event is built here, so both sides agree on its shape.
"""

import hashlib

# Every /ws/live/ socket: announcements from HTTP and messages from sockets.
LIVE_GROUP = "live"
# One listener per Daphne process (asgi_site.upkeep), not one membership per socket:
# a session.end event closes the matching sockets of every process.
SESSION_EVENTS = "session-events"
# The longest text an announcement or message may carry.
MAX_TEXT = 1000


def clean_text(value: object) -> str:
    """Return `value` if it is text an announcement or message may carry; else raise ValueError."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError('send {"text": "..."}')
    if len(value) > MAX_TEXT:
        raise ValueError(f"text longer than {MAX_TEXT} characters")
    return value


def announcement(user: str, text: str) -> dict:
    """An announcement made over HTTP (POST /announce/), for LIVE_GROUP."""
    return {"type": "announcement", "user": user, "text": text}


def live_message(user: str, text: str) -> dict:
    """A message a logged-in socket sent, for LIVE_GROUP."""
    return {"type": "live.message", "user": user, "text": text}


def session_end(*, session_key: str | None = None, user: int | None = None) -> dict:
    """A session.end event for SESSION_EVENTS: one session's sockets, or one user's."""
    if (session_key is None) == (user is None):
        raise TypeError("session_end() takes a session_key or a user, not both or neither.")
    if session_key is not None:
        return {"type": "session.end", "session": session_hash(session_key)}
    return {"type": "session.end", "user": user}


def session_hash(session_key: str) -> str:
    """What travels through Redis in place of a session key, which is a credential."""
    return hashlib.sha256(session_key.encode()).hexdigest()
