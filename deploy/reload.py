"""
Reload the running native stack, one process at a time, refusing nothing:

    python -m deploy.reload     (`make reload`; STATE_DIR names the stack, var/ by default)

- Daphne first: `supervisorctl restart asgi-N`, one at a time. The stopping process closes
  its listening socket first (nginx sends new handshakes to the others at once), closes its
  sockets with 1012 over WS_DRAIN_SECONDS and exits; the next is restarted only once the new
  one answers /healthz.
- Then Gunicorn: SIGHUP to its master (`supervisorctl signal HUP wsgi`). The master keeps the
  listening socket, starts new workers with the new code and stops the old ones gracefully.
"""

import configparser
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from shared_settings.topology import ROOT

TIMEOUT = 60


class NoStack(Exception):
    """No native stack runs under this STATE_DIR."""


class Stack:
    def __init__(self, env: Mapping[str, str]):
        self.state_dir = Path(env.get("STATE_DIR") or ROOT / "var")
        self.config = self.state_dir / "supervisord.conf"
        self.env = dict(env)
        if not self.config.exists():
            raise NoStack(f"no stack has run under {self.state_dir} ({self.config} is missing)")
        status = self.supervisorctl("status", check=False)
        if "RUNNING" not in status.stdout:
            raise NoStack(f"no stack runs under {self.state_dir}: {status.stdout.strip()}")
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(self.config.read_text())
        # {program: its Daphne port}, from the rendered config of the stack that runs.
        self.daphnes = {
            section.removeprefix("program:"): int(
                parser[section]["environment"].split("DAPHNE_PORT=")[1].split(",")[0].strip('"')
            )
            for section in parser.sections()
            if section.startswith("program:asgi-")
        }

    def supervisorctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(self.config)]
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, check=check, env=self.env
        )

    def pid(self, program: str) -> int:
        try:
            return int(self.supervisorctl("pid", program).stdout.strip())
        except (subprocess.CalledProcessError, ValueError):
            return 0


def children(pid: int) -> set[int]:
    """The pids whose parent is `pid` (Gunicorn's workers, for its master)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def answers(port: int) -> bool:
    """True if the Daphne process on `port` answers 200 on /healthz."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz", headers={"Host": "127.0.0.1"})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} (waited {TIMEOUT} s)")
        time.sleep(0.1)


def reload_gunicorn(stack: Stack, say=print) -> None:
    master = stack.pid("wsgi")
    old = children(master)
    stack.supervisorctl("signal", "HUP", "wsgi")
    # New workers start, then the old ones finish what they serve and exit.
    wait_for(
        lambda: not (children(master) & old) and len(children(master)) >= len(old),
        "Gunicorn's old workers did not give way to new ones",
    )
    say(f"Gunicorn: workers {sorted(old)} replaced by {sorted(children(master))}")


def restart_daphne(stack: Stack, program: str, port: int, say=print) -> None:
    old = stack.pid(program)
    began = time.monotonic()
    stack.supervisorctl("restart", program)  # returns once stopped (drained) and started
    wait_for(lambda: answers(port), f"{program} did not answer /healthz on {port}")
    say(
        f"Daphne {program}: pid {old} -> {stack.pid(program)}, "
        f"serving again after {time.monotonic() - began:.1f} s"
    )


def reload(env: Mapping[str, str] = os.environ, say=print) -> None:
    stack = Stack(env)
    # The socket side first: it reads what the HTTP side writes (tickets, events), and a new
    # version reads the old format too, so nothing the old Gunicorn wrote is ever unreadable.
    for program, port in sorted(stack.daphnes.items()):
        restart_daphne(stack, program, port, say)
    reload_gunicorn(stack, say)
    say("Reloaded: every process runs the code on disk now.")


def main() -> int:
    try:
        reload()
    except NoStack as exc:
        print(
            f"Nothing to reload: {exc}.\n"
            "Start one with `make up-cross-domain` or `make up-same-domain` (native runtime), "
            "or set STATE_DIR to the stack's. For compose, see the README.",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as exc:
        print(f"Reload stopped: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
