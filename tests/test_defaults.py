"""
Defaults that depend on the topology: the session-key fallback is for a socket the cookie
cannot reach, so it is on by default cross-domain and off by default same-domain.
"""

import os
import re
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.test import RequestFactory

from shared_settings.topology import Topology
from tests.stack import ROOT
from wsgi_site.views import socket_rows


def fallback_in_a_fresh_process(tmp_path, **env):
    """WS_SESSION_KEY_FALLBACK as shared_settings reads it at import, from this environment."""
    environ = {
        k: v for k, v in os.environ.items() if k not in {"SPLIT_MODE", "WS_SESSION_KEY_FALLBACK"}
    }
    environ.update(SECRET_KEY="defaults-test", STATE_DIR=str(tmp_path), **env)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from shared_settings import base; print(base.WS_SESSION_KEY_FALLBACK)",
        ],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SPLIT_MODE": "same-domain"}, "False"),
        ({"SPLIT_MODE": "cross-domain"}, "True"),
        ({}, "True"),  # SPLIT_MODE defaults to cross-domain
        ({"SPLIT_MODE": "same-domain", "WS_SESSION_KEY_FALLBACK": "true"}, "True"),
        ({"SPLIT_MODE": "cross-domain", "WS_SESSION_KEY_FALLBACK": "false"}, "False"),
    ],
)
def test_session_key_fallback_default_follows_the_mode(tmp_path, env, expected):
    assert fallback_in_a_fresh_process(tmp_path, **env) == expected


@pytest.mark.parametrize("fallback", [True, False])
def test_same_domain_panel_never_shows_a_session_key(settings, alice, fallback):
    """The same-domain rows rely on the cookie, whatever the switch says."""
    settings.TOPOLOGY = Topology.from_env({"SPLIT_MODE": "same-domain"})
    settings.WS_SESSION_KEY_FALLBACK = fallback
    request = RequestFactory().get("/")
    request.session = alice.session
    request.user = get_user_model().objects.get(username="alice")
    rows = socket_rows(request)
    assert rows and all(row["expect"] == "you" for row in rows)
    assert not [row for row in rows if "session_key" in repr(row) or "protocols" in row]
    request.user = AnonymousUser()
    assert all(row["expect"] == "anonymous" for row in socket_rows(request))


def test_only_nginx_listens_on_the_public_address(tmp_path):
    """PUBLIC_BIND_ADDRESS opens nginx to the world; every other server stays on BIND_ADDRESS."""
    from deploy.native import render

    for scheme in ("http", "https"):
        topology = Topology.from_env(
            {"PUBLIC_BIND_ADDRESS": "0.0.0.0", "PUBLIC_SCHEME": scheme, "STATE_DIR": str(tmp_path)}
        )
        listens = re.findall(
            r"^\s*listen (\S+)", render("nginx/native.conf.template", topology), re.M
        )
        assert len(listens) >= 2 and all(a.startswith("0.0.0.0:") for a in listens), listens
        assert "0.0.0.0" not in render("deploy/supervisord.conf.template", topology)
        # Gunicorn, Daphne and the exporter read BIND_ADDRESS from the environment they get.
        assert topology.as_env()["BIND_ADDRESS"] == "127.0.0.1"
