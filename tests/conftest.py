import pytest

from tests.stack import Stack


def run_stack(tmp_path_factory, mode, base_port):
    stack = Stack(mode, base_port, tmp_path_factory.mktemp(mode)).start()
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
