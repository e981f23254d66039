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

FILES = {
    "same-domain.env": (
        "Local compose run, pages and sockets on one domain (/ws/).",
        {"SPLIT_MODE": "same-domain"},
        {"POSTGRES_PASSWORD": "local-only-not-a-secret", "DEMO_PASSWORD": "demo-pass"},
    ),
    "cross-domain.env": (
        "Local compose run, sockets on REALTIME_HOST.",
        {"SPLIT_MODE": "cross-domain"},
        {"POSTGRES_PASSWORD": "local-only-not-a-secret", "DEMO_PASSWORD": "demo-pass"},
    ),
    "production.env.example": (
        "Production with TLS (compose.tls.yaml): copy to production.env and fill in the blanks.\n"
        "# SECRET_KEY and POSTGRES_PASSWORD come from your secret store; compose refuses to start\n"
        "# without them.",
        {
            "SPLIT_MODE": "cross-domain",
            "PUBLIC_SCHEME": "https",
            "PUBLIC_PORT": "443",
            "APP_HOST": "www.example.com",
            "REALTIME_HOST": "realtime.example.com",
        },
        {"POSTGRES_PASSWORD": "", "DEMO_PASSWORD": "", "LETSENCRYPT_EMAIL": "admin@example.com"},
    ),
}


def render(description, topology_env, extra):
    topology = Topology.from_env({**CONTAINER, **topology_env})
    values = topology.as_env()
    values.update(
        {
            "COMPOSE_PROJECT_NAME": "split-channels",
            # The port the proxy publishes for plain HTTP: PUBLIC_PORT, or 80 beside TLS.
            "HTTP_PORT": "80" if topology.scheme == "https" else str(topology.public_port),
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
