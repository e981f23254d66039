"""
The one description of the deployment: which hosts, ports and origins exist.

Django settings, the native runtime (nginx and supervisord configs) and the compose
environment files are all derived from this module, so they cannot drift apart. It
reads the environment once and needs nothing of Django's settings.

    python -m shared_settings.topology        # print every variable as KEY=value
"""

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

MODES = ("same-domain", "cross-domain")
DEFAULT_PORTS = {"http": 80, "https": 443}
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Topology:
    mode: str
    scheme: str
    app_host: str
    realtime_host: str
    public_port: int
    gunicorn_port: int
    daphne_port: int
    asgi_processes: int
    redis_port: int
    bind_address: str
    state_dir: Path

    @classmethod
    def from_env(cls, environment=None):
        """Build the topology from environment variables (os.environ by default)."""
        env = environ.Env()
        env.ENVIRON = os.environ if environment is None else environment
        mode = env.str("SPLIT_MODE", default="cross-domain")
        if mode not in MODES:
            raise ImproperlyConfigured(f"SPLIT_MODE={mode!r} is not one of {', '.join(MODES)}.")
        app_host = env.str("APP_HOST", default="app.localhost")
        if mode == "same-domain":
            realtime_host = env.str("REALTIME_HOST", default=app_host)
            if realtime_host != app_host:
                raise ImproperlyConfigured(
                    "REALTIME_HOST must equal APP_HOST in same-domain mode "
                    "(unset it, or use SPLIT_MODE=cross-domain)."
                )
        else:
            realtime_host = env.str("REALTIME_HOST", default="realtime.localhost")
            if realtime_host == app_host:
                raise ImproperlyConfigured(
                    "REALTIME_HOST equals APP_HOST: that is SPLIT_MODE=same-domain."
                )
        state_dir = Path(env.str("STATE_DIR", default=str(ROOT / "var")))
        return cls(
            mode=mode,
            scheme=env.str("PUBLIC_SCHEME", default="http"),
            app_host=app_host,
            realtime_host=realtime_host,
            public_port=env.int("PUBLIC_PORT", default=8000),
            gunicorn_port=env.int("GUNICORN_PORT", default=8001),
            daphne_port=env.int("DAPHNE_PORT", default=8100),
            asgi_processes=env.int("ASGI_PROCESSES", default=1),
            redis_port=env.int("REDIS_PORT", default=6380),
            bind_address=env.str("BIND_ADDRESS", default="127.0.0.1"),
            state_dir=state_dir.resolve(),
        )

    @property
    def cross_domain(self):
        return self.mode == "cross-domain"

    @property
    def ws_scheme(self):
        return "wss" if self.scheme == "https" else "ws"

    def _netloc(self, host):
        # Browsers leave the default port out of Origin, so must we.
        if self.public_port == DEFAULT_PORTS.get(self.scheme):
            return host
        return f"{host}:{self.public_port}"

    @property
    def app_origin(self):
        return f"{self.scheme}://{self._netloc(self.app_host)}"

    @property
    def realtime_origin(self):
        return f"{self.scheme}://{self._netloc(self.realtime_host)}"

    @property
    def allowed_origins(self):
        """Origins whose pages may open a socket: the app's alone. The realtime host serves
        no pages, so no page of its origin has a reason to open one."""
        return [self.app_origin]

    @property
    def socket_base(self):
        """Where browsers open sockets, e.g. ws://realtime.localhost:8000."""
        return f"{self.ws_scheme}://{self._netloc(self.realtime_host)}"

    @property
    def daphne_ports(self):
        return [self.daphne_port + i for i in range(self.asgi_processes)]

    @property
    def redis_url(self):
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def as_env(self):
        """Every variable that describes this topology, as the environment spells it."""
        return {
            "SPLIT_MODE": self.mode,
            "PUBLIC_SCHEME": self.scheme,
            "APP_HOST": self.app_host,
            "REALTIME_HOST": self.realtime_host,
            "PUBLIC_PORT": str(self.public_port),
            "GUNICORN_PORT": str(self.gunicorn_port),
            "DAPHNE_PORT": str(self.daphne_port),
            "ASGI_PROCESSES": str(self.asgi_processes),
            "REDIS_PORT": str(self.redis_port),
            "BIND_ADDRESS": self.bind_address,
            "STATE_DIR": str(self.state_dir),
        }


# An nginx rate: requests per second or per minute, e.g. "10r/m".
NGINX_RATE = re.compile(r"[1-9][0-9]*r/[sm]")


@dataclass(frozen=True)
class Limits:
    """
    What one client address may do, enforced by nginx (the native template renders these):
    a rate and a burst for login POSTs, /announce/, /ws-ticket/ and socket handshakes, and
    a cap on the sockets it holds open at once. Past any of them nginx answers 429, JSON.
    """

    login_rate: str
    login_burst: int
    announce_rate: str
    announce_burst: int
    ticket_rate: str
    ticket_burst: int
    socket_rate: str
    socket_burst: int
    socket_connections: int

    @classmethod
    def from_env(cls, environment=None):
        env = environ.Env()
        env.ENVIRON = os.environ if environment is None else environment

        def rate(name, default):
            value = env.str(name, default=default)
            if not NGINX_RATE.fullmatch(value):
                raise ImproperlyConfigured(f"{name}={value!r} is not a rate like 10r/s or 10r/m.")
            return value

        def count(name, default, least=0):
            value = env.int(name, default=default)
            if value < least:
                raise ImproperlyConfigured(f"{name}={value} must be {least} or more.")
            return value

        return cls(
            login_rate=rate("LIMIT_LOGIN_RATE", "10r/m"),
            login_burst=count("LIMIT_LOGIN_BURST", 20),
            announce_rate=rate("LIMIT_ANNOUNCE_RATE", "2r/s"),
            announce_burst=count("LIMIT_ANNOUNCE_BURST", 20),
            ticket_rate=rate("LIMIT_TICKET_RATE", "5r/s"),
            ticket_burst=count("LIMIT_TICKET_BURST", 30),
            socket_rate=rate("LIMIT_SOCKET_RATE", "20r/s"),
            socket_burst=count("LIMIT_SOCKET_BURST", 200),
            socket_connections=count("LIMIT_SOCKET_CONNECTIONS", 200, least=1),
        )


TOPOLOGY = Topology.from_env()
LIMITS = Limits.from_env()
# Seconds a Daphne process told to stop (SIGTERM) spends closing its sockets with 1012, spread
# evenly, so clients reconnect to the other processes a few at a time (asgi_site/server.py).
# Here, not in Django's settings, because supervisord's and compose's stop timeouts outlast it.
DRAIN_SECONDS = environ.Env().float("WS_DRAIN_SECONDS", default=5.0)

if __name__ == "__main__":
    sys.stdout.writelines(f"{k}={v}\n" for k, v in TOPOLOGY.as_env().items())
