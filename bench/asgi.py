"""
The application Daphne serves during the handshake benchmark: the real one, plus the
two baselines it is compared with, on paths of their own and with the same consumer:

    /bench/none/whoami/      no authentication middleware at all (the ceiling)
    /bench/channels/whoami/  Channels' own AuthMiddlewareStack, cookie only

Run with ASGI_APP=bench.asgi:application (bench/handshake.py sets it).
"""

# First: asgi_site.asgi sets Django up, which the imports below need.
from asgi_site.asgi import application as real  # noqa: I001

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from django.contrib.auth.models import AnonymousUser
from django.urls import path

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


async def application(scope, receive, send):
    if scope["type"] == "websocket" and scope["path"].startswith("/bench/none/"):
        return await ceiling(scope, receive, send)
    if scope["type"] == "websocket" and scope["path"].startswith("/bench/channels/"):
        return await channels_stack(scope, receive, send)
    return await real(scope, receive, send)
