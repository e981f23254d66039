import asyncio
import contextlib
import json
import logging
import time
import urllib.parse

from autobahn.exception import Disconnected
from channels.db import aclose_old_connections
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from contract import history
from contract.groups import LIVE_GROUP, clean_text, live_message
from contract.layers import LAYER_ERRORS, UNAVAILABLE

from .upkeep import upkeep

logger = logging.getLogger(__name__)

# Close code for a socket whose session ended: logout, or a failed re-check.
SESSION_ENDED = 4401
# Close code for a socket that sent more than WS_MESSAGE_RATE messages a second.
TOO_MANY_MESSAGES = 4429
# Close code for a socket whose user already holds WS_MAX_SOCKETS_PER_USER open sockets.
TOO_MANY_SOCKETS = 4409
# The subprotocol we answer with; credentials offered beside it are never echoed.
SUBPROTOCOL = "realtime"
# Seconds a closing socket waits to leave a group before giving up (Redis may be down).
LEAVE_TIMEOUT = 2


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
    Accept with the "realtime" subprotocol when offered, join `joins`, and close with
    SESSION_ENDED when the session behind a logged-in socket ends: at once on logout, or at
    the process's next re-check (both in asgi_site.upkeep). However the socket ends, it
    leaves upkeep and its groups.
    """

    joins: tuple[str, ...] = ()
    closed = False  # True once we closed it, or found it gone under us

    async def __call__(self, scope, receive, send):
        async def guarded_send(message):
            # Between our close and Daphne seeing the connection go, a group message would
            # still be sent, and autobahn raises on it ("Attempt to send on a closed
            # protocol"). A consumer that raises never reads websocket.disconnect, so it
            # would stay in its groups and in upkeep for good.
            if message["type"] in ("websocket.send", "websocket.close"):
                if self.closed:
                    return
                self.closed = message["type"] == "websocket.close"
            try:
                await send(message)
            except Disconnected:
                self.closed = True

        try:
            await super().__call__(scope, receive, guarded_send)
        finally:
            # Every way out: websocket.disconnect, an exception, Daphne cancelling us.
            await self.forget()

    async def dispatch(self, message):
        # After close, frames still buffered and group messages are dropped, unread.
        if self.closed and message["type"] != "websocket.disconnect":
            return
        await super().dispatch(message)

    async def connect(self):
        user = self.scope["user"]
        if user.is_authenticated:
            # Registered before any await, so a logout from here on reaches this socket.
            authenticated_at = self.scope.get("authenticated_at", time.monotonic())
            standing = upkeep().add(self, self.scope["session"].session_key, user.pk,
                                    authenticated_at)  # fmt: skip
        else:
            standing = upkeep().add(self)
        await upkeep().ready()
        # Within the user's cap of open sockets, counted across every process.
        admitted = not (standing and user.is_authenticated) or await upkeep().admit(self, user.pk)
        if admitted:
            await self.join(*self.joins)
        offered = SUBPROTOCOL in self.scope.get("subprotocols", [])
        await self.accept(SUBPROTOCOL if offered else None)
        if not standing:
            # The session ended while this handshake was under way.
            await self.close(SESSION_ENDED)
        elif not admitted:
            await self.close(TOO_MANY_SOCKETS)

    async def websocket_disconnect(self, message):
        await self.forget()
        await self.disconnect(message["code"])
        await aclose_old_connections()
        raise StopConsumer()

    async def forget(self):
        """Leave upkeep and every group; never raises, so every way out can call it."""
        self.closed = True
        upkeep().discard(self)
        await upkeep().uncount(self)
        groups, self.groups = self.groups, []
        try:
            for group in groups:
                discard = self.channel_layer.group_discard(group, self.channel_name)
                await asyncio.wait_for(discard, LEAVE_TIMEOUT)
        except (*LAYER_ERRORS, TimeoutError) as exc:
            # channels-redis expires the membership; every send to it until then is wasted.
            logger.warning("channel layer unreachable, groups not left: %r", exc)

    async def join(self, *groups) -> bool:
        """Join `groups` (again); False if Redis was unreachable."""
        if self.closed:
            return True  # upkeep's re-join may race a socket that is closing
        self.groups = list(dict.fromkeys([*self.groups, *groups]))
        try:
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)
        except LAYER_ERRORS as exc:
            # The socket still works; upkeep joins again once Redis is back.
            logger.warning("channel layer unreachable, groups not joined: %r", exc)
            return False
        return True

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

    Every announcement and message carries the "id" of its entry in the group's history
    (contract.history). A socket opened with ?since=<id> is first sent what was recorded
    after that id (a {"type": "gap"} frame first if some of it is no longer kept), then the
    live messages: each exactly once, in id order. Without since, only live messages.
    """

    joins = (LIVE_GROUP,)
    # The newest history id sent on this socket: a live event at or before it was sent
    # already (in the replay, or filling a hole), and one whose "prev" is not it follows
    # events this socket has not seen yet (sent concurrently, still in flight): read them.
    last_id: history.StreamId | None = None

    async def connect(self):
        # A token bucket, per connection: a consumer instance serves exactly one socket.
        self.tokens, self.refilled = settings.WS_MESSAGE_BURST, time.monotonic()
        since, malformed = self.since()
        # Joins the group before replaying: group messages sent meanwhile wait in this
        # channel until connect returns, and are then skipped if the replay had them.
        await super().connect()
        if self.closed:
            return
        if malformed:
            await self.send_json({"type": "error", "error": malformed})
        elif since is not None:
            await self.catch_up(since)
        else:
            # No replay, but a place in the history: two messages recorded at once may reach
            # this socket in either order, and the later one must not hide the earlier.
            with contextlib.suppress(*LAYER_ERRORS):
                self.last_id = await history.newest(LIVE_GROUP)

    def since(self) -> tuple[history.StreamId | None, str | None]:
        """The ?since= id, or None; and the error to send if it is malformed."""
        query = urllib.parse.parse_qs(self.scope.get("query_string", b"").decode("latin-1"),
                                      keep_blank_values=True)  # fmt: skip
        values = query.get("since", [])
        if not values:
            return None, None
        since = history.parse_id(values[0]) if len(values) == 1 else None
        if since is None:
            return None, "since must be one message id (digits-digits): sending live messages only"
        return since, None

    async def catch_up(self, after: history.StreamId, upto: history.StreamId | None = None):
        """Send what history holds after `after` (up to `upto`), a gap frame first if lost."""
        try:
            gap, events = await history.replay(LIVE_GROUP, after, upto)
        except LAYER_ERRORS as exc:
            logger.warning("history unreachable, nothing replayed: %r", exc)
            if upto is None:  # on connect: say so; a live event goes on all the same
                await self.send_json({"type": "error", "error": UNAVAILABLE})
                await self.send_json({"type": "gap"})
            return
        if gap:
            await self.send_json({"type": "gap"})
        elif upto is None:
            self.last_id = after  # nothing lost: live messages go on from the client's id
        for event in events:
            await self.send_event(event)

    async def send_event(self, event):
        frame = {"type": "message" if event["type"] == "live.message" else event["type"],
                 "user": event["user"], "text": event["text"]}  # fmt: skip
        stream_id = history.parse_id(event.get("id"))
        if stream_id is not None:
            frame["id"] = event["id"]
            self.last_id = stream_id
        await self.send_json(frame)

    async def live_event(self, event):
        """A group event: send it unless sent already, after any it follows and we lack."""
        stream_id = history.parse_id(event.get("id"))
        if stream_id is not None and self.last_id is not None:
            if stream_id <= self.last_id:
                return  # in the replay, or read with a hole
            prev = history.parse_id(event.get("prev")) or history.BEGINNING
            if prev != self.last_id:
                await self.catch_up(self.last_id, stream_id)
                if self.last_id is not None and stream_id <= self.last_id:
                    return
        await self.send_event(event)

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
        # Recorded first (the event carries its id), then sent; a recorded entry whose send
        # failed is taken back, as over HTTP.
        try:
            event = await history.arecord(LIVE_GROUP, live_message(user.get_username(), text))
        except LAYER_ERRORS:
            raise ClientError(UNAVAILABLE) from None
        try:
            await self.channel_layer.group_send(LIVE_GROUP, event)
        except LAYER_ERRORS:
            await history.adiscard(LIVE_GROUP, event["id"])
            raise ClientError(UNAVAILABLE) from None

    async def live_message(self, event):
        await self.live_event(event)

    async def announcement(self, event):
        await self.live_event(event)
