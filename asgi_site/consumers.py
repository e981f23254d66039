import json

from channels.generic.websocket import AsyncJsonWebsocketConsumer

# The group every /ws/live/ socket joins; wsgi_site's /announce/ sends to it.
LIVE_GROUP = "live"
MAX_TEXT = 1000


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


class WhoAmIConsumer(AsyncJsonWebsocketConsumer):
    """Send one whoami frame, then stay open until the client closes."""

    async def connect(self):
        await self.accept()
        await self.send_json(whoami(self.scope))


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """A live feed: announcements from HTTP and messages from logged-in sockets."""

    async def connect(self):
        await self.channel_layer.group_add(LIVE_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        await self.channel_layer.group_discard(LIVE_GROUP, self.channel_name)

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
