"""
Deploying on the real stack, with a stack of its own: Daphne processes that come back get
handshakes at once, a stopping Daphne drains its sockets with 1012, and `make reload`
(deploy.reload) restarts every process one at a time without refusing a request.
"""

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import websockets
from playwright.sync_api import sync_playwright

from deploy import reload as reloader
from tests.stack import Stack, wait_until
from tests.test_browser import CHROMIUM_ARGS, log_in

DRAIN = 2.0  # WS_DRAIN_SECONDS for this stack: short, so the tests are too


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(
        "cross-domain", tmp_path_factory.mktemp("deploy"), env={"WS_DRAIN_SECONDS": DRAIN}
    ).start()
    yield stack
    stack.stop()
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


def pid_of(stack, program):
    try:
        return int(stack.supervisorctl("pid", program).strip())
    except (subprocess.CalledProcessError, ValueError):
        return 0


def daphne_answers(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def refuses(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture(autouse=True)
def serving(stack):
    yield
    for program, port in zip(stack.daphne_programs, stack.daphne_ports, strict=True):
        if not pid_of(stack, program):
            stack.supervisorctl("start", program)
        wait_until(lambda p=port: daphne_answers(p), 15, f"Daphne on {port} did not come back")


def test_a_daphne_back_up_gets_handshakes_within_a_second(stack):
    """
    Both Daphne processes SIGKILLed while a client retries a handshake through nginx every
    50 ms: the first handshake that succeeds comes within 1 s of the first process answering
    its own /healthz (nginx marked no server down; with max_fails=1 it took 10 s).
    """
    session, key = stack.login()
    assert stack.whoami(query=f"session_key={key}")["user"] == "demo"
    first_health = []
    done = threading.Event()

    def poll_health():
        while not done.is_set():
            if any(daphne_answers(port) for port in stack.daphne_ports):
                first_health.append(time.monotonic())
                return
            time.sleep(0.01)

    for program in stack.daphne_programs:
        os.kill(pid_of(stack, program), signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not any(daphne_answers(p) for p in stack.daphne_ports), 5, "still answering")
    poller = threading.Thread(target=poll_health)
    poller.start()
    failures = 0
    first_handshake = None
    try:
        while time.monotonic() - killed < 30:
            try:
                frame = stack.whoami(query=f"session_key={key}", open_timeout=2)
            except (OSError, websockets.WebSocketException, TimeoutError):
                frame = None
            if isinstance(frame, dict) and frame["user"] == "demo":
                first_handshake = time.monotonic()
                break
            failures += 1
            time.sleep(0.05)
    finally:
        done.set()
        poller.join()
    assert failures > 0, "the handshakes never failed: the processes were not down"
    assert first_handshake is not None, "no handshake succeeded within 30 s"
    assert first_health, "no Daphne answered /healthz"
    lag = first_handshake - first_health[0]
    print(
        f"healthz after {first_health[0] - killed:.2f} s, handshake after "
        f"{first_handshake - killed:.2f} s: lag {lag:.2f} s ({failures} failed tries)"
    )
    assert lag < 1.0


def test_sigterm_stops_listening_and_closes_sockets_with_1012_over_the_window(stack):
    """
    supervisord's stop (SIGTERM): the process refuses new connections at once, closes its
    open sockets with 1012 (service restart) spread over WS_DRAIN_SECONDS, then exits.
    """
    session, key = stack.login()
    program, port = stack.daphne_programs[0], stack.daphne_ports[0]
    count = 6

    async def run():
        sockets = [
            await stack.connect(f"/ws/live/?session_key={key}", port=port) for _ in range(count)
        ]
        closed = {}

        async def watch(n, ws):
            await ws.wait_closed()
            closed[n] = (time.monotonic(), ws.close_code)

        watchers = [asyncio.create_task(watch(n, ws)) for n, ws in enumerate(sockets)]
        began = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(stack.supervisorctl, "stop", program))
        refused_at = None
        while refused_at is None and time.monotonic() - began < 5:
            if await asyncio.to_thread(refuses, port):
                refused_at = time.monotonic()
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*watchers), DRAIN + 5)
        await asyncio.wait_for(stopping, 15)
        stopped = time.monotonic()
        return began, refused_at, closed, stopped

    began, refused_at, closed, stopped = asyncio.run(run())
    times = sorted(t - began for t, _ in closed.values())
    print(f"refused after {refused_at - began:.2f} s; closes at {[round(t, 2) for t in times]}")
    assert sorted(code for _, code in closed.values()) == [1012] * count
    assert refused_at is not None and refused_at - began < times[-1]  # before the last close
    # Evenly spread: one every DRAIN / count seconds, the last at DRAIN * (count-1) / count.
    spread = times[-1] - times[0]
    assert DRAIN * 0.6 <= spread <= DRAIN + 0.5, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 2 * DRAIN / count + 0.2, gaps
    assert stopped - began < DRAIN + 4


ACCESS_LINE = re.compile(r'"(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) ')


def test_reload_restarts_every_process_refusing_nothing(stack):
    """
    `make reload` (deploy.reload) while 5 clients keep handshaking and GETting through nginx,
    and 5 more hold live sockets that come back when closed: every Daphne pid and every
    Gunicorn worker changes, and nginx's access log shows no refused handshake and no 5xx.
    """
    session, key = stack.login()
    access_log = stack.state_dir / "log" / "nginx-access.log"
    master = pid_of(stack, "wsgi")
    workers = reloader.children(master)
    daphnes = {program: pid_of(stack, program) for program in stack.daphne_programs}
    stop = threading.Event()
    errors = []
    counts = {"handshakes": 0, "gets": 0, "reconnects": 0}

    async def handshaker():
        plain = requests.Session()
        while not stop.is_set():
            try:
                async with stack.connect(f"/ws/whoami/?session_key={key}") as ws:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert frame["user"] == "demo", frame
                counts["handshakes"] += 1
                response = await asyncio.to_thread(stack.http, plain, "GET", "/healthz")
                assert response.status_code == 200, response.status_code
                counts["gets"] += 1
            except Exception as exc:  # every failure is counted, none stops the client
                errors.append(repr(exc))
            await asyncio.sleep(0.02)

    async def holder():
        while not stop.is_set():
            try:
                async with stack.connect(f"/ws/live/?session_key={key}") as ws:
                    counts["reconnects"] += 1
                    while not stop.is_set() and ws.close_code is None:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(ws.recv(), 0.2)
            except websockets.ConnectionClosed as exc:
                if exc.rcvd is None or exc.rcvd.code != 1012:
                    errors.append(repr(exc))
            except Exception as exc:
                errors.append(repr(exc))

    async def run():
        clients = [asyncio.create_task(handshaker()) for _ in range(5)]
        clients += [asyncio.create_task(holder()) for _ in range(5)]
        await asyncio.sleep(1)
        offset = access_log.stat().st_size
        said = []
        began = time.monotonic()
        await asyncio.to_thread(reloader.reload, stack.env, said.append)
        took = time.monotonic() - began
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*clients)
        return offset, said, took

    offset, said, took = asyncio.run(run())
    with access_log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    requests_seen = [m.groupdict() for line in lines if (m := ACCESS_LINE.search(line))]
    handshakes = [r for r in requests_seen if r["path"].startswith("/ws/")]
    refused = [r for r in handshakes if r["status"] != "101"]
    server_errors = [r for r in requests_seen if r["status"].startswith("5")]
    print("\n".join(said))
    print(
        f"reload took {took:.1f} s; {len(requests_seen)} requests logged during it, "
        f"{len(handshakes)} handshakes; client counts {counts}"
    )
    assert len(handshakes) > 50 and len(requests_seen) > 100
    assert refused == [] and server_errors == []
    assert errors == []
    assert counts["reconnects"] >= 5 + 5 * len(daphnes) // 2  # the 1012s came back
    after = {program: pid_of(stack, program) for program in stack.daphne_programs}
    assert all(after[p] not in (0, daphnes[p]) for p in daphnes), (daphnes, after)
    assert pid_of(stack, "wsgi") == master
    new_workers = reloader.children(master)
    assert new_workers and not (new_workers & workers), (workers, new_workers)


def test_reload_without_a_stack_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deploy.reload"],
        env=dict(os.environ, STATE_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "Nothing to reload: no stack has run under" in result.stderr


def test_clients_get_every_announcement_once_in_order_through_reloads_and_a_kill(stack):
    """
    The issue's test (b): 20 Python live-feed clients and the demo page in Chromium while
    announcements go out at 20/s for 30 s; meanwhile `make reload` twice and one Daphne
    SIGKILLed. A client whose socket closes reconnects with ?since=<the last id it saw>; each
    ends with every announcement exactly once, in order. nginx logs no 5xx and no refused
    handshake, and no announcement needed a second try.
    """
    session, key = stack.login()
    stop = threading.Event()
    sent: list[str] = []
    failures = []
    retries = []
    access_log = stack.state_dir / "log" / "nginx-access.log"
    offset = access_log.stat().st_size

    async def client(seen):
        last_id = None
        while True:
            query = f"session_key={key}" + (f"&since={last_id}" if last_id else "")
            try:
                async with stack.connect(f"/ws/live/?{query}", max_queue=None) as ws:
                    while True:
                        try:
                            frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                        except TimeoutError:
                            if stop.is_set():
                                return
                            continue
                        if frame["type"] == "gap":
                            failures.append("gap")
                        if frame["type"] == "announcement":
                            seen.append(frame["text"])
                            last_id = frame.get("id", last_id)
            except (OSError, websockets.WebSocketException):
                await asyncio.sleep(0.1)

    def announcer():
        began = time.monotonic()
        for n in range(600):
            time.sleep(max(0.0, began + n / 20 - time.monotonic()))
            text = f"a{n}"
            for _ in range(50):
                try:
                    response = stack.csrf_post(session, "/announce/", json={"text": text})
                except requests.RequestException:
                    response = None
                if response is not None and response.status_code == 200:
                    sent.append(text)
                    break
                retries.append((text, response and response.status_code))
                time.sleep(0.1)

    def operator():
        time.sleep(5)
        reloader.reload(stack.env, print)
        time.sleep(3)
        os.kill(pid_of(stack, stack.daphne_programs[1]), signal.SIGKILL)
        time.sleep(5)
        reloader.reload(stack.env, print)

    page_ready = threading.Event()

    def page():
        """The demo page's live feed, logged in through the login form, in Chromium."""
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            context = browser.new_context()

            def keep_ticket(response):
                if response.url.endswith("/ws-ticket/") and response.ok:
                    stack.secrets.add(response.json()["ticket"])

            context.on("response", keep_ticket)
            tab = context.new_page()
            log_in(tab, stack)
            tab.wait_for_function(
                "document.getElementById('live-status').textContent === 'connected'"
            )
            page_ready.set()
            stop.wait(120)
            items = tab.eval_on_selector_all(
                "#feed li", "els => els.map(e => [e.dataset.type, e.textContent])"
            )
            browser.close()
        prefix = "announcement from demo: "
        return [(kind, text.removeprefix(prefix)) for kind, text in items]

    async def run():
        seen_by = [[] for _ in range(20)]
        clients = [asyncio.create_task(client(seen)) for seen in seen_by]
        chromium = asyncio.create_task(asyncio.to_thread(page))
        await asyncio.to_thread(page_ready.wait, 30)
        await asyncio.sleep(1)
        await asyncio.gather(asyncio.to_thread(announcer), asyncio.to_thread(operator))
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*clients)
        return seen_by, await chromium

    seen_by, feed = asyncio.run(run())
    assert len(sent) == 600 and retries == []
    assert failures == []
    assert feed == [("announcement", text) for text in sent]
    with access_log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    logged = [m.groupdict() for line in lines if (m := ACCESS_LINE.search(line))]
    assert len(logged) > 600
    assert [r for r in logged if r["status"].startswith("5")] == []
    assert [r for r in logged if r["path"].startswith("/ws/") and r["status"] != "101"] == []
    wrong = [n for n, seen in enumerate(seen_by) if seen != sent]
    assert not wrong, [
        (n, len(seen_by[n]), len(set(seen_by[n])), seen_by[n][:3]) for n in wrong[:3]
    ]
