"""Open sockets in process, as a browser would, through the whole ASGI application."""

from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from asgi_site.asgi import application

APP_ORIGIN = b"http://app.localhost:8000"


def communicator(
    query="",
    cookie=None,
    origin=APP_ORIGIN,
    path="/ws/whoami/",
    subprotocols=(),
    host=b"realtime.localhost:8000",
):
    headers = [(b"host", host)]
    if origin is not None:
        headers.append((b"origin", origin))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    url = f"{path}?{query}" if query else path
    return WebsocketCommunicator(application, url, headers=headers, subprotocols=list(subprotocols))


def handshake(**kwargs):
    """Open /ws/whoami/; return (accepted subprotocol, whoami frame), or None if refused."""

    async def run():
        socket = communicator(**kwargs)
        connected, subprotocol = await socket.connect()
        if not connected:
            return None
        frame = await socket.receive_json_from()
        await socket.disconnect()
        return subprotocol, frame

    return async_to_sync(run)()


def whoami(**kwargs):
    """Open /ws/whoami/ and return its frame, or None if the handshake was refused."""
    answer = handshake(**kwargs)
    return answer and answer[1]
