"""
The compose deployment, checked statically (no Docker engine runs here): docker-compose
accepts every combination, and what it renders agrees with the native runtime the other
tests run: the same routes, the same environment, the same commands, the same log format,
the same TLS. The pieces that can run without an engine run for real: deploy/up.sh (with a
stand-in docker client), the postgres healthcheck, a Sentinel's config, the proxy's logs.
"""

import configparser
import hashlib
import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
import yaml

from deploy import envfiles, native
from shared_settings.topology import Topology
from tests.stack import ROOT, free_base_port, wait_until

MODES = ["same-domain", "cross-domain", "subdomain"]
# The overlay each mode uses (deploy/up.sh): subdomain mode routes as cross-domain does, and
# its env file scopes the session cookie to the parent domain.
OVERLAY = {
    "same-domain": "same-domain",
    "cross-domain": "cross-domain",
    "subdomain": "cross-domain",
}
TOPOLOGY_FIELDS = [
    "mode",
    "scheme",
    "app_host",
    "realtime_host",
    "public_port",
    "app_origin",
    "realtime_origin",
    "allowed_origins",
    "socket_base",
    "cookie_domain",
]


def compose(*args, env_file, secret=True, extra=None):
    # Compose prefers the shell's variables to the env file's: give it none of ours, only
    # `extra`, as a user's exports.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **(extra or {})}
    if secret:
        env.update(SECRET_KEY="compose-config-check", POSTGRES_PASSWORD="compose-config-check")
    command = ["docker-compose", "--env-file", str(ROOT / "deploy" / env_file)]
    for name in args:
        command += ["-f", str(ROOT / "deploy" / name)]
    return subprocess.run([*command, "config"], env=env, capture_output=True, text=True)


def rendered(mode, tls=False, sentinel=False):
    """The config docker-compose renders, with compose's $$ escapes undone."""
    files = ["compose.yaml", f"compose.{OVERLAY[mode]}.yaml"]
    if tls:
        files.append("compose.tls.yaml")
    if sentinel:
        files.append("compose.sentinel.yaml")
    result = compose(*files, env_file=production_example(mode) if tls else f"{mode}.env")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout.replace("$$", "$"))


def env_file(name):
    """{KEY: value} of one of deploy/'s env files."""
    lines = (ROOT / "deploy" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def production_example(mode):
    """The name of the production env file example for `mode`."""
    examples = {
        env_file(path.name)["SPLIT_MODE"]: path.name
        for path in (ROOT / "deploy").glob("production*.env.example")
    }
    assert mode in examples, f"no deploy/production*.env.example has SPLIT_MODE={mode}"
    return examples[mode]


def native_topology(mode, tmp_path):
    return Topology.from_env({"SPLIT_MODE": mode, "STATE_DIR": str(tmp_path)})


@pytest.mark.parametrize("mode", MODES)
def test_compose_accepts_base_with_each_overlay(mode):
    services = rendered(mode)["services"]
    assert set(services) == {"nginx-proxy", "redis", "postgres", "migrate", "wsgi", "asgi"}


@pytest.mark.parametrize("mode", MODES)
def test_compose_accepts_the_tls_overlay(mode):
    config = rendered(mode, tls=True)
    services = config["services"]
    assert "acme-companion" in services
    assert services["wsgi"]["environment"]["LETSENCRYPT_HOST"] == "www.example.com"
    published = {p["target"] for p in services["nginx-proxy"]["ports"]}
    assert published == {80, 443}
    topology = Topology.from_env(services["asgi"]["environment"])
    assert topology.scheme == "https" and topology.socket_base.startswith("wss://")


@pytest.mark.parametrize("mode", [*MODES, "tls"])
def test_only_the_proxy_publishes_ports_and_every_service_has_a_healthcheck(mode):
    services = (
        rendered("cross-domain", tls=True)["services"]
        if mode == "tls"
        else rendered(mode)["services"]
    )
    assert [name for name, s in services.items() if s.get("ports")] == ["nginx-proxy"]
    assert [name for name, s in services.items() if not s.get("healthcheck", {}).get("test")] == []


def test_a_missing_production_secret_fails_loudly():
    result = compose(
        "compose.yaml", "compose.cross-domain.yaml", env_file="cross-domain.env", secret=False
    )
    assert result.returncode != 0
    assert "set SECRET_KEY" in result.stderr


def compose_routes(services):
    """{(host, path): half} as nginx-proxy will route them."""
    routes = {}
    for name in ("wsgi", "asgi"):
        env = services[name]["environment"]
        routes[(env["VIRTUAL_HOST"], env.get("VIRTUAL_PATH") or "/")] = name
    return routes


def native_routes(nginx_conf):
    """{(host, path): upstream} from the rendered native nginx config."""
    routes = {}
    for server in re.findall(r"server \{(.*?)\n    \}", nginx_conf, re.S):
        host = re.search(r"server_name (\S+);", server)
        for path, upstream in re.findall(r"location (\S+) \{\s*proxy_pass http://(\w+);", server):
            routes[(host.group(1), path)] = upstream
    return routes


@pytest.mark.parametrize("mode", MODES)
def test_compose_routes_what_native_nginx_routes(mode, tmp_path):
    native_conf = native.render("nginx/native.conf.template", native_topology(mode, tmp_path))
    expected = {
        "same-domain": {("app.localhost", "/"): "wsgi", ("app.localhost", "/ws/"): "asgi"},
        "cross-domain": {("app.localhost", "/"): "wsgi", ("realtime.localhost", "/"): "asgi"},
        "subdomain": {("app.split.localhost", "/"): "wsgi", ("rt.split.localhost", "/"): "asgi"},
    }
    assert native_routes(native_conf) == expected[mode]
    assert compose_routes(rendered(mode)["services"]) == expected[mode]


def test_same_domain_keeps_the_ws_prefix():
    asgi = rendered("same-domain")["services"]["asgi"]["environment"]
    assert asgi["VIRTUAL_PATH"] == "/ws/" and asgi["VIRTUAL_DEST"] == ""


def bind_mounts(service):
    """{target: source} of a service's bind mounts, in compose v1's short form or v2's long one."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        if source.startswith("/"):
            mounts[target] = source
    return mounts


@pytest.mark.parametrize("mode", MODES)
def test_socket_location_file_is_where_nginx_proxy_looks(mode):
    targets = bind_mounts(rendered(mode)["services"]["nginx-proxy"])
    name = {
        "same-domain": f"app.localhost_{hashlib.sha1(b'/ws/').hexdigest()}_location",
        "cross-domain": "realtime.localhost_location",
        "subdomain": "rt.split.localhost_location",
    }[mode]
    assert targets[f"/etc/nginx/vhost.d/{name}"] == str(ROOT / "nginx" / "socket-location.conf")


@pytest.mark.parametrize("mode", MODES)
def test_the_same_environment_reaches_django_in_both_runtimes(mode, tmp_path):
    services = rendered(mode)["services"]
    native_env = native.child_env(native_topology(mode, tmp_path))
    expected = native_topology(mode, tmp_path)
    for name in ("migrate", "wsgi", "asgi"):
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        assert set(expected.as_env()) <= set(env) and set(expected.as_env()) <= set(native_env)
        in_compose, in_native = Topology.from_env(env), Topology.from_env(native_env)
        for field in TOPOLOGY_FIELDS:
            assert (
                getattr(in_compose, field) == getattr(in_native, field) == getattr(expected, field)
            )


def test_env_files_are_written_from_the_topology():
    for name, spec in envfiles.FILES.items():
        committed = (ROOT / "deploy" / name).read_text()
        assert committed == envfiles.render(*spec), f"deploy/{name} is stale: run make env-files"


def test_start_commands_are_the_native_ones(tmp_path):
    services = rendered("cross-domain")["services"]
    commands = {name: services[name]["command"] for name in ("migrate", "wsgi", "asgi")}
    assert commands == {
        "migrate": ["deploy/migrate.sh"],
        "wsgi": ["deploy/start-wsgi.sh"],
        "asgi": ["deploy/start-asgi.sh"],
    }
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'CMD ["deploy/start-wsgi.sh"]' in dockerfile
    supervisord = configparser.ConfigParser(interpolation=None)
    supervisord.read_string(
        native.render("deploy/supervisord.conf.template", native_topology("cross-domain", tmp_path))
    )
    assert supervisord["program:wsgi"]["command"] == f"{ROOT}/deploy/start-wsgi.sh"
    assert supervisord["program:asgi-1"]["command"] == f"{ROOT}/deploy/start-asgi.sh"
    assert '"deploy" / "migrate.sh"' in (ROOT / "deploy" / "native.py").read_text()


def test_proxy_log_format_is_the_native_one():
    log_format = rendered("cross-domain")["services"]["nginx-proxy"]["environment"]["LOG_FORMAT"]
    assert log_format == (ROOT / "nginx" / "access-log-format").read_text().strip()
    assert "$uri" in log_format and "$request " not in log_format and "$args" not in log_format


PROXY_CONF = """
pid {dir}/nginx.pid;
error_log {dir}/error.log crit;
events {{ }}
http {{
    log_format vhost '{log_format}';
    access_log {dir}/access.log vhost;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{daphne};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
        }}
    }}
}}
"""


def test_proxy_log_format_in_real_nginx_keeps_the_session_key_out(cross_stack, tmp_path):
    """nginx-proxy's LOG_FORMAT, loaded into a real nginx before a real Daphne."""
    log_format = rendered("cross-domain")["services"]["nginx-proxy"]["environment"]["LOG_FORMAT"]
    port = 18050
    (tmp_path / "nginx.conf").write_text(
        PROXY_CONF.format(
            dir=tmp_path, log_format=log_format, port=port, daphne=cross_stack.daphne_ports[0]
        )
    )
    nginx = subprocess.Popen(
        [
            "nginx",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            "daemon off;",
        ]
    )
    try:
        session, key = cross_stack.login()
        wait_until((tmp_path / "nginx.pid").exists, 10, "nginx did not start")
        frame = cross_stack.whoami(query=f"session_key={key}", port=port)
        assert frame["user"] == "demo"
    finally:
        nginx.terminate()
        nginx.wait(10)
    log = (tmp_path / "access.log").read_text()
    assert '"GET /ws/whoami/ HTTP/1.1" 101' in log
    assert key not in log and "session_key" not in log


QUIET_ERROR_LOG = ROOT / "nginx" / "server-error-log.conf"


@pytest.mark.parametrize("mode", [*MODES, "tls"])
def test_every_virtual_host_includes_the_quiet_error_log(mode):
    """
    nginx-proxy includes vhost.d/<VIRTUAL_HOST> in that host's server block, else
    vhost.d/default: the quiet error log is mounted as the default, and no host has a file of
    its own that would take its place. No conf.d file sets an error log (at http level it
    would only add to the template's own).
    """
    services = rendered("cross-domain", tls=True)["services"] if mode == "tls" else None
    services = services or rendered(mode)["services"]
    mounts = bind_mounts(services["nginx-proxy"])
    assert mounts["/etc/nginx/vhost.d/default"] == str(QUIET_ERROR_LOG)
    hosts = {services[name]["environment"]["VIRTUAL_HOST"] for name in ("wsgi", "asgi")}
    assert not [host for host in hosts if f"/etc/nginx/vhost.d/{host}" in mounts]
    assert not [target for target in mounts if target.startswith("/etc/nginx/conf.d/")]
    directives = [
        line.strip()
        for line in QUIET_ERROR_LOG.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert directives == ["error_log /dev/stderr crit;"]
    if mode == "tls":
        # acme-companion leaves vhost.d to us: nginx-proxy serves the ACME challenge itself.
        assert services["acme-companion"]["environment"]["ACME_HTTP_CHALLENGE_LOCATION"] == "false"


# nginx-proxy's structure: the image's nginx.conf sets the main error log (error.log, a link
# to stderr, at notice level) and includes conf.d/*.conf at http level, where the template
# renders default.conf: its own http-level error_log, a fallback server for unknown hosts,
# and one server per VIRTUAL_HOST that includes vhost.d/<host>, else vhost.d/default.
PROXY_MIMIC = """
pid {dir}/nginx.pid;
error_log /dev/stderr notice;
events {{ }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    {template_error_log}
    include {etc}/conf.d/*.conf;
    server {{
        server_name _;
        listen 127.0.0.1:{port};
        return 503;
    }}
{servers}}}
"""
PROXY_MIMIC_SERVER = """
    server {{
        server_name {host};
        listen 127.0.0.1:{port};
        {include}
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
        }}
    }}
"""
# What was mounted before: an http-level file in conf.d.
OLD_MOUNTS = {"/etc/nginx/conf.d/proxy-error-log.conf": "error_log /dev/stderr crit;\n"}


def run_proxy_mimic(tmp_path, files, hosts, template_error_log):
    """
    Lay out `files` ({target: text}) under tmp_path as they sit in the container, run a real
    nginx with nginx-proxy's structure before a closed port, and send every host, and an
    unknown one, a request whose URL holds a session key. Return (statuses, what nginx wrote
    to stderr, the session key).
    """
    etc = tmp_path / "etc" / "nginx"
    (etc / "conf.d").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    for target, text in files.items():
        path = tmp_path / target.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def server_include(host):
        for name in (host, "default"):
            if (etc / "vhost.d" / name).exists():
                return f"include {etc / 'vhost.d' / name};"
        return ""

    base = free_base_port()
    port, closed = base, base + 1
    servers = "".join(
        PROXY_MIMIC_SERVER.format(
            host=host, port=port, include=server_include(host), upstream=closed
        )
        for host in sorted(hosts)
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        PROXY_MIMIC.format(
            dir=tmp_path,
            etc=etc,
            port=port,
            servers=servers,
            template_error_log="error_log /dev/stderr;" if template_error_log else "",
        )
    )
    command = ["nginx", "-p", str(tmp_path), "-c", str(conf), "-e", "/dev/stderr"]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    key = "s3cr3tk3y" + os.urandom(8).hex()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("ab") as stderr:
        nginx = subprocess.Popen([*command, "-g", "daemon off;"], stderr=stderr)
    try:
        # nginx -t leaves an empty pid file: wait for the running nginx to fill it.
        pid = tmp_path / "nginx.pid"
        wait_until(lambda: pid.exists() and pid.read_text().strip(), 10, "nginx did not start")
        statuses = {}
        for host in [*sorted(hosts), "unknown.example"]:
            url = f"http://127.0.0.1:{port}/ws/live/?session_key={key}"
            statuses[host] = requests.get(url, headers={"Host": host}, timeout=10).status_code
    finally:
        nginx.terminate()
        nginx.wait(10)
    return statuses, stderr_path.read_text(), key


def proxy_files(services):
    """The nginx-proxy bind mounts under /etc/nginx/, as {target: text}."""
    mounts = bind_mounts(services["nginx-proxy"])
    return {t: open(s).read() for t, s in mounts.items() if t.startswith("/etc/nginx/")}


@pytest.mark.parametrize("template_error_log", [True, False], ids=["template-log", "main-log"])
@pytest.mark.parametrize("mode", MODES)
def test_proxy_error_log_in_real_nginx_keeps_the_session_key_out(
    mode, template_error_log, tmp_path
):
    """
    The rendered compose mounts, in a real nginx laid out as nginx-proxy: an upstream that
    refuses (Daphne restarting) on every host leaves no session key in the error log, whether
    the inherited error log is the template's http-level one or only the main one.
    """
    services = rendered(mode)["services"]
    hosts = {services[name]["environment"]["VIRTUAL_HOST"] for name in ("wsgi", "asgi")}
    statuses, stderr, key = run_proxy_mimic(
        tmp_path, proxy_files(services), hosts, template_error_log
    )
    assert statuses == {**{host: 502 for host in hosts}, "unknown.example": 503}
    assert key not in stderr and "session_key" not in stderr


def test_proxy_mimic_sees_the_key_with_the_old_conf_d_file(tmp_path):
    """
    The control: the old mount, an http-level error_log in conf.d, only adds to the
    template's, so the upstream error prints with the request line, key and all.
    """
    statuses, stderr, key = run_proxy_mimic(
        tmp_path, OLD_MOUNTS, {"app.localhost", "realtime.localhost"}, template_error_log=True
    )
    assert statuses["realtime.localhost"] == 502
    assert f"GET /ws/live/?session_key={key}" in stderr


def test_compose_waits_for_the_daphne_drain_as_supervisord_does(tmp_path):
    """A stopping Daphne drains (asgi_site/server.py): neither runtime SIGKILLs it sooner."""
    asgi = rendered("cross-domain")["services"]["asgi"]
    supervisord = configparser.ConfigParser(interpolation=None)
    supervisord.read_string(
        native.render("deploy/supervisord.conf.template", native_topology("cross-domain", tmp_path))
    )
    waits = int(supervisord["program:asgi-1"]["stopwaitsecs"])
    grace = asgi["stop_grace_period"]
    grace = int(grace.rstrip("s")) if isinstance(grace, str) else int(grace)
    drain = float(asgi["environment"]["WS_DRAIN_SECONDS"])
    assert waits >= drain + 3 + 2 and grace >= waits
    assert int(supervisord["program:wsgi"]["stopwaitsecs"]) == 5


FAKE_DOCKER = """#!/usr/bin/env bash
# Stands in for the Docker client (no engine runs here): records what up.sh asked of it.
[[ $1 == info ]] && exit 1
{ printf '%s\\n' "$@"; echo ---; env; } > "$DOCKER_RECORD"
"""


def run_up(tmp_path, mode, **exported):
    """Run the real deploy/up.sh with a fake `docker` first on PATH; return (result, args, env)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    record = tmp_path / "docker-call"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/"),
        "DOCKER_RECORD": str(record),
        "RUNTIME": "docker",
        "SECRET_KEY": "up-sh-check",
        **exported,
    }
    result = subprocess.run(
        [str(ROOT / "deploy" / "up.sh"), mode], env=env, capture_output=True, text=True
    )
    if not record.exists():
        return result, [], {}
    args, _, env_text = record.read_text().partition("---\n")
    seen = dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    return result, args.splitlines(), seen


def test_up_sh_keeps_what_the_user_exported(tmp_path):
    """README step 3: `ASGI_REPLICAS=3 make up-cross-domain` runs three Daphne containers."""
    result, args, seen = run_up(tmp_path, "cross-domain", ASGI_REPLICAS="3", PUBLIC_PORT="9000")
    assert result.returncode == 0, result.stderr
    assert args[args.index("--scale") + 1] == "asgi=3"
    assert seen["PUBLIC_PORT"] == "9000"
    assert "http://app.localhost:9000/" in result.stdout
    # What nobody exported comes from the env file, through --env-file.
    assert args[:3] == ["compose", "--env-file", "deploy/cross-domain.env"]
    assert "APP_HOST" not in seen


def test_postgres_healthcheck_waits_for_tcp(tmp_path):
    """
    The image's first-run init serves on the Unix socket only; the sites connect over TCP.
    The healthcheck, run against a real PostgreSQL listening as that init does, must say
    not ready; against one listening on TCP too, ready.
    """
    test = rendered("cross-domain")["services"]["postgres"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    with tempfile.TemporaryDirectory() as scratch:
        data, sockets = Path(scratch) / "data", Path(scratch) / "run"
        owner = postgres_owner()
        for folder in (Path(scratch), data, sockets):
            folder.mkdir(exist_ok=True)
            os.chown(folder, *owner)
        run_as = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner[0] else {}
        initdb = ["initdb", "-D", str(data), "-U", "app", "--auth=trust"]
        subprocess.run(initdb, check=True, capture_output=True, **run_as)
        port = free_base_port()
        # As in the container, the default socket directory and port are the server's.
        check_env = {
            "PATH": os.environ["PATH"],
            "POSTGRES_USER": "app",
            "POSTGRES_DB": "postgres",
            "PGHOST": str(sockets),
            "PGPORT": str(port),
        }

        def healthy(listen):
            server = subprocess.Popen(
                [
                    *["postgres", "-D", str(data), "-k", str(sockets), "-p", str(port)],
                    *["-c", f"listen_addresses={listen}"],
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                **run_as,
            )
            try:
                wait_until(
                    lambda: subprocess.run(["pg_isready", "-q"], env=check_env).returncode == 0,
                    20,
                    "PostgreSQL did not accept connections on its socket",
                )
                return subprocess.run(["sh", "-c", test[1]], env=check_env).returncode == 0
            finally:
                server.terminate()
                server.wait(20)

        assert not healthy(listen=""), "ready while PostgreSQL listens on its socket only"
        assert healthy(listen="127.0.0.1")


def postgres_owner():
    """(uid, gid) to run PostgreSQL's programs as: ours, or nobody's, since it refuses root."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    user = pwd.getpwnam("nobody")
    return user.pw_uid, user.pw_gid


def test_the_sites_reach_redis_on_the_port_it_listens_on():
    """The official image listens on 6379 whatever REDIS_PORT says (a native-runtime setting)."""
    result = compose(
        "compose.yaml",
        "compose.cross-domain.yaml",
        env_file="cross-domain.env",
        extra={"REDIS_PORT": "6390"},
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    redis = services["redis"]
    command = redis.get("command") or []
    listens = command[command.index("--port") + 1] if "--port" in command else "6379"
    assert [str(port) for port in redis["expose"]] == [listens]
    for name in ("migrate", "wsgi", "asgi"):
        assert services[name]["environment"]["REDIS_URL"] == f"redis://redis:{listens}/0"


def socket_route(services):
    """The half nginx-proxy sends the page's sockets to (the longest VIRTUAL_PATH wins)."""
    topology = Topology.from_env({k: str(v) for k, v in services["asgi"]["environment"].items()})
    host = topology.socket_base.split("://")[1].split(":")[0]
    matches = [
        (len(path), half)
        for (h, path), half in compose_routes(services).items()
        if h == host and "/ws/live/".startswith(path)
    ]
    return max(matches)[1] if matches else None


@pytest.mark.parametrize("tls", [False, True], ids=["local", "production"])
@pytest.mark.parametrize("mode", MODES)
def test_the_pages_open_sockets_where_nginx_proxy_routes_them(mode, tls):
    """Each mode's env file, local and production, with that mode's overlay."""
    assert socket_route(rendered(mode, tls=tls)["services"]) == "asgi"


# What nginx-proxy 1.7's template makes of its TLS settings (its docs/README.md): the
# protocols of each Mozilla SSL_POLICY, and the answer to plain HTTP under HTTPS_METHOD.
SSL_POLICY_PROTOCOLS = {
    "Mozilla-Modern": "TLSv1.3",
    "Mozilla-Intermediate": "TLSv1.2 TLSv1.3",
}
HTTPS_METHOD_STATUS = {"redirect": "301"}
TLS_SETTINGS = {"SSL_POLICY", "HSTS", "HTTPS_METHOD"}


@pytest.mark.parametrize("mode", MODES)
def test_the_tls_overlay_does_what_the_native_tls_config_does(mode, tmp_path):
    """The same protocols, the same HSTS header, the same redirect of plain HTTP."""
    https = {"SPLIT_MODE": mode, "PUBLIC_SCHEME": "https", "STATE_DIR": str(tmp_path)}
    native_conf = native.render("nginx/native.conf.template", Topology.from_env(https))
    protocols = set(re.findall(r"^\s*ssl_protocols ([^;]+);", native_conf, re.M))
    hsts = set(re.findall(r'add_header Strict-Transport-Security "([^"]+)" always;', native_conf))
    redirects = set(re.findall(r"return (\d+) https://", native_conf))
    assert protocols and hsts and redirects, "the native config has no TLS"

    services = rendered(mode, tls=True)["services"]
    proxy = services["nginx-proxy"]["environment"]
    assert set(proxy) >= TLS_SETTINGS, "set them on the proxy: image defaults change"
    for name in ("wsgi", "asgi"):
        assert not TLS_SETTINGS & set(services[name]["environment"]), f"{name} overrides them"
    assert protocols == {SSL_POLICY_PROTOCOLS[proxy["SSL_POLICY"]]}
    assert hsts == {proxy["HSTS"]}
    assert redirects == {HTTPS_METHOD_STATUS[proxy["HTTPS_METHOD"]]}


def django_settings(environment, *names):
    """{name: value} of shared_settings.base's settings, in a process given `environment`."""
    code = (
        "import json, sys\nfrom shared_settings import base\n"
        "print(json.dumps({n: getattr(base, n) for n in sys.argv[1:]}, default=str))"
    )
    env = {k: str(v) for k, v in environment.items()}
    env.update(PATH=os.environ["PATH"], PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code, *names], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("exported", [{}, {"DATABASE_POOL": "true", "DATABASE_POOL_SIZE": "8"}])
def test_compose_sets_the_pool_settings_django_reads(exported):
    """The pool settings of shared_settings/base.py, as a user exports them, reach both halves."""
    result = compose(
        "compose.yaml", "compose.cross-domain.yaml", env_file="cross-domain.env", extra=exported
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout.replace("$$", "$"))["services"]
    for name in ("wsgi", "asgi"):
        database = django_settings(services[name]["environment"], "DATABASES")["DATABASES"]
        database = database["default"]
        assert database["ENGINE"] == "django.db.backends.postgresql"
        assert database["HOST"] == "postgres"
        if exported:
            assert database["CONN_MAX_AGE"] == 0
            assert database["OPTIONS"]["pool"]["max_size"] == 8
        else:
            assert database["CONN_MAX_AGE"] == 60 and "pool" not in database["OPTIONS"]


def sentinel_config(service):
    """The lines the Sentinel's command writes to its config file."""
    script = service["command"][-1]
    return re.findall(r"'(sentinel [^']+)'", script)


@pytest.mark.parametrize("mode", MODES)
def test_the_sentinel_overlay_points_the_sites_at_three_sentinels(mode):
    services = rendered(mode, sentinel=True)["services"]
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert len(sentinels) == 3
    assert [name for name, s in services.items() if s.get("ports")] == ["nginx-proxy"]
    assert [name for name, s in services.items() if not s.get("healthcheck", {}).get("test")] == []

    # Each Sentinel watches the primary, the base file's redis, and a majority must agree.
    for name in sentinels:
        assert services[name]["expose"] == ["26379"]
        monitors = [line.split() for line in sentinel_config(services[name]) if " monitor " in line]
        assert len(monitors) == 1
        _, _, master, host, port, quorum = monitors[0]
        assert (host, port) == ("redis", "6379") and len(sentinels) // 2 < int(quorum)
        assert "--sentinel" in services[name]["command"][-1]
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    # As natively: a Redis restarted at once is back, empty, before the Sentinels notice, and
    # the replica copies the empty data set; a replica gets its first copy at once.
    for name in ("redis", "redis-replica"):
        assert services[name]["restart"] == "no"
        command = services[name]["command"]
        assert command[command.index("--repl-diskless-sync-delay") + 1] == "0"

    # The sites find the primary through exactly those Sentinels, by that name, once they agree.
    for name in ("migrate", "wsgi", "asgi"):
        env = services[name]["environment"]
        found = django_settings(env, "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER")
        assert sorted(tuple(s) for s in found["REDIS_SENTINELS"]) == [(s, 26379) for s in sentinels]
        assert found["REDIS_SENTINEL_MASTER"] == master
    for name in ("wsgi", "asgi"):
        depends = services[name]["depends_on"]
        assert all(depends[s]["condition"] == "service_healthy" for s in sentinels)


def test_up_sh_runs_subdomain_mode_with_the_cross_domain_routes(tmp_path):
    result, args, _ = run_up(tmp_path, "subdomain")
    assert result.returncode == 0, result.stderr
    files = [args[i + 1] for i, arg in enumerate(args) if arg == "-f"]
    assert args[2] == "deploy/subdomain.env"
    assert files == ["deploy/compose.yaml", "deploy/compose.cross-domain.yaml"]
    assert "http://app.split.localhost:8000/" in result.stdout


@pytest.mark.parametrize("value", ["1", "true", "0"])
def test_up_sh_adds_the_sentinels_with_redis_sentinel(tmp_path, value):
    """REDIS_SENTINEL=1 asks for Redis with failover in either runtime."""
    result, args, _ = run_up(tmp_path, "cross-domain", REDIS_SENTINEL=value)
    assert result.returncode == 0, result.stderr
    files = [args[i + 1] for i, arg in enumerate(args) if arg == "-f"]
    assert ("deploy/compose.sentinel.yaml" in files) == (value != "0")
    assert files[:2] == ["deploy/compose.yaml", "deploy/compose.cross-domain.yaml"]


def test_up_sh_refuses_an_unknown_mode(tmp_path):
    result, args, _ = run_up(tmp_path, "sub-domain")
    assert result.returncode == 2 and args == []
    assert "use same-domain, cross-domain or subdomain" in result.stderr


FAKE_ENTRYPOINT = """#!/bin/sh
# Stands in for the redis image's docker-entrypoint.sh: records the server command.
echo "$@" > entrypoint-args
"""


def test_a_sentinel_writes_its_config_once_and_redis_accepts_it(tmp_path):
    """
    The Sentinel's command, run by a real sh: it writes its config the first time only (later
    the Sentinel's own rewrites are kept), then starts `redis-server sentinel.conf --sentinel`.
    A real Redis in Sentinel mode accepts that config, the primary's address aside (the
    service name `redis` resolves only on the compose network).
    """
    script = rendered("cross-domain", sentinel=True)["services"]["sentinel-1"]["command"][-1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker-entrypoint.sh").write_text(FAKE_ENTRYPOINT)
    (bin_dir / "docker-entrypoint.sh").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = ["sh", "-c", script]
    subprocess.run(run, cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "entrypoint-args").read_text().split() == [
        "redis-server",
        "sentinel.conf",
        "--sentinel",
    ]
    config = tmp_path / "sentinel.conf"
    written = config.read_text()
    config.write_text(written + "sentinel myid learned-since\n")
    subprocess.run(run, cwd=tmp_path, env=env, check=True)
    assert config.read_text() == written + "sentinel myid learned-since\n"

    assert " redis 6379 " in written
    base = free_base_port()
    primary_port, sentinel_port = base, base + 1
    (tmp_path / "local.conf").write_text(
        written.replace(" redis 6379 ", f" 127.0.0.1 {primary_port} ")
        + f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
    )
    primary = subprocess.Popen(
        ["redis-server", "--port", str(primary_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    sentinel = subprocess.Popen(
        ["redis-server", str(tmp_path / "local.conf"), "--sentinel"],
        stdout=subprocess.DEVNULL,
    )
    try:
        ask = ["redis-cli", "-p", str(sentinel_port), "sentinel", "get-master-addr-by-name"]

        def primary_found():
            answer = subprocess.run([*ask, "split"], capture_output=True, text=True)
            return answer.stdout.split() == ["127.0.0.1", str(primary_port)]

        wait_until(primary_found, 10, "the Sentinel did not start from the compose config")
    finally:
        for process in (sentinel, primary):
            process.terminate()
            process.wait(10)
