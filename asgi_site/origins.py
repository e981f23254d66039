import logging

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

from . import metrics

logger = logging.getLogger(__name__)


class TopologyOriginValidator:
    """
    Refuse a handshake (HTTP 403, no upgrade) unless its Origin is exactly one of
    WS_ALLOWED_ORIGINS, as a browser serializes an origin: scheme://host[:port] and nothing
    more, not even an empty query or fragment. With no Origin it is refused unless
    WS_ALLOW_MISSING_ORIGIN is set.
    """

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        origins = [value for name, value in scope["headers"] if name == b"origin"]
        if origins:
            # An exact match: parsing first would forgive "...:8000#" and "...:8000?".
            origin = origins[0].decode("latin1")
            allowed = len(origins) == 1 and origin in settings.WS_ALLOWED_ORIGINS
        else:
            origin, allowed = None, settings.WS_ALLOW_MISSING_ORIGIN
        if not allowed:
            logger.info("origin refused: %r", origin)
            metrics.refused("origin")
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)


class AllowedHostsValidator:
    """
    Refuse a handshake (HTTP 403) whose Host is not in ALLOWED_HOSTS, as Django refuses an
    HTTP request: Daphne then answers only for its own socket host.
    """

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        hosts = [value for name, value in scope["headers"] if name == b"host"]
        domain, _ = split_domain_port(hosts[0].decode("latin1")) if len(hosts) == 1 else ("", "")
        if not (domain and validate_host(domain, settings.ALLOWED_HOSTS)):
            logger.info("host refused: %r", hosts[0][:100] if hosts else None)
            metrics.refused("host")
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
