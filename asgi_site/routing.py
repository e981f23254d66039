from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from .consumers import LiveConsumer, WhoAmIConsumer

websocket_urlpatterns = [
    path("ws/whoami/", WhoAmIConsumer.as_asgi()),
    path("ws/live/", LiveConsumer.as_asgi()),
    # Anything else is refused (403) rather than left to URLRouter's exception.
    re_path(r"", WebsocketDenier.as_asgi()),
]
