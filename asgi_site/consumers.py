import json
import logging
import time

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from contract.groups import LIVE_GROUP, clean_text, live_message
from contract.layers import LAYER_ERRORS, UNAVAILABLE

from .upkeep import upkeep

logger = logging.getLogger(__name__)

# Close code for a socket whose session ended: logout, or a failed re-check.
SESSION_ENDED = 4401
# Close code for a socket that sent more than WS_MESSAGE_RATE messages a second.
TOO_MANY_MESSAGES = 4429
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
    when the session behind a logged-in socket ends: at once on logout, or at the
    process's next re-check (both in asgi_site.upkeep).
    """

    async def connect(self):
        user = self.scope["user"]
        if user.is_authenticated:
            upkeep().add(self, self.scope["session"].session_key, user.pk)
        else:
            upkeep().add(self)
        offered = SUBPROTOCOL in self.scope.get("subprotocols", [])
        await self.accept(SUBPROTOCOL if offered else None)

    async def join(self, *groups):
        self.groups = list(dict.fromkeys([*self.groups, *groups]))
        try:
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)
        except LAYER_ERRORS as exc:
            # The socket still works; upkeep joins again once Redis is back.
            logger.warning("channel layer unreachable, groups not joined: %r", exc)

    async def disconnect(self, code):
        upkeep().discard(self)

    async def end_session(self):
        await self.close(SESSION_ENDED)


class WhoAmIConsumer(RealtimeConsumer):
    """Send one whoami frame, then stay open until the client closes or the session ends."""

    async def connect(self):
        await super().connect()
        await self.send_json(whoami(self.scope))


class LiveConsumer(RealtimeConsumer):
    """
    A live feed: announcements from HTTP and messages from logged-in sockets. A socket
    that sends faster than WS_MESSAGE_RATE (burst WS_MESSAGE_BURST) is closed with 4429.
    """

    async def connect(self):
        # A token bucket, per connection: a consumer instance serves exactly one socket.
        self.tokens, self.refilled = settings.WS_MESSAGE_BURST, time.monotonic()
        await self.join(LIVE_GROUP)
        await super().connect()

    async def receive(self, text_data=None, bytes_data=None):
        if not self.take_token():
            await self.close(TOO_MANY_MESSAGES)
            return
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

    def take_token(self):
        now = time.monotonic()
        self.tokens = min(
            settings.WS_MESSAGE_BURST,
            self.tokens + (now - self.refilled) * settings.WS_MESSAGE_RATE,
        )
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def post(self, content):
        user = self.scope["user"]
        if not user.is_authenticated:
            raise ClientError("login required")
        try:
            text = clean_text(content.get("text") if isinstance(content, dict) else None)
        except ValueError as exc:
            raise ClientError(str(exc)) from None
        try:
            await self.channel_layer.group_send(LIVE_GROUP, live_message(user.get_username(), text))
        except LAYER_ERRORS:
            raise ClientError(UNAVAILABLE) from None

    async def live_message(self, event):
        await self.send_json({"type": "message", "user": event["user"], "text": event["text"]})

    async def announcement(self, event):
        await self.send_json({"type": "announcement", "user": event["user"], "text": event["text"]})
