"""
Pages while the database does not answer: 503 with a clear message, never a traceback.
"""

import logging
import math
import time

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse

logger = logging.getLogger(__name__)

MESSAGE = "database unavailable, try again"
# Seconds a client should wait before it tries again: the outage test's recovery bound.
RETRY_AFTER = 5
LOG_EVERY_SECONDS = 10


class DatabaseUnavailableMiddleware:
    """
    Answer 503 when a view finds the database unreachable (OperationalError, InterfaceError):
    JSON for JSON clients, plain text for pages, with Retry-After. Logged without a
    traceback, at most once every LOG_EVERY_SECONDS per process with the count of the others,
    so an outage does not flood the log. Django reconnects at a later request by itself
    (CONN_HEALTH_CHECKS, or the pool's check): no restart needed.
    """

    # Per process, not per request: when the last line was logged, and 503s since.
    logged_at = -math.inf
    unlogged = 0

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        cls = type(self)
        now = time.monotonic()
        if now - cls.logged_at >= LOG_EVERY_SECONDS:
            logger.warning(
                "database unreachable (%s): answering 503 (%d more since the last line)",
                type(exception).__name__,
                cls.unlogged,
            )
            cls.logged_at, cls.unlogged = now, 0
        else:
            cls.unlogged += 1
        return unavailable(request)


def unavailable(request) -> HttpResponse:
    """The 503: JSON when the client sent or asked for JSON, else plain text."""
    wants_json = request.content_type == "application/json" or "json" in request.headers.get(
        "Accept", ""
    )
    if wants_json:
        response: HttpResponse = JsonResponse({"error": MESSAGE}, status=503)
    else:
        text = "Service unavailable: the database is not answering. Try again in a few seconds.\n"
        response = HttpResponse(text, status=503, content_type="text/plain; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER)
    # Logged above: Django's own line for every 503 would flood the log during an outage.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response
