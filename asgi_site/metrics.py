"""
The socket half's Prometheus metrics, one set per Daphne process.

With PROMETHEUS_MULTIPROC_DIR set (both runtimes set it), prometheus_client keeps every
value in a file of that directory, named for the process, and the exporter
(`python -m deploy.metrics`) sums them over every process of the host or container: an
increment is a write to a memory-mapped file, never a network round trip. Without it (the
in-process tests), values live in memory.

Every handshake that reaches Daphne's application is counted once in HANDSHAKES, with one
outcome, auth and reason; the ones nginx refuses (429, 400, 414) never reach Daphne and
are in nginx's access log instead.
"""

import time
from typing import Any

from django.dispatch import receiver
from django.http.request import split_domain_port
from prometheus_client import Counter, Gauge, Histogram

from contract.layers import outage_changed

SOCKETS_OPEN = Gauge(
    "split_sockets_open",
    "Sockets open now, by host and by how they were authenticated.",
    ["host", "auth"],
    # Summed over the processes alive: a dead process's sockets are gone with it.
    multiprocess_mode="livesum",
)
CHANNEL_LAYER_OUTAGE = Gauge(
    "split_channel_layer_outage",
    "1 while a Daphne process finds Redis, its channel layer, unreachable; else 0.",
    multiprocess_mode="livemax",
)
HANDSHAKES = Counter(
    "split_handshakes",
    "Socket handshakes, each counted once: outcome accepted, refused (403, no upgrade) or "
    "closed (accepted, then closed at once); reason why refused, closed or left anonymous.",
    ["outcome", "auth", "reason"],
)
CLOSES = Counter(
    "split_socket_closes",
    "Sockets closed, by the close code of the closing handshake (1006: none, dropped).",
    ["code"],
)
TICKETS_REDEEMED = Counter(
    "split_tickets_redeemed", "Tickets redeemed in a handshake (each works once)."
)
SESSION_LOOKUPS = Counter(
    "split_session_lookups",
    "Sessions a handshake looked up (a cookie's or session key's): read from the database, "
    "or trusted as this process read them lately (WS_SESSION_TRUST_SECONDS).",
    ["source"],
)
HANDSHAKE_SECONDS = Histogram(
    "split_handshake_seconds",
    "From reading a handshake's credentials to accepting it (or closing it at once).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FANOUT_SECONDS = Histogram(
    "split_fanout_seconds",
    "Per process: from an announcement or message being recorded to its last socket here "
    "being handed it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECHECK_SECONDS = Histogram(
    "split_session_recheck_seconds",
    "One periodic re-check of every session this process's logged-in sockets stand on.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Close codes worth a series of their own; any other a client sends is "other", so a client
# cannot make a series per code.
KNOWN_CLOSE_CODES = {1000, 1001, 1005, 1006, 1009, 1011, 1012, 4401, 4409, 4429}
# Why a socket was closed as it opened, by close code (asgi_site.consumers).
CLOSE_REASONS = {4401: "session_ended", 4409: "too_many_sockets"}


def refused(reason: str) -> None:
    """Count a handshake refused with 403 before any upgrade ("origin", "host", "path")."""
    HANDSHAKES.labels("refused", "none", reason).inc()


def handshake(scope: dict, close_code: int | None) -> tuple[str, str] | None:
    """
    Count a handshake the consumer accepted, closed at once with `close_code` or not, and
    time it. Return the labels it holds in SOCKETS_OPEN while open (None if closed).
    """
    auth = scope.get("auth", "none") if scope["user"].is_authenticated else "none"
    if close_code is None:
        outcome, reason = "accepted", scope.get("refusal") or "none"
    else:
        outcome, reason = "closed", CLOSE_REASONS.get(close_code, str(close_code))
    HANDSHAKES.labels(outcome, auth, reason).inc()
    if "authenticated_at" in scope:
        HANDSHAKE_SECONDS.observe(time.monotonic() - scope["authenticated_at"])
    if close_code is not None:
        return None
    labels = (host(scope), auth)
    SOCKETS_OPEN.labels(*labels).inc()
    return labels


def host(scope: dict) -> str:
    # Only hosts in ALLOWED_HOSTS get this far (AllowedHostsValidator): a few series at most.
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    return split_domain_port(hosts[0].decode("latin1"))[0] if hosts else "none"


def closed(code: int | None) -> None:
    """Count a socket's close by the code of its closing handshake (Daphne reports it)."""
    CLOSES.labels(str(code) if code in KNOWN_CLOSE_CODES else "other").inc()


def gone(labels: tuple[str, str] | None) -> None:
    """Take a socket out of SOCKETS_OPEN, once, if handshake() put it in."""
    if labels is not None:
        SOCKETS_OPEN.labels(*labels).dec()


@receiver(outage_changed)
def track_outage(sender: Any, outage: bool, **kwargs: Any) -> None:
    CHANNEL_LAYER_OUTAGE.set(1 if outage else 0)
