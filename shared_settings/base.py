"""
Settings both halves share: one secret, one database, one session store, one channel
layer, and the topology. wsgi_site.settings and asgi_site.settings import this and
add only what their half needs.
"""

import environ
from django.core.exceptions import ImproperlyConfigured

from .topology import DRAIN_SECONDS, ROOT, TOPOLOGY

env = environ.Env()

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "SECRET_KEY is not set. `make up-cross-domain` makes one under STATE_DIR; "
        "elsewhere export SECRET_KEY (and keep it out of the repository)."
    )
# Old keys still accepted for sessions and signatures, newest first, so a rotation
# does not log everyone out.
SECRET_KEY_FALLBACKS = env.list("SECRET_KEY_FALLBACKS", default=[])
DEBUG = env.bool("DJANGO_DEBUG", default=False)

# Each half answers only its own host (its settings set ALLOWED_HOSTS), and these, for
# health checks made from beside the server rather than through nginx.
LOCAL_HOSTS = ["localhost", "127.0.0.1"]


def native_database(topology):
    """The native runtime's database: a SQLite file, or its own PostgreSQL's Unix socket."""
    if topology.database == "postgres":  # deploy/postgres.py makes and runs the cluster
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "app",
            "USER": "app",
            "HOST": str(topology.postgres_socket_dir),
            "PORT": topology.postgres_port,
        }
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(topology.state_dir / "db.sqlite3")}


DATABASES = {
    "default": env.db("DATABASE_URL") if env.str("DATABASE_URL", default="") else
    native_database(TOPOLOGY)
}  # fmt: skip
# Keep connections: with Django's default of 0, every database_sync_to_async hop on the
# socket side closes its connection and the next handshake opens a new one (measured:
# a quarter of a Daphne process's time went there; see "Performance" in the README).
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Gunicorn workers and Daphne processes write to one file: WAL lets readers
    # run beside a writer, IMMEDIATE makes writers queue instead of failing.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
else:
    # PostgreSQL, native or compose. Each process holds at most DATABASE_CONNECTIONS of
    # them: one persistent connection (the default: Gunicorn's sync workers and Daphne's
    # database thread each use one at a time), or with DATABASE_POOL=true a psycopg pool of
    # up to DATABASE_POOL_SIZE. Keep (WEB_CONCURRENCY + Daphne processes) x DATABASE_CONNECTIONS
    # under the server's max_connections (README, "PostgreSQL"; the native runner checks).
    # A server that does not answer fails a request within connect_timeout (or the pool's
    # timeout): pages answer 503 (wsgi_site/unavailable.py), handshakes are anonymous.
    DATABASE_POOL = env.bool("DATABASE_POOL", default=False)
    DATABASE_POOL_SIZE = env.int("DATABASE_POOL_SIZE", default=4)
    DATABASES["default"]["OPTIONS"] = {"connect_timeout": 3}
    if DATABASE_POOL:
        # The pool keeps its connections itself: Django's persistence must be off.
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"]["OPTIONS"]["pool"] = {
            "min_size": 1,
            "max_size": DATABASE_POOL_SIZE,
            "timeout": 3,
        }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
]

# One session store, in the shared database, read by Gunicorn and Daphne alike.
SESSION_ENGINE = "django.contrib.sessions.backends.db"
# The app host alone, or in subdomain mode the parent domain of both hosts (the topology
# derives and checks it). The CSRF cookie stays on the app host: only pages need it.
SESSION_COOKIE_DOMAIN = TOPOLOGY.cookie_domain
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = TOPOLOGY.tls
CSRF_TRUSTED_ORIGINS = [TOPOLOGY.app_origin]
# TLS ends at nginx, which sets X-Forwarded-Proto to the scheme it was reached by, replacing
# any the client sent. HSTS and the redirect to HTTPS are nginx's too (nginx/native.conf.template).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Redis holds tickets, history, socket counts and the channel layer; contract/redis_clients.py
# makes every client of it from the settings below.
REDIS_URL = env.str("REDIS_URL", default=TOPOLOGY.redis_url)


def sentinel_address(value):
    """A Sentinel's "host:port", as redis-py takes it: (host, port)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ImproperlyConfigured(f"REDIS_SENTINELS: {value!r} is not host:port.")
    return (host, int(port))


# Redis with failover (REDIS_SENTINEL=1; README): clients ask these Sentinels which Redis is
# the primary named REDIS_SENTINEL_MASTER, and ask again after a failover. REDIS_URL then
# gives the database, password and TLS, not the address. Empty: REDIS_URL is the one Redis.
REDIS_SENTINELS = [
    sentinel_address(value)
    for value in env.list(
        "REDIS_SENTINELS", default=[f"127.0.0.1:{port}" for port in TOPOLOGY.sentinel_ports]
    )
    if TOPOLOGY.redis_sentinel
]
REDIS_SENTINEL_MASTER = TOPOLOGY.redis_sentinel_master
# The channel layer's Redis servers (README, "Sharding the channel layer"): with more than
# one, channels-redis spreads groups and channels over them; all else stays on REDIS_URL.
CHANNEL_LAYER_HOSTS = env.list("CHANNEL_LAYER_HOSTS", default=[REDIS_URL])
CHANNEL_LAYER_BACKENDS = {
    # channels-redis' list-based layer, surviving a Redis restart (contract/layers.py):
    # what this project ships. "pubsub" is for comparison (bench/fanout.py).
    "redis": "contract.layers.ResilientRedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
CHANNEL_LAYER = env.str("CHANNEL_LAYER", default="redis")
if REDIS_SENTINELS and (CHANNEL_LAYER_HOSTS != [REDIS_URL] or CHANNEL_LAYER != "redis"):
    raise ImproperlyConfigured(
        "REDIS_SENTINEL=1 watches one primary, REDIS_URL's: unset CHANNEL_LAYER_HOSTS and "
        "CHANNEL_LAYER (sharding and the pubsub layer run without Sentinels here)."
    )
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": CHANNEL_LAYER_BACKENDS[CHANNEL_LAYER],
        "CONFIG": {"hosts": CHANNEL_LAYER_HOSTS},
    }
}

# The WebSocket side of the topology.
WS_ALLOWED_ORIGINS = TOPOLOGY.allowed_origins
WS_ALLOW_MISSING_ORIGIN = env.bool("WS_ALLOW_MISSING_ORIGIN", default=False)
# The session key in a socket's URL or subprotocol is for a socket the cookie cannot reach:
# on by default cross-domain, off by default same-domain, where the cookie always arrives.
WS_SESSION_KEY_FALLBACK = env.bool("WS_SESSION_KEY_FALLBACK", default=TOPOLOGY.cross_domain)
WS_SESSION_KEY_PARAM = env.str("WS_SESSION_KEY_PARAM", default="session_key")
# Seconds a ticket from POST /ws-ticket/ stays redeemable (once).
WS_TICKET_TTL = env.int("WS_TICKET_TTL", default=30)
# How often a logged-in socket checks that its session still stands.
WS_SESSION_RECHECK_SECONDS = env.float("WS_SESSION_RECHECK_SECONDS", default=60)
# Seconds a Daphne process trusts a session it read (a cookie's or session key's): the
# page's next socket on it costs no query. Logout and password change end the trust at once;
# a session deleted otherwise, or a user deactivated, is caught as for an outstanding ticket,
# at the socket's first re-check, so the window is at most a ticket's. 0: read every time.
WS_SESSION_TRUST_SECONDS = env.float("WS_SESSION_TRUST_SECONDS", default=min(10, WS_TICKET_TTL))
if not 0 <= WS_SESSION_TRUST_SECONDS <= WS_TICKET_TTL:
    raise ImproperlyConfigured("WS_SESSION_TRUST_SECONDS must be 0 to WS_TICKET_TTL.")
# Messages a socket may send per second, and in one burst, before it is closed with 4429.
WS_MESSAGE_RATE = env.float("WS_MESSAGE_RATE", default=10)
WS_MESSAGE_BURST = env.int("WS_MESSAGE_BURST", default=20)
# Sockets one user may hold open at once, across every Daphne process (counted in Redis);
# one more is accepted and closed with 4409. 0 counts nothing. Anonymous sockets are capped
# per client address by nginx instead (LIMIT_SOCKET_CONNECTIONS, shared_settings.topology).
WS_MAX_SOCKETS_PER_USER = env.int("WS_MAX_SOCKETS_PER_USER", default=50)
# Seconds a stopping Daphne process spreads its 1012 closes over (WS_DRAIN_SECONDS; read in
# shared_settings.topology, which the stop timeouts of supervisord and compose are rendered from).
WS_DRAIN_SECONDS = DRAIN_SECONDS
# History per group (contract/history.py): each announcement and live message is kept in a
# Redis Stream, the last WS_HISTORY_MAX of them (at least) and none older than
# WS_HISTORY_SECONDS (trimmed as messages are added; 0: no age limit), so a socket that
# reconnects with ?since=<id> is sent what it missed.
WS_HISTORY_MAX = env.int("WS_HISTORY_MAX", default=1000)
WS_HISTORY_SECONDS = env.int("WS_HISTORY_SECONDS", default=3600)
if WS_HISTORY_MAX < 1 or WS_HISTORY_SECONDS < 0:
    raise ImproperlyConfigured("WS_HISTORY_MAX must be 1 or more, WS_HISTORY_SECONDS 0 or more.")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {
        "asgi_site": {"level": env.str("LOG_LEVEL", default="INFO")},
        "wsgi_site": {"level": env.str("LOG_LEVEL", default="INFO")},
        "contract": {"level": env.str("LOG_LEVEL", default="INFO")},
    },
}

BASE_DIR = ROOT
