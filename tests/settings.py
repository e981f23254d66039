"""Settings for the unit tests: both halves' apps in one process, an in-memory channel layer."""

import os
import socket
import tempfile

# The topology and the settings core read these at import, so set them first.
os.environ.setdefault("SECRET_KEY", "unit-tests-only-not-a-secret")
os.environ.setdefault("STATE_DIR", tempfile.mkdtemp(prefix="split-unit-"))
os.environ.setdefault("SPLIT_MODE", "cross-domain")

from wsgi_site.settings import *  # noqa: F403
from wsgi_site.settings import ALLOWED_HOSTS, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "channels"]
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Tickets live in a real Redis: tests/conftest.py starts one on this port, free when chosen.
UNIT_REDIS_PORT = free_port()
REDIS_URL = f"redis://127.0.0.1:{UNIT_REDIS_PORT}/0"
STATIC_ROOT = os.path.join(os.environ["STATE_DIR"], "static")
os.makedirs(STATIC_ROOT, exist_ok=True)
# One process plays both halves here, so it answers both hosts.
ALLOWED_HOSTS = [*ALLOWED_HOSTS, "realtime.localhost"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast, tests only
