"""The fixtures every test module shares: a Redis, a logged-in user, and the real stacks."""

import subprocess
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from asgi_site import auth
from tests.stack import Stack, wait_until


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[redis.Redis]:
    """A real Redis for the unit tests' tickets, on settings.UNIT_REDIS_PORT."""
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(settings.UNIT_REDIS_PORT),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=settings.UNIT_REDIS_PORT)

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_until(answers, 10, "the unit tests' Redis did not start")
    yield client
    server.terminate()
    server.wait(10)


@pytest.fixture
def alice(db) -> Client:
    """A Django test client logged in as a fresh user, alice (password alice-pass)."""
    get_user_model().objects.create_user("alice", password="alice-pass")
    client = Client()
    assert client.login(username="alice", password="alice-pass")
    return client


@pytest.fixture
def session_reads(monkeypatch) -> list[str]:
    """Every session key a handshake read from the database (a spy: the real read runs)."""
    read: list[str] = []
    real = auth.session_user

    async def spy(session_key):
        read.append(session_key)
        return await real(session_key)

    monkeypatch.setattr(auth, "session_user", spy)
    return read


@pytest.fixture
def session_key(alice: Client) -> str:
    """The session key of alice's login, as the HTTP side made it."""
    key = alice.session.session_key
    assert key is not None
    return key


def run_stack(tmp_path_factory, mode):
    # Re-check sessions every second, as the tests ask.
    stack = Stack(mode, tmp_path_factory.mktemp(mode), env={"WS_SESSION_RECHECK_SECONDS": 1})
    stack.start()
    yield stack
    assert stack.leftover_processes(), "the process check sees nothing even while running"
    took = stack.stop()
    # Proofs that hold for the whole run, checked once every test has used the stack.
    assert took < 10, f"stopping took {took:.1f} s"
    assert stack.leftover_processes() == []
    # Every key and ticket sent (forged ones too), in any form, and any credential's value.
    stack.assert_no_secrets_logged()


@pytest.fixture(scope="session")
def cross_stack(tmp_path_factory):
    """The cross-domain deployment, two Daphne processes, on free ports."""
    yield from run_stack(tmp_path_factory, "cross-domain")


@pytest.fixture(scope="session")
def same_stack(tmp_path_factory):
    """The same-domain deployment, two Daphne processes, on free ports."""
    yield from run_stack(tmp_path_factory, "same-domain")
