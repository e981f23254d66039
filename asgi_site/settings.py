"""Settings for the ASGI half: Daphne serving WebSockets."""

from shared_settings.base import *  # noqa: F403

INSTALLED_APPS = INSTALLED_APPS + ["channels"]  # noqa: F405
ROOT_URLCONF = "asgi_site.urls"
ASGI_APPLICATION = "asgi_site.asgi.application"
