import logging

from channels.security.websocket import OriginValidator
from django.conf import settings

logger = logging.getLogger(__name__)


class TopologyOriginValidator(OriginValidator):
    """
    Refuse a handshake (HTTP 403, no upgrade) unless its Origin is one of the
    topology's origins: scheme, host and port must all match. A handshake with no
    Origin is refused unless WS_ALLOW_MISSING_ORIGIN is set.
    """

    def __init__(self, application):
        super().__init__(application, settings.WS_ALLOWED_ORIGINS)

    def valid_origin(self, parsed_origin):
        if parsed_origin is None:
            allowed = settings.WS_ALLOW_MISSING_ORIGIN
        elif not is_serialized_origin(parsed_origin):
            allowed = False
        else:
            try:
                allowed = self.validate_origin(parsed_origin)
            except ValueError:
                # urlparse raises on a port that is not a number: not an origin.
                allowed = False
        if not allowed:
            origin = parsed_origin.geturl() if parsed_origin else None
            logger.info("origin refused: %r", origin)
        return allowed


def is_serialized_origin(parsed):
    """True for scheme://host[:port] and nothing more, the only form a browser sends."""
    return (
        parsed.username is None
        and parsed.password is None
        and not (parsed.path or parsed.params or parsed.query or parsed.fragment)
    )
