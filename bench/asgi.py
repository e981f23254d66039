"""
The application Daphne serves during the handshake benchmark: the real one, plus the
two baselines it is compared with, on paths of their own and with the same consumer:

    /bench/none/whoami/      no authentication middleware at all (the ceiling)
    /bench/channels/whoami/  Channels' own AuthMiddlewareStack, cookie only

and the fan-out floor (bench/fanout.py): bare ASGI sockets on /bench/floor/, no Django, no
Channels, no channel layer, and POST /bench/floor/send/ to one Daphne process's own port,
which writes one frame (the request body) from memory to each of that process's floor
sockets and answers how long the loop took.

Run with ASGI_APP=bench.asgi:application (bench/handshake.py and bench/fanout.py set it).
"""

# First: asgi_site.asgi sets Django up, which the imports below need.
from asgi_site.asgi import application as real  # noqa: I001

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from django.contrib.auth.models import AnonymousUser
from django.urls import path

import json
import time

from asgi_site.consumers import WhoAmIConsumer
from asgi_site.origins import TopologyOriginValidator


class Given:
    """Put fixed entries in the scope (what the skipped middleware would have put there)."""

    def __init__(self, inner, **entries):
        self.inner, self.entries = inner, entries

    async def __call__(self, scope, receive, send):
        return await self.inner(dict(scope, **self.entries), receive, send)


def whoami_at(prefix):
    return URLRouter([path(f"bench/{prefix}/whoami/", WhoAmIConsumer.as_asgi())])


ceiling = TopologyOriginValidator(Given(whoami_at("none"), user=AnonymousUser(), auth="none"))
channels_stack = TopologyOriginValidator(
    AuthMiddlewareStack(Given(whoami_at("channels"), auth="cookie"))
)


# The send() of every floor socket of this process.
floor_sockets: set = set()


async def floor_socket(scope, receive, send):
    """Accept, and wait for the close: the frames come from floor_send."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    floor_sockets.add(send)
    try:
        while (await receive())["type"] != "websocket.disconnect":
            pass
    finally:
        floor_sockets.discard(send)


async def floor_send(scope, receive, send):
    """Write the request body as one text frame to every floor socket here; answer the time."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text, began = body.decode(), time.perf_counter()
    sends = list(floor_sockets)
    for socket_send in sends:
        await socket_send({"type": "websocket.send", "text": text})
    took = time.perf_counter() - began
    answer = json.dumps({"sockets": len(sends), "loop_ms": round(took * 1000, 2)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": answer})


async def application(scope, receive, send):
    if scope.get("path", "").startswith("/bench/floor/"):
        floor = floor_socket if scope["type"] == "websocket" else floor_send
        return await floor(scope, receive, send)
    if scope["type"] == "websocket" and scope["path"].startswith("/bench/none/"):
        return await ceiling(scope, receive, send)
    if scope["type"] == "websocket" and scope["path"].startswith("/bench/channels/"):
        return await channels_stack(scope, receive, send)
    return await real(scope, receive, send)
