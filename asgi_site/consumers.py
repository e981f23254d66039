import asyncio
import contextlib
import json
import logging
import time
import urllib.parse

from autobahn.exception import Disconnected
from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from channels.utils import await_many_dispatch
from django.conf import settings

from contract import history
from contract.groups import LIVE_GROUP, clean_text, live_message
from contract.layers import LAYER_ERRORS, UNAVAILABLE

from . import metrics
from .broadcast import Delivery
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


class ClientError(Exception):
    """Something the client sent that we answer with an error frame."""


def whoami(scope):
    """
    Return who the server thinks this socket is, how it knows, and what it was given to go
    on: the names of the cookies that arrived (never their values) and the Origin.
    """
    user = scope["user"]
    known = user.is_authenticated
    origins = [value for name, value in scope["headers"] if name == b"origin"]
    return {
        "type": "whoami",
        "user": user.get_username() if known else None,
        "authenticated": known,
        "auth": scope["auth"] if known else "none",
        "cookies": sorted(scope.get("cookies", {})),
        "origin": origins[0].decode("latin1") if origins else None,
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
    open_labels: tuple[str, str] | None = None  # its series in metrics.SOCKETS_OPEN, while open

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

        # Channels' AsyncConsumer.__call__, but with no channel of the socket's own: its
        # groups' events come from its process (asgi_site.broadcast) through `inbox`, and
        # the layer is used to send only.
        self.scope = scope
        self.channel_layer = get_channel_layer()
        self.base_send = guarded_send
        self.inbox: asyncio.Queue = asyncio.Queue()
        try:
            await await_many_dispatch([receive, self.inbox.get], self.dispatch)
        except StopConsumer:
            pass
        finally:
            # Every way out: websocket.disconnect, an exception, Daphne cancelling us.
            await self.forget()

    async def dispatch(self, message):
        # After close, frames still buffered and group messages are dropped, unread.
        if self.closed and message["type"] != "websocket.disconnect":
            return
        # Channels' own dispatch, less its aclose_old_connections() before every message: a
        # hop to the one database thread for each connect, frame and group event, which made
        # one announcement to 5,000 sockets 5,000 hops queued on that thread. Every query
        # here runs in database_sync_to_async, which closes old connections around itself.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

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
        # Within the user's cap of open sockets, counted across every process (by the ticket's
        # redemption, if it came with one: taken over even if the socket closes at once).
        counted = self.scope.get("counted")
        if counted is not None or (standing and user.is_authenticated):
            admitted = await upkeep().admit(self, user.pk, counted)
        else:
            admitted = True
        if admitted:
            await self.join(*self.joins)
            await self.joined()
        offered = SUBPROTOCOL in self.scope.get("subprotocols", [])
        await self.accept(SUBPROTOCOL if offered else None)
        # Not standing: the session ended while this handshake was under way.
        close_code = SESSION_ENDED if not standing else None if admitted else TOO_MANY_SOCKETS
        if close_code is not None:
            await self.close(close_code)
        self.open_labels = metrics.handshake(self.scope, close_code)

    async def joined(self):
        """Called once the socket is in its groups, before it is accepted: nothing to do here."""

    async def websocket_disconnect(self, message):
        metrics.closed(message.get("code"))
        await self.forget()
        await self.disconnect(message["code"])
        # No aclose_old_connections() here either (see dispatch).
        raise StopConsumer()

    async def forget(self):
        """Leave upkeep and every group; never raises, so every way out can call it."""
        self.closed = True
        labels, self.open_labels = self.open_labels, None
        metrics.gone(labels)
        keep = upkeep()
        keep.discard(self)
        for group in self.groups:
            keep.broadcast(group).discard(self)
        self.groups = []
        await keep.uncount(self)

    async def join(self, *groups) -> bool:
        """Join `groups`: their events reach this socket (hand) from now on; False if Redis was
        unreachable (the socket is a member all the same, and upkeep joins again)."""
        if self.closed:
            return True  # a socket closing while it joins leaves no member behind
        self.groups = list(dict.fromkeys([*self.groups, *groups]))
        joined = True
        for group in groups:
            joined = await upkeep().broadcast(group).add(self) and joined
        return joined

    async def hand(self, delivery: Delivery):
        """An event of one of our groups, from our process: dispatched in its turn."""
        self.inbox.put_nowait(delivery.event)

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
    replay_from: history.StreamId | None = None  # ?since=, if the socket asked for a replay
    # True while the process may send this socket a group event at once (hand): connected,
    # and no event waiting in its inbox. Else events wait their turn there.
    settled = False

    async def connect(self):
        # A token bucket, per connection: a consumer instance serves exactly one socket.
        self.tokens, self.refilled = settings.WS_MESSAGE_BURST, time.monotonic()
        self.replay_from, malformed = self.since()
        # Joins the group before replaying: group events sent meanwhile wait in the inbox
        # until connect returns, and are then skipped if the replay had them.
        await super().connect()
        if self.closed:
            return
        if malformed:
            await self.send_json({"type": "error", "error": malformed})
        elif self.replay_from is not None:
            await self.catch_up(self.replay_from)
        self.settled = self.inbox.empty()

    async def joined(self):
        # No replay, but a place in the history, taken in the group and before the accept:
        # two messages recorded at once may reach this socket in either order, and the later
        # must not hide the earlier; and none the client sends once accepted is behind it.
        if self.replay_from is None:
            with contextlib.suppress(*LAYER_ERRORS):
                self.last_id = await history.newest(LIVE_GROUP)

    async def hand(self, delivery: Delivery):
        """
        The process's fast path (asgi_site.broadcast): an event that follows what this socket
        has is sent at once, one already sent is dropped, and any other (a hole to fill, or
        the socket busy) waits its turn in the inbox, for live_event.
        """
        if not self.settled:
            await super().hand(delivery)
            return
        stream_id, last_id = delivery.id, self.last_id
        if stream_id is not None and last_id is not None:
            if stream_id <= last_id:
                return
            if delivery.prev != last_id:
                self.settled = False
                await super().hand(delivery)
                return
        if stream_id is not None:
            self.last_id = stream_id
        if delivery.text is None:
            delivery.text = json.dumps(live_frame(delivery.event))
        await self.send(text_data=delivery.text)

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
        stream_id = history.parse_id(event.get("id"))
        if stream_id is not None:
            self.last_id = stream_id
        await self.send_json(live_frame(event))

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
        self.settled = self.inbox.empty()

    async def announcement(self, event):
        await self.live_event(event)
        self.settled = self.inbox.empty()


def live_frame(event: dict) -> dict:
    """The frame a live socket is sent for a history event (its id, if it has one)."""
    frame = {"type": "message" if event["type"] == "live.message" else event["type"],
             "user": event["user"], "text": event["text"]}  # fmt: skip
    if history.parse_id(event.get("id")) is not None:
        frame["id"] = event["id"]
    return frame
