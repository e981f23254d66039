from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from .consumers import LiveConsumer, WhoAmIConsumer

ROUTES = {"ws/whoami/": WhoAmIConsumer, "ws/live/": LiveConsumer}
# The paths a ticket may be minted for.
SOCKET_PATHS = ["/" + route for route in ROUTES]

websocket_urlpatterns = [path(route, consumer.as_asgi()) for route, consumer in ROUTES.items()]
# Anything else is refused (403) rather than left to URLRouter's exception.
websocket_urlpatterns.append(re_path(r"", WebsocketDenier.as_asgi()))
