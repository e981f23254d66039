from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from contract import paths

from .consumers import LiveConsumer, WhoAmIConsumer

websocket_urlpatterns = [
    path(paths.WHOAMI.lstrip("/"), WhoAmIConsumer.as_asgi()),
    path(paths.LIVE.lstrip("/"), LiveConsumer.as_asgi()),
    # Anything else is refused (403) rather than left to URLRouter's exception.
    re_path(r"", WebsocketDenier.as_asgi()),
]
