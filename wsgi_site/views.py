import json
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, logout
from django.contrib.sessions.models import Session
from django.http import HttpRequest, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from contract import history, paths, tickets
from contract.groups import LIVE_GROUP, announcement, clean_text, session_end
from contract.layers import LAYER_ERRORS, UNAVAILABLE

from . import metrics
from .models import UserSession
from .signals import end_sockets

logger = logging.getLogger(__name__)


def socket_rows(request):
    """Return the demo panel's rows: each way of opening /ws/whoami/, and what to expect."""
    topology = settings.TOPOLOGY
    whoami = f"{topology.socket_base}{paths.WHOAMI}"
    you = "you" if request.user.is_authenticated else "anonymous"
    if topology.mode == "subdomain":
        # The cookie is scoped to the parent domain, so it reaches the socket host.
        name = f"Realtime subdomain, cookie for {topology.cookie_domain}"
        return [{"name": name, "url": whoami, "expect": you}]
    if topology.mode == "same-domain":
        rows = [{"name": "Through nginx: /ws/ on the app host", "url": whoami, "expect": you}]
        # Daphne's own port speaks plain ws://, which an https:// page may not open.
        if settings.DEMO_DIRECT_DAPHNE and not topology.tls:
            direct = f"ws://{topology.app_host}:{settings.DEMO_DAPHNE_PORT}{paths.WHOAMI}"
            rows.append(
                {
                    "name": "Straight to Daphne: same host, its own port",
                    "url": direct,
                    "expect": you,
                }
            )
        return rows
    rows = [{"name": "Realtime host, cookie only", "url": whoami, "expect": "anonymous"}]
    if not request.user.is_authenticated:
        return rows
    rows += [
        {
            "name": "Ticket in Sec-WebSocket-Protocol (recommended)",
            "url": whoami,
            "ticket": "header",
            "expect": you,
        },
        {"name": "Ticket in the query string", "url": whoami, "ticket": "query", "expect": you},
    ]
    if settings.WS_SESSION_KEY_FALLBACK:
        name, key = settings.WS_SESSION_KEY_PARAM, request.session.session_key
        rows += [
            {
                "name": f"Session key in the query string (?{name}=)",
                "url": f"{whoami}?{name}={key}",
                "expect": you,
            },
            {
                "name": "Session key in Sec-WebSocket-Protocol",
                "url": whoami,
                "protocols": [f"{name}.{key}"],
                "expect": you,
            },
        ]
    return rows


def live_socket(request):
    """Return how the live feed opens its socket: a fresh ticket in the header cross-domain."""
    topology = settings.TOPOLOGY
    needs_ticket = topology.cross_domain and request.user.is_authenticated
    return {"url": f"{topology.socket_base}{paths.LIVE}", "ticket": needs_ticket}


@require_GET
def home(request):
    demo = {
        "mode": settings.TOPOLOGY.mode,
        "cookie_domain": settings.TOPOLOGY.cookie_domain,
        "rows": socket_rows(request),
        "live": live_socket(request),
        "ticket_url": reverse("ws-ticket"),
        "secret_param": settings.WS_SESSION_KEY_PARAM,
    }
    return render(request, "home.html", {"demo": demo, "topology": settings.TOPOLOGY})


def field(request: HttpRequest, name: str) -> str | None:
    """Return the string field `name` of a form-encoded or JSON body, or None."""
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body)
        except ValueError:
            return None
        value = body.get(name) if isinstance(body, dict) else None
    else:
        value = request.POST.get(name)
    return value if isinstance(value, str) else None


def unavailable() -> JsonResponse:
    """The answer when Redis, which carries tickets and the channel layer, is unreachable."""
    return JsonResponse({"error": UNAVAILABLE}, status=503)


@require_POST
def announce(request: HttpRequest) -> JsonResponse:
    """Send an announcement to every /ws/live/ socket, on every Daphne process."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "login required"}, status=403)
    try:
        text = clean_text(field(request, "text"))
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    # Recorded first, so the event carries its id; then sent. If either fails the client is
    # told 503, and a recorded entry whose send failed is taken back: no half-recorded one.
    try:
        event = history.record(LIVE_GROUP, announcement(request.user.get_username(), text))
    except LAYER_ERRORS as exc:
        logger.warning("announcement not recorded, Redis unreachable: %r", exc)
        return unavailable()
    try:
        async_to_sync(get_channel_layer().group_send)(LIVE_GROUP, event)
    except LAYER_ERRORS as exc:
        logger.warning("announcement not sent, channel layer unreachable: %r", exc)
        history.discard(LIVE_GROUP, event["id"])
        return unavailable()
    metrics.ANNOUNCEMENTS.inc()
    return JsonResponse({"sent": True, "id": event["id"]})


@require_POST
def ws_ticket(request: HttpRequest) -> JsonResponse:
    """Mint a single-use ticket that opens a socket as this session's user."""
    if not request.user.is_authenticated or request.session.session_key is None:
        return JsonResponse({"error": "login required"}, status=403)
    path = field(request, "path") or paths.WHOAMI
    if path not in paths.SOCKET_PATHS:
        choices = ", ".join(paths.SOCKET_PATHS)
        return JsonResponse({"error": f"path must be one of {choices}"}, status=400)
    try:
        # Who the ticket is for travels sealed in it: Daphne redeems it with no query.
        ticket = tickets.mint(
            request.session.session_key,
            path,
            user_pk=request.user.pk,
            username=request.user.get_username(),
            backend=request.session.get(BACKEND_SESSION_KEY),
        )
    except LAYER_ERRORS as exc:
        logger.warning("ticket not minted, Redis unreachable: %r", exc)
        return unavailable()
    metrics.TICKETS_MINTED.inc()
    return JsonResponse(
        {
            "ticket": ticket,
            "expires_in": settings.WS_TICKET_TTL,
            "url": f"{settings.TOPOLOGY.socket_base}{path}?ticket={ticket}",
        }
    )


@require_POST
def logout_everywhere(request):
    """End every session of this user, and with them every socket, then log out here."""
    if request.user.is_authenticated:
        sessions = UserSession.objects.filter(user=request.user).values("session")
        Session.objects.filter(pk__in=sessions).delete()
        end_sockets(session_end(user=request.user.pk))
    logout(request)
    return redirect(settings.LOGOUT_REDIRECT_URL)


@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})
