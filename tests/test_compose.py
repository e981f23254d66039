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
import yaml

from deploy import envfiles, native
from shared_settings.topology import Topology
from tests.stack import ROOT, wait_until

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
