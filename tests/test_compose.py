"""
The compose deployment, checked statically (no Docker engine runs here): docker-compose
accepts every combination, and what it renders agrees with the native runtime the other
tests run: the same routes, the same environment, the same commands, the same log format.
"""

import configparser
import hashlib
import os
import re
import subprocess

import pytest
import requests
import yaml

from deploy import envfiles, native
from shared_settings.topology import Topology
from tests.stack import ROOT, free_base_port, wait_until

MODES = ["same-domain", "cross-domain"]
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
]


def compose(*args, env_file, secret=True):
    # Compose prefers the shell's variables to the env file's: give it none of ours.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    if secret:
        env.update(SECRET_KEY="compose-config-check", POSTGRES_PASSWORD="compose-config-check")
    command = ["docker-compose", "--env-file", str(ROOT / "deploy" / env_file)]
    for name in args:
        command += ["-f", str(ROOT / "deploy" / name)]
    return subprocess.run([*command, "config"], env=env, capture_output=True, text=True)


def rendered(mode, tls=False):
    """The config docker-compose renders, with compose's $$ escapes undone."""
    files = ["compose.yaml", f"compose.{mode}.yaml"] + (["compose.tls.yaml"] if tls else [])
    result = compose(*files, env_file="production.env.example" if tls else f"{mode}.env")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout.replace("$$", "$"))


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
