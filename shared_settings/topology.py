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

MODES = ("same-domain", "cross-domain", "subdomain")
SCHEMES = ("http", "https")
DATABASES = ("sqlite", "postgres")
DEFAULT_PORTS = {"http": 80, "https": 443}
# Hosts each mode defaults to: every name under .localhost reaches this machine without DNS.
DEFAULT_HOSTS = {
    "same-domain": ("app.localhost", None),
    "cross-domain": ("app.localhost", "realtime.localhost"),
    "subdomain": ("app.split.localhost", "rt.split.localhost"),
}
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
    # REDIS_SENTINEL: a primary on REDIS_PORT, a replica and three Sentinels after it, which
    # know the primary as REDIS_SENTINEL_MASTER.
    redis_sentinel: bool
    redis_sentinel_master: str
    # Where the metrics exporter listens (BIND_ADDRESS): never routed by nginx.
    metrics_port: int
    bind_address: str
    # Where nginx listens (PUBLIC_BIND_ADDRESS, by default BIND_ADDRESS): the one address to
    # open to the world. Gunicorn, Daphne, Redis and the metrics exporter stay on BIND_ADDRESS.
    public_bind_address: str
    state_dir: Path
    # The port that answers plain HTTP: PUBLIC_PORT itself, or beside HTTPS a redirect to it.
    public_http_port: int
    # SESSION_COOKIE_DOMAIN: None (the app host alone), or a parent domain of both hosts.
    cookie_domain: str | None
    # The certificate and key nginx serves over HTTPS: TLS_CERT_FILE and TLS_KEY_FILE, or
    # by default ones the native runtime makes under STATE_DIR/tls from a local CA.
    tls_certificate: Path
    tls_key: Path
    own_certificate: bool
    # DATABASE: "sqlite" (a file under STATE_DIR) or "postgres" (a cluster of the native
    # runtime's own under STATE_DIR, deploy/postgres.py). DATABASE_URL, when set, wins.
    database: str = "sqlite"
    postgres_port: int = 5433
    # The server's max_connections: the runner refuses a topology whose processes could
    # open more (deploy.postgres.connections_bound).
    postgres_max_connections: int = 100

    @classmethod
    def from_env(cls, environment=None):
        """Build the topology from environment variables (os.environ by default)."""
        env = environ.Env()
        env.ENVIRON = os.environ if environment is None else environment
        mode = env.str("SPLIT_MODE", default="cross-domain")
        if mode not in MODES:
            raise ImproperlyConfigured(f"SPLIT_MODE={mode!r} is not one of {', '.join(MODES)}.")
        scheme = env.str("PUBLIC_SCHEME", default="http")
        if scheme not in SCHEMES:
            raise ImproperlyConfigured(f"PUBLIC_SCHEME={scheme!r} is not one of http, https.")
        default_app, default_realtime = DEFAULT_HOSTS[mode]
        app_host = env.str("APP_HOST", default=default_app)
        realtime_host = env.str("REALTIME_HOST", default=default_realtime or app_host)
        cookie_domain = session_cookie_domain(mode, app_host, realtime_host, env)
        public_port = env.int("PUBLIC_PORT", default=8443 if scheme == "https" else 8000)
        if scheme == "https":
            # Plain HTTP only redirects to HTTPS: on 80 beside 443, else on 8000.
            http_port = env.int("PUBLIC_HTTP_PORT", default=80 if public_port == 443 else 8000)
        else:
            http_port = public_port
        state_dir = Path(env.str("STATE_DIR", default=str(ROOT / "var"))).resolve()
        certificate, key = env.str("TLS_CERT_FILE", default=""), env.str("TLS_KEY_FILE", default="")
        if bool(certificate) != bool(key):
            raise ImproperlyConfigured("Set both TLS_CERT_FILE and TLS_KEY_FILE, or neither.")
        bind_address = env.str("BIND_ADDRESS", default="127.0.0.1")
        return cls(
            mode=mode,
            scheme=scheme,
            app_host=app_host,
            realtime_host=realtime_host,
            public_port=public_port,
            gunicorn_port=env.int("GUNICORN_PORT", default=8001),
            daphne_port=env.int("DAPHNE_PORT", default=8100),
            asgi_processes=env.int("ASGI_PROCESSES", default=1),
            redis_port=env.int("REDIS_PORT", default=6380),
            redis_sentinel=env.bool("REDIS_SENTINEL", default=False),
            redis_sentinel_master=env.str("REDIS_SENTINEL_MASTER", default="split"),
            metrics_port=env.int("METRICS_PORT", default=9400),
            bind_address=bind_address,
            public_bind_address=env.str("PUBLIC_BIND_ADDRESS", default=bind_address),
            state_dir=state_dir,
            public_http_port=http_port,
            cookie_domain=cookie_domain,
            tls_certificate=Path(certificate) if certificate else state_dir / "tls" / "cert.pem",
            tls_key=Path(key) if key else state_dir / "tls" / "key.pem",
            own_certificate=bool(certificate),
            database=chosen_database(env),
            postgres_port=env.int("POSTGRES_PORT", default=5433),
            postgres_max_connections=env.int("POSTGRES_MAX_CONNECTIONS", default=100),
        )

    @property
    def cross_domain(self):
        """True when the session cookie does not reach the socket host."""
        return self.mode == "cross-domain"

    @property
    def realtime_apart(self):
        """True when sockets have a host of their own (cross-domain or subdomain)."""
        return self.realtime_host != self.app_host

    @property
    def tls(self):
        return self.scheme == "https"

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

    @property
    def postgres_data_dir(self):
        return self.state_dir / "postgres"

    @property
    def postgres_socket_dir(self):
        """Where the native runtime's PostgreSQL keeps its Unix socket (0700)."""
        return self.state_dir / "postgres-socket"

    @property
    def redis_replica_port(self):
        """Sentinel mode: the replica of the primary on REDIS_PORT."""
        return self.redis_port + 1

    @property
    def sentinel_ports(self):
        """Sentinel mode: the three Sentinels that watch the primary, after the replica."""
        return [self.redis_port + 2 + i for i in range(3)]

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
            "METRICS_PORT": str(self.metrics_port),
            "BIND_ADDRESS": self.bind_address,
            "STATE_DIR": str(self.state_dir),
            "PUBLIC_HTTP_PORT": str(self.public_http_port),
            "SESSION_COOKIE_DOMAIN": self.cookie_domain or "",
        }


def chosen_database(env):
    """DATABASE, checked: sqlite or postgres."""
    value = env.str("DATABASE", default="sqlite")
    if value not in DATABASES:
        raise ImproperlyConfigured(f"DATABASE={value!r} is not one of {', '.join(DATABASES)}.")
    return value


def domain_match(host, domain):
    """True if a cookie with Domain=`domain` is sent to `host` (RFC 6265, 5.1.3)."""
    domain = domain.lstrip(".")
    return host == domain or host.endswith("." + domain)


def session_cookie_domain(mode, app_host, realtime_host, env):
    """
    SESSION_COOKIE_DOMAIN for this mode, checked against the hosts: subdomain mode scopes the
    cookie to the app host's parent domain by default, and it must cover both hosts; the
    other modes keep the cookie on the app host unless told otherwise, and cross-domain
    means the cookie does not reach the socket host.
    """
    if mode == "same-domain" and realtime_host != app_host:
        raise ImproperlyConfigured(
            "REALTIME_HOST must equal APP_HOST in same-domain mode "
            "(unset it, or use SPLIT_MODE=cross-domain or subdomain)."
        )
    if mode != "same-domain" and realtime_host == app_host:
        raise ImproperlyConfigured("REALTIME_HOST equals APP_HOST: that is SPLIT_MODE=same-domain.")
    parent = "." + app_host.partition(".")[2] if mode == "subdomain" else ""
    # Empty is unset: the env files spell every variable, "" where there is nothing.
    domain = env.str("SESSION_COOKIE_DOMAIN", default="") or parent
    if not domain:
        return None
    if "." not in domain.strip("."):
        # Browsers treat a single label (.com, .localhost) as a public suffix: no cookie.
        raise ImproperlyConfigured(
            f"SESSION_COOKIE_DOMAIN={domain} is a single label, for which browsers refuse "
            "cookies: set it to the parent domain of both hosts, such as .example.com."
        )
    if not domain_match(app_host, domain):
        raise ImproperlyConfigured(
            f"SESSION_COOKIE_DOMAIN={domain} does not cover APP_HOST={app_host}: "
            "browsers would refuse the cookie."
        )
    if mode == "subdomain" and not domain_match(realtime_host, domain):
        raise ImproperlyConfigured(
            f"SESSION_COOKIE_DOMAIN={domain} does not cover REALTIME_HOST={realtime_host}: "
            "in subdomain mode both hosts are under it."
        )
    if mode == "cross-domain" and domain_match(realtime_host, domain):
        raise ImproperlyConfigured(
            f"SESSION_COOKIE_DOMAIN={domain} covers REALTIME_HOST={realtime_host}, so the cookie "
            "reaches the sockets: that is SPLIT_MODE=subdomain."
        )
    return domain


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
