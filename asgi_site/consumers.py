import asyncio
import json
import logging

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError
from redis.exceptions import RedisError

from .auth import still_logged_in
from .groups import LIVE_GROUP, MAX_TEXT, session_group, user_group

logger = logging.getLogger(__name__)

# Close code for a socket whose session ended: logout, or a failed re-check.
SESSION_ENDED = 4401
# The subprotocol we answer with; credentials offered beside it are never echoed.
SUBPROTOCOL = "realtime"


class ClientError(Exception):
    """Something the client sent that we answer with an error frame."""


def whoami(scope):
    """Return who the server thinks this socket is, and how it knows."""
    user = scope["user"]
    known = user.is_authenticated
    return {
        "type": "whoami",
        "user": user.get_username() if known else None,
        "authenticated": known,
        "auth": scope["auth"] if known else "none",
    }


class RealtimeConsumer(AsyncJsonWebsocketConsumer):
    """
    Accept with the "realtime" subprotocol when offered, and close with SESSION_ENDED
    when the session behind a logged-in socket ends: at once on logout (pushed through
    the channel layer), or at the next re-check, every WS_SESSION_RECHECK_SECONDS.
    """

    async def connect(self):
        user = self.scope["user"]
        if user.is_authenticated:
            session_key = self.scope["session"].session_key
            await self.join(session_group(session_key), user_group(user.pk))
            self.recheck = asyncio.create_task(self.recheck_session(session_key, user.pk))
        offered = SUBPROTOCOL in self.scope.get("subprotocols", [])
        await self.accept(SUBPROTOCOL if offered else None)

    async def join(self, *groups):
        self.groups = [*self.groups, *groups]
        try:
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)
        except (OSError, RedisError) as exc:
            # The socket still works; logout reaches it at the next re-check instead.
            logger.warning("channel layer unreachable, groups not joined: %r", exc)

    async def disconnect(self, code):
        if hasattr(self, "recheck"):
            self.recheck.cancel()

    async def recheck_session(self, session_key, user_pk):
        while True:
            await asyncio.sleep(settings.WS_SESSION_RECHECK_SECONDS)
            try:
                valid = await still_logged_in(session_key, user_pk)
            except DatabaseError as exc:
                # Keep the socket: a database blip is not a logout.
                logger.warning("session re-check failed: %s", type(exc).__name__)
                continue
            if not valid:
                await self.close(SESSION_ENDED)
                return

    async def session_end(self, event):
        await self.close(SESSION_ENDED)


class WhoAmIConsumer(RealtimeConsumer):
    """Send one whoami frame, then stay open until the client closes or the session ends."""

    async def connect(self):
        await super().connect()
        await self.send_json(whoami(self.scope))


class LiveConsumer(RealtimeConsumer):
    """A live feed: announcements from HTTP and messages from logged-in sockets."""

    async def connect(self):
        await self.join(LIVE_GROUP)
        await super().connect()

    async def receive(self, text_data=None, bytes_data=None):
        try:
            if text_data is None:
                raise ClientError("text frames only")
            try:
                content = json.loads(text_data)
            except ValueError:
                raise ClientError("invalid JSON") from None
            await self.post(content)
        except ClientError as exc:
            await self.send_json({"type": "error", "error": str(exc)})

    async def post(self, content):
        user = self.scope["user"]
        if not user.is_authenticated:
            raise ClientError("login required")
        text = content.get("text") if isinstance(content, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ClientError('send {"text": "..."}')
        if len(text) > MAX_TEXT:
            raise ClientError(f"text longer than {MAX_TEXT} characters")
        await self.channel_layer.group_send(
            LIVE_GROUP,
            {"type": "live.message", "user": user.get_username(), "text": text},
        )

    async def live_message(self, event):
        await self.send_json({"type": "message", "user": event["user"], "text": event["text"]})

    async def announcement(self, event):
        await self.send_json(
            {"type": "announcement", "user": event["user"], "text": event["text"]}
        )
