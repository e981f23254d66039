"""The native runtime as a user starts it: `make up-cross-domain`, custom ports, then SIGTERM."""

import socket
import subprocess
import sys

import requests

from tests.stack import ROOT, Stack


def answers(port):
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_make_up_cross_domain_custom_ports_and_sigterm(tmp_path):
    stack = Stack("cross-domain", tmp_path, asgi_processes=1, env={"RUNTIME": "native"})
    stack.start(command=["make", "--no-print-directory", "-C", str(ROOT), "up-cross-domain"])
    ports = [stack.public_port, stack.gunicorn_port, *stack.daphne_ports, stack.redis_port]
    try:
        output = "".join(stack.output)
        assert stack.output[0] == "Runtime: native (RUNTIME=native).\n"
        assert f"Open    http://app.localhost:{stack.public_port}/" in output
        assert "Log in  demo / demo-pass" in output
        session, key = stack.login()
        assert stack.whoami(query=f"session_key={key}")["user"] == "demo"
        assert stack.http(requests.Session(), "GET", "/healthz").status_code == 200
        assert all(answers(port) for port in ports)
        assert stack.leftover_processes()  # so the check below can see them
    finally:
        took = stack.stop()  # SIGTERM to make, which passes it on to the runner
    assert took < 10
    assert stack.leftover_processes() == []
    assert not any(answers(port) for port in ports)
    # Its logs, like every stack's: the key it sent, in any form, and no credential's value.
    assert "/ws/whoami/" in stack.log_files()["nginx-access.log"]
    stack.assert_no_secrets_logged()


def test_busy_port_gives_a_readable_message(tmp_path):
    stack = Stack("cross-domain", tmp_path, asgi_processes=1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", stack.public_port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "deploy.native"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Port {stack.public_port} (PUBLIC_PORT) is in use: stop what holds it, or set PUBLIC_PORT."
    )
