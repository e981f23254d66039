"""Settings for the ASGI half: Daphne serving WebSockets."""

from shared_settings.base import *  # noqa: F403
from shared_settings.base import INSTALLED_APPS, LOCAL_HOSTS, TOPOLOGY

# Sockets (and /healthz) only on REALTIME_HOST, which is APP_HOST same-domain.
ALLOWED_HOSTS = [TOPOLOGY.realtime_host, *LOCAL_HOSTS]
INSTALLED_APPS = [*INSTALLED_APPS, "channels"]
# Daphne's few HTTP views (/healthz) check the Host too: CommonMiddleware asks for it.
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "asgi_site.urls"
ASGI_APPLICATION = "asgi_site.asgi.application"
