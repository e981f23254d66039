from django.http import JsonResponse
from django.urls import path


def healthz(request):
    return JsonResponse({"status": "ok"})


# Daphne serves no pages: only readiness, at /healthz and at /ws/healthz so that
# nginx's /ws/ route reaches it in same-domain mode.
urlpatterns = [path("healthz", healthz), path("ws/healthz", healthz)]
