"""
The harness tests and benchmarks share: a real stack, the native runtime (deploy/native.py,
what `make up-*` runs) on free ports and its own STATE_DIR, started and stopped as a context
manager, plus the clients a browser would be: requests for pages, websockets for sockets,
each naming the host in the URL and connecting to 127.0.0.1.

    with Stack("cross-domain", tmp_path) as stack:
        session, key = stack.login()

Stack("subdomain", tmp_path, scheme="https") runs it over TLS: its clients then verify the
certificate against the CA the runtime made for it (Stack.ca_file), and nothing else.
"""

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import requests
import websockets
from prometheus_client.parser import text_string_to_metric_families
from requests.adapters import HTTPAdapter

ROOT = Path(__file__).resolve().parent.parent
DEMO_USER, DEMO_PASSWORD = "demo", "demo-pass"
# Stack.new_sessions, run by manage.py shell.
NEW_SESSIONS = """
import os
from importlib import import_module
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth import get_user_model
user = get_user_model().objects.get(username=os.environ["USERNAME"])
for _ in range(int(os.environ["COUNT"])):
    session = import_module(settings.SESSION_ENGINE).SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    print("new-session", session.session_key)
"""
# A stack's ports, from its base: nginx +0 (HTTPS when PUBLIC_SCHEME=https), its plain-HTTP
# redirect +2, metrics +3, Gunicorn +1, Daphne +10.., Redis +20 (in Sentinel mode: replica +21,
# Sentinels +22..+24), PostgreSQL +25.
PORT_SPAN = 26
T = TypeVar("T")
# Tests and benchmarks drive hundreds of sockets, logins and posts from one address, as no
# real client does, so their stacks raise the per-address and per-user limits; the tests of
# the limits themselves pass limits={} (the defaults) or their own.
LOAD = {
    "LIMIT_LOGIN_RATE": "100r/s",
    "LIMIT_LOGIN_BURST": 1000,
    "LIMIT_ANNOUNCE_RATE": "1000r/s",
    "LIMIT_ANNOUNCE_BURST": 10000,
    "LIMIT_TICKET_RATE": "1000r/s",
    "LIMIT_TICKET_BURST": 20000,
    "LIMIT_SOCKET_RATE": "1000r/s",
    "LIMIT_SOCKET_BURST": 20000,
    "LIMIT_SOCKET_CONNECTIONS": 20000,
    "WS_MAX_SOCKETS_PER_USER": 20000,
}
# A credential's name followed by a value, in a query string or as a subprotocol, plain or
# %-encoded: no log may hold one, whatever the value (a key or ticket never recorded too).
LOGGED_CREDENTIAL = re.compile(r"(?:session_key|ticket)(?:=|%3d|\.)(?!\s)[^\s\"'&]", re.IGNORECASE)


def secret_variants(secret: str) -> set[str]:
    """The forms a secret may take in a log: as sent, upper case, %-encoded (in part or all)."""
    variants = {secret, secret.upper(), urllib.parse.quote(secret, safe="")}
    for hex_format in ("%{:02x}", "%{:02X}"):
        variants.add("".join(hex_format.format(b) for b in secret.encode()))
    return {v for v in variants if v}


def leaked_secrets(secrets: Iterable[str], logs: dict[str, str]) -> list[str]:
    """Every (log file, what it holds) that shows a secret or a credential's value."""
    found = []
    for name, text in logs.items():
        folded = text.casefold()
        for secret in secrets:
            for variant in secret_variants(secret):
                # Upper-case variants are matched as written, %-encodings in either case.
                hit = variant.casefold() in folded if "%" in variant else variant in text
                if hit:
                    found.append(f"{name}: a form of a recorded secret ({len(secret)} chars)")
                    break
        found += [f"{name}: {m.group(0)!r}..." for m in LOGGED_CREDENTIAL.finditer(text)]
    return found


def wait_until(condition: Callable[[], T], timeout: float, message: str, interval=0.05) -> T:
    """Return condition()'s first truthy value within `timeout` seconds, else fail."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (waited {timeout} s)")
        time.sleep(interval)
    return value


class LoopbackAdapter(HTTPAdapter):
    """
    Connect to 127.0.0.1 whatever host the URL names, as a browser with --host-resolver-rules
    does: cookies follow the named host's rules, and over HTTPS the certificate is checked
    against that name.
    """

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        name, host_params["host"] = host_params["host"], "127.0.0.1"
        if host_params["scheme"] == "https":
            pool_kwargs.update(server_hostname=name, assert_hostname=name)
        return host_params, pool_kwargs


# Each mode's hosts, as the topology defaults them: every name under .localhost is this machine.
HOSTS = {
    "same-domain": ("app.localhost", "app.localhost"),
    "cross-domain": ("app.localhost", "realtime.localhost"),
    "subdomain": ("app.split.localhost", "rt.split.localhost"),
}


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """A base port whose whole span is free now: two test runs on one machine never collide."""
    for _ in range(200):
        base = random.randrange(20000, 45000, 100)
        if all(port_is_free(base + i) for i in range(PORT_SPAN)):
            return base
    raise RuntimeError("no free block of ports between 20000 and 45000")


# Run as root, a PostgreSQL stack's state lives here: see reachable_state_dir.
POSTGRES_STACKS = Path(tempfile.gettempdir()) / "split-stacks"


def reachable_state_dir(state_dir: Path) -> Path:
    """
    Where a PostgreSQL stack keeps its state. Run as root, the runtime starts PostgreSQL as
    the postgres user, which must reach STATE_DIR, and pytest keeps its folders 0700 (and
    makes them so again at each session's start, a race with a stack already running). So
    such a stack's state lives in a folder of its own in POSTGRES_STACKS, traversable (not
    listable) by others, which `state_dir/state` links to; a stack started again on the same
    state_dir finds it there. Folders whose link is gone (pytest removed old runs) go.
    """
    if os.geteuid() != 0 or state_dir.parent == POSTGRES_STACKS:
        return state_dir
    link = state_dir / "state"
    if link.is_symlink():
        return link.resolve()
    POSTGRES_STACKS.mkdir(mode=0o711, exist_ok=True)
    for folder in POSTGRES_STACKS.iterdir():
        owner = folder / "owner"
        if owner.exists() and not Path(owner.read_text()).is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
    own = Path(tempfile.mkdtemp(prefix=f"{state_dir.name}-", dir=POSTGRES_STACKS))
    own.chmod(0o701)
    state_dir.mkdir(parents=True, exist_ok=True)
    link.symlink_to(own)
    (own / "owner").write_text(str(link))  # after the link: a folder without one is not judged
    return own


class Stack:
    """A running split deployment; `with Stack(...) as stack:` starts it and stops it."""

    def __init__(
        self,
        mode,
        state_dir,
        *,
        port=None,
        asgi_processes=2,
        env=None,
        limits=LOAD,
        scheme="http",
    ):
        base_port = port or free_base_port()
        self.mode = mode
        self.scheme = scheme
        self.state_dir = Path(state_dir)
        self.public_port = base_port
        self.gunicorn_port = base_port + 1
        self.daphne_ports = [base_port + 10 + i for i in range(asgi_processes)]
        self.http_port = base_port + 2
        self.metrics_port = base_port + 3
        self.redis_port = base_port + 20
        self.postgres_port = base_port + 25
        self.app_host, self.realtime_host = HOSTS[mode]
        self.env = dict(
            os.environ,
            SPLIT_MODE=mode,
            PUBLIC_SCHEME=scheme,
            PUBLIC_PORT=str(self.public_port),
            GUNICORN_PORT=str(self.gunicorn_port),
            DAPHNE_PORT=str(self.daphne_ports[0]),
            ASGI_PROCESSES=str(asgi_processes),
            REDIS_PORT=str(self.redis_port),
            PUBLIC_HTTP_PORT=str(self.http_port),
            METRICS_PORT=str(self.metrics_port),
            POSTGRES_PORT=str(self.postgres_port),
            STATE_DIR=str(self.state_dir),
            # Every stack's database: STACK_DATABASE (sqlite or postgres; `make test` runs the
            # stack suites once more with postgres), unless the test names one (env=).
            DATABASE=os.environ.get("STACK_DATABASE", "sqlite"),
        )
        self.env.pop("SECRET_KEY", None)  # the runtime makes its own under STATE_DIR...
        self.env.update({k: str(v) for k, v in limits.items()})
        self.env.update({k: str(v) for k, v in (env or {}).items()})  # ...unless a test gives one
        self.database = self.env["DATABASE"]
        self.process = None
        self.output = []
        self.secrets = set()  # every key or ticket a test sent: none may reach a log

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def app_origin(self):
        return f"{self.scheme}://{self.app_host}:{self.public_port}"

    @property
    def realtime_origin(self):
        return f"{self.scheme}://{self.realtime_host}:{self.public_port}"

    @property
    def ws_scheme(self):
        return "wss" if self.scheme == "https" else "ws"

    @property
    def ca_file(self):
        """The local CA the runtime made (PUBLIC_SCHEME=https): clients trust it, and only it."""
        return self.state_dir / "tls" / "ca.pem"

    def ssl_context(self):
        """For websockets over TLS: verify the certificate against this stack's CA alone."""
        return ssl.create_default_context(cafile=self.ca_file) if self.scheme == "https" else None

    def start(self, command=None, timeout=90):
        command = command or [sys.executable, "-m", "deploy.native"]
        if self.database == "postgres":
            self.state_dir = reachable_state_dir(self.state_dir)
            self.env["STATE_DIR"] = str(self.state_dir)
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        ready = threading.Event()

        def pump():
            for line in self.process.stdout:
                self.output.append(line)
                if line.startswith("Ready:"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("stack did not start:\n" + "".join(self.output[-40:]))
        return self

    def stop(self, timeout=15):
        """SIGTERM the runner, as Ctrl-C or a service manager would; return seconds taken."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return time.monotonic() - began

    def leftover_processes(self):
        """Processes still alive in the stack's session: everything it started, workers too."""
        ps = subprocess.run(
            ["ps", "-eww", "-o", "pid=,sid=,args="], capture_output=True, text=True, check=True
        ).stdout
        rows = (line.split(None, 2) for line in ps.splitlines())
        return [args for pid, sid, args in rows if int(sid) == self.process.pid]

    @property
    def daphne_programs(self):
        return [f"asgi-{i + 1}" for i in range(len(self.daphne_ports))]

    def supervisorctl(self, *args):
        """Ask the stack's supervisord (e.g. "restart", "asgi-1"), as an operator would."""
        command = [
            str(Path(sys.executable).parent / "supervisorctl"),
            "-c",
            str(self.state_dir / "supervisord.conf"),
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def log_files(self):
        """Every log the stack wrote, by file name: nginx, Gunicorn, Daphne, Redis, supervisord."""
        return {
            p.name: p.read_text(errors="replace")
            for p in sorted((self.state_dir / "log").glob("*"))
            if p.is_file()
        }

    def log_text(self):
        return "\n".join(self.log_files().values())

    def assert_no_secrets_logged(self):
        """
        No log holds a recorded secret (a key or ticket a test sent, forged ones too) as sent,
        upper-cased or %-encoded, nor any credential's value after `session_key=`/`ticket=`.
        """
        logs = self.log_files()
        assert logs and any(logs.values()), "no logs were written: nothing to prove"
        leaked = leaked_secrets(self.secrets, logs)
        assert not leaked, "credentials reached the logs:\n" + "\n".join(leaked[:20])

    # HTTP, as the browser on APP_HOST.

    def url(self, path, host=None, port=None):
        return f"{self.scheme}://{host or self.app_host}:{port or self.public_port}{path}"

    def http(self, session, method, path, host=None, **kwargs):
        """A request to `host` (the app host by default) through 127.0.0.1, TLS verified."""
        host = host or self.app_host
        headers = {"Host": f"{host}:{self.public_port}", **kwargs.pop("headers", {})}
        if not isinstance(session.adapters.get(f"{self.scheme}://"), LoopbackAdapter):
            session.mount(f"{self.scheme}://", LoopbackAdapter())
        if self.scheme == "https":
            kwargs.setdefault("verify", str(self.ca_file))
        return session.request(
            method,
            self.url(path, host),
            headers=headers,
            allow_redirects=False,
            timeout=kwargs.pop("timeout", 10),
            **kwargs,
        )

    def login(self, username=DEMO_USER, password=DEMO_PASSWORD):
        """Log in through the real login form; return the requests session and its key."""
        session = requests.Session()
        page = self.http(session, "GET", "/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = self.http(
            session,
            "POST",
            "/accounts/login/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": token},
            headers={"Origin": self.app_origin},  # as a browser's form sends it
        )
        assert response.status_code == 302, response.text
        key = session.cookies["sessionid"]
        self.secrets.add(key)
        return session, key

    def ticket(self, session, path="/ws/whoami/"):
        """Mint a ticket over HTTP; return it (and remember it: it must reach no log)."""
        response = self.csrf_post(session, "/ws-ticket/", json={"path": path})
        assert response.status_code == 200, response.text
        ticket = response.json()["ticket"]
        self.secrets.add(ticket)
        return ticket

    def manage(self, *args, **env):
        """Run wsgi_site/manage.py against this stack's database."""
        # The runtime writes STATE_DIR/secret-key only when the stack was given no SECRET_KEY.
        secret = self.env.get("SECRET_KEY") or (self.state_dir / "secret-key").read_text().strip()
        environment = {k: v for k, v in self.env.items() if k != "DJANGO_SETTINGS_MODULE"}
        environment.update(SECRET_KEY=secret, **env)
        return subprocess.run(
            [sys.executable, str(ROOT / "wsgi_site" / "manage.py"), *args],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def new_sessions(self, count, username=DEMO_USER):
        """
        `count` new logged-in sessions of `username`, made as a login makes them but without
        its password hashing, in one manage.py process; return their keys (remembered: they
        must reach no log).
        """
        made = self.manage("shell", "-c", NEW_SESSIONS, USERNAME=username, COUNT=str(count))
        # The shell may print more than we do (Django 5.2 says what it imported).
        keys = [line.split()[1] for line in made.splitlines() if line.startswith("new-session ")]
        self.secrets.update(keys)
        return keys

    def metrics(self):
        """What the metrics exporter serves now (Prometheus text), from every process."""
        response = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        response.raise_for_status()
        return response.text

    def metric(self, name, **labels):
        """The sample `name` with exactly `labels`, as the exporter serves it now; 0 if none."""
        return sum(
            sample.value
            for family in text_string_to_metric_families(self.metrics())
            for sample in family.samples
            if sample.name == name and sample.labels == labels
        )

    def create_user(self, username, password):
        self.manage("demo_user", username, password)

    def csrf_post(self, session, path, **kwargs):
        token = session.cookies.get("csrftoken") or self._csrf_token(session)
        # With the Origin a browser's fetch() sends: over HTTPS Django wants it (or a Referer).
        headers = {"X-CSRFToken": token, "Origin": self.app_origin, **kwargs.pop("headers", {})}
        return self.http(session, "POST", path, headers=headers, **kwargs)

    def _csrf_token(self, session):
        self.http(session, "GET", "/")
        return session.cookies["csrftoken"]

    # Sockets, as the browser would open them.

    def ws_url(self, path, host=None):
        return f"{self.ws_scheme}://{host or self.realtime_host}:{self.public_port}{path}"

    def connect(self, path, host=None, origin=None, cookie=None, port=None, **kwargs):
        """
        websockets.connect to `host` by name, through 127.0.0.1, with a browser's Origin;
        further keywords (subprotocols=...) go to websockets.connect.
        """
        headers = {}
        if cookie:
            headers["Cookie"] = cookie
        origin = self.app_origin if origin is None else origin
        port = port or self.public_port
        # TLS ends at nginx: a Daphne process's own port speaks plain ws://.
        scheme = self.ws_scheme if port == self.public_port else "ws"
        url = f"{scheme}://{host or self.realtime_host}:{port}{path}"
        kwargs.setdefault("open_timeout", 10)
        if scheme == "wss":
            kwargs.setdefault("ssl", self.ssl_context())
        return websockets.connect(
            url,
            host="127.0.0.1",
            port=port,
            origin=origin or None,
            additional_headers=headers,
            **kwargs,
        )

    def whoami(self, query="", **kwargs):
        """Open /ws/whoami/ and return its frame, or the HTTP status that refused it."""

        async def run():
            path = "/ws/whoami/" + (f"?{query}" if query else "")
            try:
                async with self.connect(path, **kwargs) as ws:
                    return json.loads(await asyncio.wait_for(ws.recv(), 10))
            except websockets.InvalidStatus as exc:
                return exc.response.status_code

        return asyncio.run(run())
