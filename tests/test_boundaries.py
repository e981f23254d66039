"""
The halves meet only through the session store, the channel layer and `contract`: no import
crosses between wsgi_site and asgi_site, and a Gunicorn worker loads nothing of the socket side.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import ROOT

# Each package, and the packages it must never import.
FORBIDDEN = {
    "wsgi_site": {"asgi_site"},
    "asgi_site": {"wsgi_site"},
    "shared_settings": {"wsgi_site", "asgi_site", "contract"},
    "contract": {"wsgi_site", "asgi_site", "shared_settings"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, relative imports resolved to its own."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.add(path.relative_to(ROOT).parts[0])
        elif isinstance(node, ast.ImportFrom):
            found.add(str(node.module).split(".")[0])
    return found


def crossings(package: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in imported_packages(path) & FORBIDDEN[package]
    ]


@pytest.mark.parametrize("package", FORBIDDEN)
def test_no_import_crosses_between_the_halves(package):
    assert crossings(package) == []


def test_the_import_reader_sees_imports():
    # A positive control: the reader finds what each half does import.
    assert "contract" in imported_packages(ROOT / "wsgi_site" / "views.py")
    assert "contract" in imported_packages(ROOT / "asgi_site" / "consumers.py")
    assert "asgi_site" in imported_packages(ROOT / "asgi_site" / "asgi.py")  # from .auth import


def modules_loaded_by(code: str, tmp_path: Path) -> list[str]:
    """sys.modules after running `code` in a fresh interpreter, with the runtime's environment."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    env = {"SECRET_KEY": "boundaries-test", "STATE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# What a Gunicorn worker must not load: our socket side, and Channels' consumers and middleware.
SOCKET_SIDE = ("asgi_site", "channels.generic", "channels.consumer", "channels.auth",
               "channels.sessions", "channels.middleware")  # fmt: skip
# Load the WSGI application and every view behind it, as the first request would.
WSGI_WORKER = "import wsgi_site.wsgi\nimport django.urls\ndjango.urls.resolve('/')"


def test_a_gunicorn_worker_loads_nothing_of_the_socket_side(tmp_path):
    loaded = modules_loaded_by(WSGI_WORKER, tmp_path)
    assert "wsgi_site.views" in loaded and "contract.tickets" in loaded
    assert [name for name in loaded if name.startswith(SOCKET_SIDE)] == []


def test_a_daphne_process_does_load_the_socket_side(tmp_path):
    # The control for the test above: the same check sees the socket side where it is.
    loaded = modules_loaded_by("import asgi_site.asgi", tmp_path)
    assert {"asgi_site.consumers", "asgi_site.upkeep", "asgi_site.auth"} <= set(loaded)
    assert any(name.startswith("channels.generic") for name in loaded)
