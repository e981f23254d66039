"""Settings for the WSGI half: Gunicorn serving every page."""

from shared_settings.base import *  # noqa: F403
from shared_settings.base import (
    AUTH_PASSWORD_VALIDATORS,
    INSTALLED_APPS,
    LOCAL_HOSTS,
    TOPOLOGY,
    env,
)

# Pages only on APP_HOST: a request that names the realtime host is refused (400).
ALLOWED_HOSTS = [TOPOLOGY.app_host, *LOCAL_HOSTS]
INSTALLED_APPS = [*INSTALLED_APPS, "django.contrib.staticfiles", "wsgi_site.apps.WsgiSiteConfig"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, so its process_exception is asked first: a view that finds the database away.
    "wsgi_site.unavailable.DatabaseUnavailableMiddleware",
]
ROOT_URLCONF = "wsgi_site.urls"
WSGI_APPLICATION = "wsgi_site.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ]
        },
    }
]
STATIC_URL = "static/"
STATIC_ROOT = env.str("STATIC_ROOT", default=str(TOPOLOGY.state_dir / "static"))
STORAGES = {"staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"}}
LOGIN_REDIRECT_URL = LOGOUT_REDIRECT_URL = "/"
# Not a rule for passwords: the hook that closes a user's sockets when the password changes.
AUTH_PASSWORD_VALIDATORS = [
    *AUTH_PASSWORD_VALIDATORS,
    {"NAME": "wsgi_site.signals.EndSocketsOnPasswordChange"},
]

# The demo panel's "straight to Daphne" row: only where Daphne's own port is
# reachable from the browser (the native runtime), never behind compose.
DEMO_DIRECT_DAPHNE = env.bool("DEMO_DIRECT_DAPHNE", default=False)
DEMO_DAPHNE_PORT = TOPOLOGY.daphne_port
