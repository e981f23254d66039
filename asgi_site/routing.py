from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from contract import paths

from . import metrics
from .consumers import LiveConsumer, WhoAmIConsumer


class UnknownPathDenier(WebsocketDenier):
    """Channels' WebsocketDenier (403, no upgrade), counted in the handshake metrics."""

    async def connect(self):
        metrics.refused("path")
        await super().connect()


websocket_urlpatterns = [
    path(paths.WHOAMI.lstrip("/"), WhoAmIConsumer.as_asgi()),
    path(paths.LIVE.lstrip("/"), LiveConsumer.as_asgi()),
    # Anything else is refused (403) rather than left to URLRouter's exception.
    re_path(r"", UnknownPathDenier.as_asgi()),
]
