import subprocess
import time

import pytest
import redis
from django.conf import settings

from tests.stack import Stack


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis for the unit tests' tickets, on settings.UNIT_REDIS_PORT."""
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        ["redis-server", "--port", str(settings.UNIT_REDIS_PORT), "--bind", "127.0.0.1",
         "--dir", str(folder), "--save", ""], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=settings.UNIT_REDIS_PORT)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield client
    server.terminate()
    server.wait(10)


def run_stack(tmp_path_factory, mode, base_port):
    # Re-check sessions every second, as the tests ask.
    extra = {"WS_SESSION_RECHECK_SECONDS": "1"}
    stack = Stack(mode, base_port, tmp_path_factory.mktemp(mode), extra_env=extra).start()
    yield stack
    assert stack.leftover_processes(), "the process check sees nothing even while running"
    took = stack.stop()
    # Proofs that hold for the whole run, checked once every test has used the stack.
    assert took < 10, f"stopping took {took:.1f} s"
    assert stack.leftover_processes() == []
    logs = stack.log_text()
    assert logs, "no logs were written: nothing to prove"
    leaked = [s for s in stack.secrets if s in logs]
    assert not leaked, f"{len(leaked)} session keys or tickets reached the logs"


@pytest.fixture(scope="session")
def cross_stack(tmp_path_factory):
    """The cross-domain deployment, two Daphne processes, on ports 18000-18020."""
    yield from run_stack(tmp_path_factory, "cross-domain", 18000)


@pytest.fixture(scope="session")
def same_stack(tmp_path_factory):
    """The same-domain deployment, two Daphne processes, on ports 19000-19020."""
    yield from run_stack(tmp_path_factory, "same-domain", 19000)
