"""
The channel-layer contract between the two halves: wsgi_site sends to these groups,
asgi_site listens on them.
"""

import hashlib

# Every /ws/live/ socket; POST /announce/ sends {"type": "announcement", ...} here.
LIVE_GROUP = "live"
# The longest text an announcement or message may carry.
MAX_TEXT = 1000
# One listener per Daphne process (asgi_site.upkeep), not one membership per socket:
# {"type": "session.end", "session": session_hash(key)} or {..., "user": pk} closes
# the matching sockets of every process.
SESSION_EVENTS = "session-events"


def session_hash(session_key):
    # The key is a credential; what travels through Redis is its hash.
    return hashlib.sha256(session_key.encode()).hexdigest()
