"""
Write the compose deployment's environment files from shared_settings.topology, the
description the native runtime uses too, so the two cannot drift apart.

    python -m deploy.envfiles            (what `make env-files` runs)

tests/test_compose.py fails when a committed file differs from what this writes.
"""

import hashlib

from shared_settings.topology import ROOT, Topology

# nginx-proxy names a per-path location file after the sha1 of the path.
WS_PATH = "/ws/"

# What containers differ in from a native run: every server listens on the container's
# network, Redis and PostgreSQL are services, state lives in the image's /app/var.
CONTAINER = {"BIND_ADDRESS": "0.0.0.0", "REDIS_PORT": "6379", "STATE_DIR": "/app/var"}

LOCAL_SECRETS = {"POSTGRES_PASSWORD": "local-only-not-a-secret", "DEMO_PASSWORD": "demo-pass"}
# Production hosts: the same two names in each mode, so the examples differ only in the mode.
PRODUCTION = {
    "PUBLIC_SCHEME": "https",
    "PUBLIC_PORT": "443",
    "APP_HOST": "www.example.com",
    "REALTIME_HOST": "realtime.example.com",
}
PRODUCTION_SECRETS = {
    "POSTGRES_PASSWORD": "",
    "DEMO_PASSWORD": "",
    "LETSENCRYPT_EMAIL": "admin@example.com",
}
PRODUCTION_NOTE = (
    "Production, {mode}, with TLS (compose.tls.yaml): copy to production.env and fill in the\n"
    "# blanks. SECRET_KEY and POSTGRES_PASSWORD come from your secret store; compose refuses to\n"
    "# start without them."
)

FILES = {
    "same-domain.env": (
        "Local compose run, pages and sockets on one domain (/ws/).",
        {"SPLIT_MODE": "same-domain"},
        LOCAL_SECRETS,
    ),
    "cross-domain.env": (
        "Local compose run, sockets on REALTIME_HOST.",
        {"SPLIT_MODE": "cross-domain"},
        LOCAL_SECRETS,
    ),
    "subdomain.env": (
        "Local compose run, sockets on a sibling subdomain, the session cookie on the parent.",
        {"SPLIT_MODE": "subdomain"},
        LOCAL_SECRETS,
    ),
    "production-same-domain.env.example": (
        PRODUCTION_NOTE.format(mode="same-domain"),
        {**PRODUCTION, "SPLIT_MODE": "same-domain", "REALTIME_HOST": PRODUCTION["APP_HOST"]},
        PRODUCTION_SECRETS,
    ),
    "production-cross-domain.env.example": (
        PRODUCTION_NOTE.format(mode="cross-domain"),
        {**PRODUCTION, "SPLIT_MODE": "cross-domain"},
        PRODUCTION_SECRETS,
    ),
    "production-subdomain.env.example": (
        PRODUCTION_NOTE.format(mode="subdomain"),
        {**PRODUCTION, "SPLIT_MODE": "subdomain"},
        PRODUCTION_SECRETS,
    ),
}


def render(description, topology_env, extra):
    topology = Topology.from_env({**CONTAINER, **topology_env})
    values = topology.as_env()
    values.update(
        {
            "COMPOSE_PROJECT_NAME": "split-channels",
            "WS_PATH_SHA1": hashlib.sha1(WS_PATH.encode()).hexdigest(),
            "POSTGRES_DB": "app",
            "POSTGRES_USER": "app",
            "DEMO_USER": "demo",
            "ASGI_REPLICAS": "1",
            **extra,
        }
    )
    lines = [f"# {description}", "# Written by `make env-files` from shared_settings/topology.py."]
    return "\n".join(lines + [f"{key}={value}" for key, value in values.items()]) + "\n"


def main():
    for name, spec in FILES.items():
        (ROOT / "deploy" / name).write_text(render(*spec))


if __name__ == "__main__":
    main()
