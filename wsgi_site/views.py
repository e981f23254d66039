import json
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST
from redis.exceptions import RedisError

from asgi_site.consumers import LIVE_GROUP, MAX_TEXT

logger = logging.getLogger(__name__)


def socket_rows(request):
    """Return the demo panel's rows: each way of opening /ws/whoami/, and what to expect."""
    topology = settings.TOPOLOGY
    whoami = f"{topology.socket_base}/ws/whoami/"
    you = "you" if request.user.is_authenticated else "anonymous"
    if not topology.cross_domain:
        rows = [
            {"name": "Through nginx: /ws/ on the app host", "url": whoami, "expect": you},
        ]
        if settings.DEMO_DIRECT_DAPHNE:
            direct = f"ws://{topology.app_host}:{settings.DEMO_DAPHNE_PORT}/ws/whoami/"
            rows.append(
                {"name": "Straight to Daphne: same host, its own port", "url": direct,
                 "expect": you}
            )
        return rows
    rows = [{"name": "Realtime host, cookie only", "url": whoami, "expect": "anonymous"}]
    if request.user.is_authenticated and settings.WS_SESSION_KEY_FALLBACK:
        key_url = f"{whoami}?{settings.WS_SESSION_KEY_PARAM}={request.session.session_key}"
        rows.append(
            {"name": f"Realtime host with ?{settings.WS_SESSION_KEY_PARAM}=",
             "url": key_url, "expect": you}
        )
    return rows


def live_url(request):
    """Return the URL of the live feed socket, authenticated the way this mode needs."""
    topology = settings.TOPOLOGY
    url = f"{topology.socket_base}/ws/live/"
    if topology.cross_domain and request.user.is_authenticated:
        url += f"?{settings.WS_SESSION_KEY_PARAM}={request.session.session_key}"
    return url


@require_GET
def home(request):
    demo = {
        "mode": settings.TOPOLOGY.mode,
        "rows": socket_rows(request),
        "live": live_url(request),
        "secret_param": settings.WS_SESSION_KEY_PARAM,
    }
    return render(request, "home.html", {"demo": demo, "topology": settings.TOPOLOGY})


def announcement_text(request):
    """Return the `text` field of a form-encoded or JSON body, or None."""
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body)
        except ValueError:
            return None
        text = body.get("text") if isinstance(body, dict) else None
    else:
        text = request.POST.get("text")
    return text if isinstance(text, str) and text.strip() else None


@require_POST
def announce(request):
    """Send an announcement to every /ws/live/ socket, on every Daphne process."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "login required"}, status=403)
    text = announcement_text(request)
    if text is None:
        return JsonResponse({"error": 'send a non-empty "text" field'}, status=400)
    if len(text) > MAX_TEXT:
        return JsonResponse({"error": f"text longer than {MAX_TEXT} characters"}, status=400)
    event = {"type": "announcement", "user": request.user.get_username(), "text": text}
    try:
        async_to_sync(get_channel_layer().group_send)(LIVE_GROUP, event)
    except (OSError, RedisError) as exc:
        logger.warning("announcement not sent, channel layer unreachable: %r", exc)
        return JsonResponse({"error": "realtime service unavailable, try again"}, status=503)
    return JsonResponse({"sent": True})


@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})
