"""
The native runtime: the whole split deployment on this machine, in the foreground.

    SPLIT_MODE=cross-domain python -m deploy.native     (what `make up-cross-domain` runs)

Renders the nginx and supervisord configs from shared_settings.topology into STATE_DIR,
migrates, creates the demo user, then runs supervisord, which starts Redis, Gunicorn,
Daphne and nginx and restarts any that dies. It prints the URL to open once both
halves answer through nginx, and stops everything on Ctrl-C or SIGTERM.
"""

import http.client
import math
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from django.template import Context, Engine

from deploy import postgres, sentinel
from deploy.certs import ensure_certificate, spki_hash
from shared_settings.topology import DRAIN_SECONDS, LIMITS, ROOT, TOPOLOGY

READY_TIMEOUT = 60
# A stopping Daphne process drains for WS_DRAIN_SECONDS, then waits up to 3 s for the last
# closes (asgi_site/server.py): supervisord waits that long and this margin before SIGKILL.
STOP_MARGIN = 5
VENV_BIN = Path(sys.executable).parent
# Sent by nginx over HTTPS, as nginx-proxy sends it in the compose deployment (its default).
HSTS = 'add_header Strict-Transport-Security "max-age=31536000" always;'


def main():
    topology = TOPOLOGY
    check_ports(topology)
    state, log = topology.state_dir, topology.state_dir / "log"
    for folder in (log, state / "redis", state / "nginx"):
        folder.mkdir(parents=True, exist_ok=True)
    # Metrics start from zero with the runtime: files of another run's processes would add up.
    shutil.rmtree(metrics_dir(topology), ignore_errors=True)
    metrics_dir(topology).mkdir()
    ca_file = ensure_certificate(topology) if topology.tls else None
    env = child_env(topology)
    render_configs(topology)

    manage = [sys.executable, str(ROOT / "wsgi_site" / "manage.py")]
    subprocess.run([*manage, "collectstatic", "--noinput", "-v0"], env=env, check=True)
    migrate = [str(ROOT / "deploy" / "migrate.sh")]
    if topology.database == "postgres":
        # supervisord runs the server; to migrate before it starts, the runner runs it briefly.
        postgres.check_connections(topology, env)
        with postgres.prepared(topology):
            subprocess.run(migrate, env=env, check=True)
    else:
        subprocess.run(migrate, env=env, check=True)

    supervisord = subprocess.Popen(
        [str(VENV_BIN / "supervisord"), "-c", str(state / "supervisord.conf")], env=env
    )

    def stop(signum, frame):
        supervisord.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if wait_ready(topology, supervisord, ca_file):
        print(banner(topology, env["DEMO_USER"], env["DEMO_PASSWORD"], ca_file), flush=True)
    else:
        print(f"Not ready after {READY_TIMEOUT} s; the logs in {log} say why.", file=sys.stderr)
        supervisord.send_signal(signal.SIGTERM)
    return supervisord.wait()


def check_ports(topology):
    """Stop with a readable message if a port we need is taken."""
    ports = {
        "PUBLIC_PORT": topology.public_port,
        "GUNICORN_PORT": topology.gunicorn_port,
        "REDIS_PORT": topology.redis_port,
        "METRICS_PORT": topology.metrics_port,
    }
    if topology.database == "postgres":
        ports["POSTGRES_PORT"] = topology.postgres_port
    if topology.tls:
        ports["PUBLIC_HTTP_PORT"] = topology.public_http_port
    ports.update({f"DAPHNE_PORT (+{i})": p for i, p in enumerate(topology.daphne_ports)})
    if topology.redis_sentinel:
        ports["REDIS_PORT (+1, replica)"] = topology.redis_replica_port
        for offset, port in enumerate(topology.sentinel_ports, 2):
            ports[f"REDIS_PORT (+{offset}, Sentinel)"] = port
    for name, port in ports.items():
        public = name.startswith("PUBLIC_")
        address = topology.public_bind_address if public else topology.bind_address
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                sys.exit(
                    f"Port {port} ({name}) is in use: stop what holds it, or set {name.split()[0]}."
                )


def child_env(topology):
    """The environment every process gets: the topology, spelled out, and a secret key."""
    env = dict(os.environ, **topology.as_env())
    # Each half names its own settings module; an inherited one would override both.
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["SECRET_KEY"] = env.get("SECRET_KEY") or local_secret_key(topology.state_dir)
    env["DEMO_DIRECT_DAPHNE"] = "1"
    # prometheus_client's multiprocess mode, chosen when it is imported: set before any is.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir(topology))
    env.setdefault("DEMO_USER", "demo")
    env.setdefault("DEMO_PASSWORD", "demo-pass")
    return env


def metrics_dir(topology):
    """Where every process writes its metrics, for the exporter (deploy/metrics.py) to sum."""
    return topology.state_dir / "metrics"


def local_secret_key(state_dir):
    """A secret key for local runs, made once and kept under STATE_DIR."""
    path = state_dir / "secret-key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(50))
    return path.read_text().strip()


def render(template, topology):
    """Render one of the runtime's config templates for this topology."""
    context = {
        "topology": topology,
        "limits": LIMITS,
        "postgres": postgres_program(topology),
        "listen": f"{topology.public_bind_address}:{topology.public_port}"
        + (" ssl" if topology.tls else ""),
        "hsts": HSTS if topology.tls else "",
        "root": ROOT,
        "state": topology.state_dir,
        "log": topology.state_dir / "log",
        "log_format": (ROOT / "nginx" / "access-log-format").read_text().strip(),
        "common": "autorestart=true\nstartsecs=1\nstopasgroup=true\n"
        "killasgroup=true\nredirect_stderr=true",
        "stopwaitsecs": 5,
        "asgi_stopwaitsecs": math.ceil(DRAIN_SECONDS) + 3 + STOP_MARGIN,
    }
    engine = Engine(dirs=[str(ROOT)])
    return engine.get_template(template).render(Context(context, autoescape=False, use_l10n=False))


def postgres_program(topology):
    """What supervisord needs to run PostgreSQL (DATABASE=postgres), or None."""
    if topology.database != "postgres":
        return None
    return {"command": " ".join(postgres.server_command(topology)), "user": postgres.engine_user()}


def render_configs(topology):
    for template, target in [
        ("nginx/native.conf.template", "nginx.conf"),
        ("deploy/supervisord.conf.template", "supervisord.conf"),
    ]:
        (topology.state_dir / target).write_text(render(template, topology))
    if topology.redis_sentinel:
        sentinel.write_configs(topology)


def answers(port, host, path, tls=None):
    """True if nginx, asked for `host` (over TLS with an ssl context), answers 200 on `path`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        if tls:
            raw = socket.create_connection(("127.0.0.1", port), timeout=2)
            conn.sock = tls.wrap_socket(raw, server_hostname=host)
        conn.request("GET", path, headers={"Host": f"{host}:{port}"})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def tls_context(topology, ca_file):
    """How the readiness check speaks to nginx: None over HTTP, else TLS verified by our CA."""
    if not topology.tls:
        return None
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    # A certificate of the user's own may chain to a CA this machine does not hold; the check
    # only asks whether our nginx on loopback serves, so it does not verify that one.
    return ssl._create_unverified_context()


def wait_ready(topology, supervisord, ca_file=None):
    """Wait until Gunicorn and every Daphne answer /healthz through nginx."""
    tls = tls_context(topology, ca_file)
    deadline = time.monotonic() + READY_TIMEOUT
    checks = [(topology.app_host, "/healthz")]
    # Several Daphne processes: nginx takes turns, so ask as many times as there are.
    checks += [(topology.realtime_host, "/ws/healthz")] * topology.asgi_processes
    while time.monotonic() < deadline and supervisord.poll() is None:
        if all(answers(topology.public_port, host, path, tls) for host, path in checks) and (
            not topology.redis_sentinel or sentinel.ready(topology)
        ):
            return True
        time.sleep(0.3)
    return False


TIPS = {
    "cross-domain": (
        "The panel's first socket goes to the realtime host with no credential: you are\n"
        "  anonymous there (the cookie stays on the app host). The next ones bring a\n"
        "  single-use ticket in Sec-WebSocket-Protocol (the way to copy), then the seed's\n"
        "  ?session_key= fallback: you are known again."
    ),
    "same-domain": (
        "The panel opens sockets through nginx's /ws/ (and over plain HTTP straight to\n"
        "  Daphne's own port): the cookie reaches both, since cookies ignore ports."
    ),
    "subdomain": (
        "The session cookie is scoped to {domain}, so it reaches the socket host too:\n"
        "  the panel's socket is known by its cookie alone. (It reaches every other\n"
        "  subdomain too: the cost of this mode.)"
    ),
}


def banner(topology, user, password, ca_file=None):
    tip = TIPS[topology.mode].format(domain=topology.cookie_domain)
    return (
        f"\nReady: {topology.mode}, pages from Gunicorn, sockets from "
        f"{topology.asgi_processes} Daphne process(es).\n"
        f"  Open    {topology.app_origin}/\n"
        f"  Log in  {user} / {password}   (demo user, local runs only)\n"
        f"  Sockets {topology.socket_base}/ws/\n"
        f"  {tip}\n"
        f"{tls_tip(topology, ca_file)}"
        f"  Data    {engines(topology)}\n"
        f"  Metrics http://{topology.bind_address}:{topology.metrics_port}/metrics"
        " (never through nginx; README: Monitoring)\n"
        f"  Logs    {topology.state_dir / 'log'}\n"
        f"  Stop    Ctrl-C\n"
    )


def engines(topology):
    """Where the data lives: the database, and Redis (with its Sentinels in HA mode)."""
    if os.environ.get("DATABASE_URL"):
        database = "the database at DATABASE_URL"
    elif topology.database == "postgres":
        database = f"PostgreSQL on 127.0.0.1:{topology.postgres_port}"
    else:
        database = f"SQLite in {topology.state_dir / 'db.sqlite3'}"
    redis = f"Redis on 127.0.0.1:{topology.redis_port}"
    if topology.redis_sentinel:
        sentinels = ", ".join(str(port) for port in topology.sentinel_ports)
        redis += f" (replica {topology.redis_replica_port}, Sentinels {sentinels})"
    return f"{database}; {redis}"


def tls_tip(topology, ca_file):
    """How to try HTTPS by hand: a browser that trusts this certificate, or the CA to trust."""
    if not topology.tls:
        return ""
    redirect = f"http://{topology.app_host}:{topology.public_http_port}/"
    if ca_file is None:
        return f"  HTTPS   your certificate {topology.tls_certificate}; {redirect} redirects\n"
    profile, spki = topology.state_dir / "chromium", spki_hash(topology.tls_certificate)
    return (
        f"  HTTPS   certificate from a local CA made for this stack: {ca_file}\n"
        f"          {redirect} redirects to HTTPS, and HSTS is sent (your browser remembers it).\n"
        f"          Chromium trusting this certificate only, in a profile of its own:\n"
        f"            chromium --user-data-dir={profile} \\\n"
        f"              --ignore-certificate-errors-spki-list={spki} \\\n"
        f"              {topology.app_origin}/\n"
        f"          Or trust the CA: Chromium on Linux reads the NSS database (libnss3-tools),\n"
        f"            certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n split-channels -i {ca_file}\n"
        f"          and Firefox imports it in Settings, Certificates, Authorities.\n"
    )


if __name__ == "__main__":
    if not shutil.which("nginx") or not shutil.which("redis-server"):
        sys.exit("nginx and redis-server are needed: sudo apt-get install nginx redis-server")
    sys.exit(main())
