"""
The channel-layer contract between the two halves: wsgi_site sends to these groups,
asgi_site's consumers listen on them.
"""

import hashlib

# Every /ws/live/ socket; POST /announce/ sends {"type": "announcement", ...} here.
LIVE_GROUP = "live"
# The longest text an announcement or message may carry.
MAX_TEXT = 1000


def session_group(session_key):
    """Every socket opened with this session; logout sends {"type": "session.end"} here."""
    # Hashed: the key is a credential, and group names end up in Redis.
    return "session." + hashlib.sha256(session_key.encode()).hexdigest()


def user_group(user_pk):
    """Every logged-in socket of this user; "log out everywhere" sends here."""
    return f"user.{user_pk}"
