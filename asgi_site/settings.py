"""Settings for the ASGI half: Daphne serving WebSockets."""

from shared_settings.base import *  # noqa: F403
from shared_settings.base import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "channels"]
ROOT_URLCONF = "asgi_site.urls"
ASGI_APPLICATION = "asgi_site.asgi.application"
