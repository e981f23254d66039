import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "asgi_site.settings")
# Set Django up before importing anything that reaches for models (auth, consumers).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from .auth import SessionAuthMiddlewareStack  # noqa: E402
from .origins import AllowedHostsValidator, TopologyOriginValidator  # noqa: E402
from .routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsValidator(
            TopologyOriginValidator(SessionAuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
        ),
    }
)
