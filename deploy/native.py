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
import subprocess
import sys
import time
from pathlib import Path

from django.template import Context, Engine

from shared_settings.topology import DRAIN_SECONDS, LIMITS, ROOT, TOPOLOGY

READY_TIMEOUT = 60
# A stopping Daphne process drains for WS_DRAIN_SECONDS, then waits up to 3 s for the last
# closes (asgi_site/server.py): supervisord waits that long and this margin before SIGKILL.
STOP_MARGIN = 5
VENV_BIN = Path(sys.executable).parent


def main():
    topology = TOPOLOGY
    check_ports(topology)
    state, log = topology.state_dir, topology.state_dir / "log"
    for folder in (log, state / "redis", state / "nginx"):
        folder.mkdir(parents=True, exist_ok=True)
    env = child_env(topology)
    render_configs(topology)

    manage = [sys.executable, str(ROOT / "wsgi_site" / "manage.py")]
    subprocess.run([*manage, "collectstatic", "--noinput", "-v0"], env=env, check=True)
    subprocess.run([str(ROOT / "deploy" / "migrate.sh")], env=env, check=True)

    supervisord = subprocess.Popen(
        [str(VENV_BIN / "supervisord"), "-c", str(state / "supervisord.conf")], env=env
    )

    def stop(signum, frame):
        supervisord.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if wait_ready(topology, supervisord):
        print(banner(topology, env["DEMO_USER"], env["DEMO_PASSWORD"]), flush=True)
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
    }
    ports.update({f"DAPHNE_PORT (+{i})": p for i, p in enumerate(topology.daphne_ports)})
    for name, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((topology.bind_address, port))
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
    env.setdefault("DEMO_USER", "demo")
    env.setdefault("DEMO_PASSWORD", "demo-pass")
    return env


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


def render_configs(topology):
    for template, target in [
        ("nginx/native.conf.template", "nginx.conf"),
        ("deploy/supervisord.conf.template", "supervisord.conf"),
    ]:
        (topology.state_dir / target).write_text(render(template, topology))


def answers(port, host, path):
    """True if nginx, asked for `host`, answers 200 on `path`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}"})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_ready(topology, supervisord):
    """Wait until Gunicorn and every Daphne answer /healthz through nginx."""
    deadline = time.monotonic() + READY_TIMEOUT
    checks = [(topology.app_host, "/healthz")]
    # Several Daphne processes: nginx takes turns, so ask as many times as there are.
    checks += [(topology.realtime_host, "/ws/healthz")] * topology.asgi_processes
    while time.monotonic() < deadline and supervisord.poll() is None:
        if all(answers(topology.public_port, host, path) for host, path in checks):
            return True
        time.sleep(0.3)
    return False


def banner(topology, user, password):
    url = f"{topology.app_origin}/"
    if topology.cross_domain:
        tip = (
            "The panel's first socket goes to the realtime host with no credential: you are\n"
            "  anonymous there (the cookie stays on the app host). The next ones bring a\n"
            "  single-use ticket in Sec-WebSocket-Protocol (the way to copy), then the seed's\n"
            "  ?session_key= fallback: you are known again."
        )
    else:
        tip = (
            "The panel opens sockets through nginx's /ws/ and straight to Daphne's own port:\n"
            "  the cookie reaches both, since cookies ignore ports."
        )
    return (
        f"\nReady: {topology.mode}, pages from Gunicorn, sockets from "
        f"{topology.asgi_processes} Daphne process(es).\n"
        f"  Open    {url}\n"
        f"  Log in  {user} / {password}   (demo user, local runs only)\n"
        f"  Sockets {topology.socket_base}/ws/\n"
        f"  {tip}\n"
        f"  Logs    {topology.state_dir / 'log'}\n"
        f"  Stop    Ctrl-C\n"
    )


if __name__ == "__main__":
    if not shutil.which("nginx") or not shutil.which("redis-server"):
        sys.exit("nginx and redis-server are needed: sudo apt-get install nginx redis-server")
    sys.exit(main())
