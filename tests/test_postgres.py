"""
PostgreSQL on the real stack (DATABASE=postgres, the native runtime's own cluster): what a
PostgreSQL restart does to pages and handshakes, and how many connections the processes
hold under load. The rest of the stack suite runs on PostgreSQL too, in `make test`'s
second pass (STACK_DATABASE=postgres).
"""

import asyncio
import concurrent.futures
import json
import re
import subprocess
import threading
import time

import psycopg
import pytest
import requests

from deploy.postgres import check_connections, connections_bound
from shared_settings.topology import Topology
from tests.stack import Stack, wait_until

OUTAGE_SECONDS = 5
# The outage test's bound: everything works again this soon after PostgreSQL answers.
RECOVERY_SECONDS = 5
# 200 logins hash 200 passwords (PBKDF2, a million rounds) on two Gunicorn workers.
LOGIN_TIMEOUT = 180
UNAVAILABLE = {"error": "database unavailable, try again"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(
        "cross-domain",
        tmp_path_factory.mktemp("postgres"),
        env={"DATABASE": "postgres", "WS_SESSION_RECHECK_SECONDS": "1"},
    ).start()
    yield stack
    took = stack.stop()
    assert took < 10
    assert stack.leftover_processes() == []
    stack.assert_no_secrets_logged()


def connect(stack, dbname="postgres"):
    """A client of the stack's PostgreSQL, through its socket, as the runtime's processes are."""
    return psycopg.connect(
        host=str(stack.state_dir / "postgres-socket"),
        port=stack.postgres_port,
        user="app",
        dbname=dbname,
        connect_timeout=2,
        autocommit=True,
    )


def postgres_answers(stack):
    try:
        with connect(stack) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def app_connections(conn):
    """
    Client connections to the app's database now (the caller's own is to another one). Not
    autovacuum's workers: they have slots of their own, outside max_connections.
    """
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = 'app' AND backend_type = 'client backend'"
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def pids(stack):
    """Every server process of the stack but PostgreSQL: supervisord's programs and workers."""
    programs = ["wsgi", *stack.daphne_programs]
    found = {p: stack.supervisorctl("pid", p).strip() for p in programs}
    master = found["wsgi"]
    ps = ["ps", "-o", "pid=", "--ppid", master]
    found["gunicorn workers"] = sorted(
        subprocess.run(ps, capture_output=True, text=True).stdout.split()
    )
    return found


def page(stack, session):
    return stack.http(session, "GET", "/")


def test_postgres_outage_gets_defined_answers_and_recovers_without_restarts(stack):
    session, key = stack.login()
    before = pids(stack)
    assert len(before["gunicorn workers"]) == 2

    async def run():
        async with stack.connect(f"/ws/live/?session_key={key}") as held:
            stack.supervisorctl("stop", "postgres")
            assert not postgres_answers(stack)
            down = time.monotonic()
            answers = []
            while time.monotonic() - down < OUTAGE_SECONDS:
                home = await asyncio.to_thread(page, stack, session)
                ticket = await asyncio.to_thread(
                    stack.csrf_post, session, "/ws-ticket/", json={"path": "/ws/whoami/"}
                )
                frame = await asyncio.to_thread(stack.whoami, f"session_key={key}")
                answers.append((home, ticket, frame))
                await asyncio.sleep(0.3)
            # Each round is quick with persistent connections (the server refuses at once);
            # with DATABASE_POOL=true each request first waits the pool's timeout (3 s).
            assert answers
            for home, ticket, frame in answers:
                # Pages: 503, a plain message for a page, JSON for a JSON client; no traceback.
                assert home.status_code == 503, home.text
                assert home.headers["Content-Type"].startswith("text/plain")
                assert "database is not answering" in home.text
                assert ticket.status_code == 503, ticket.text
                assert ticket.json() == UNAVAILABLE
                assert home.headers["Retry-After"] == ticket.headers["Retry-After"] == "5"
                # Handshakes: open, anonymous (the session cannot be read).
                assert frame["type"] == "whoami" and frame["authenticated"] is False, frame
            # The socket opened before the outage stays open through it.
            assert held.close_code is None

            stack.supervisorctl("start", "postgres")
            await asyncio.to_thread(wait_until, lambda: postgres_answers(stack), 15, "no PG")
            back = time.monotonic()

            def everything_works():
                ticket = stack.csrf_post(session, "/ws-ticket/", json={"path": "/ws/whoami/"})
                return (
                    page(stack, session).status_code == 200
                    and ticket.status_code == 200
                    and stack.whoami(f"session_key={key}")["authenticated"] is True
                )

            await asyncio.to_thread(
                wait_until, everything_works, RECOVERY_SECONDS, "not back within 5 s", 0.2
            )
            recovered = time.monotonic() - back
            # Re-checks ran through the outage and since: the held socket is still open.
            await asyncio.sleep(1.5)
            assert held.close_code is None
            return recovered

    recovered = asyncio.run(run())
    print(f"everything worked again {recovered:.2f} s after PostgreSQL answered")
    assert pids(stack) == before, "a process was restarted"
    logs = stack.log_files()
    for name in ["gunicorn.log", *(f"daphne-{i + 1}.log" for i in range(2))]:
        assert "Traceback" not in logs[name], name
    # Logged without a flood: a line per worker every 10 s at most.
    lines = logs["gunicorn.log"].count("database unreachable")
    assert 1 <= lines <= 2 * (OUTAGE_SECONDS // 10 + 1), lines


def test_logins_and_handshakes_under_load_stay_under_the_connection_bound(stack):
    """200 concurrent logins while 500 sockets handshake: no 5xx, connections under the bound."""
    # Shipped settings: 4, two Gunicorn workers and two Daphne processes, one connection each.
    bound = connections_bound(len(stack.daphne_ports), stack.env)
    session, key = stack.login()
    counts = []
    done = threading.Event()

    def watch():
        with connect(stack) as conn:
            while not done.is_set():
                counts.append(app_connections(conn))
                time.sleep(0.05)

    def login(_):
        # As Stack.login, but straight to Gunicorn: each login hashes the password (PBKDF2, a
        # million rounds, 0.5 s of a core here), so 200 at once keep two cores busy for about
        # a minute, and nginx's proxy_read_timeout (60 s) would answer 504 for the last ones:
        # the login form's capacity, not the database's. Handshakes still go through nginx.
        client = requests.Session()
        url = f"http://127.0.0.1:{stack.gunicorn_port}/accounts/login/"
        host = {"Host": f"{stack.app_host}:{stack.public_port}"}
        form = client.get(url, headers=host, timeout=LOGIN_TIMEOUT)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert token, form.status_code
        fields = {"username": "demo", "password": "demo-pass", "csrfmiddlewaretoken": token[1]}
        response = client.post(
            url,
            data=fields,
            headers={**host, "Origin": stack.app_origin},
            allow_redirects=False,
            timeout=LOGIN_TIMEOUT,
        )
        stack.secrets.add(client.cookies.get("sessionid", ""))
        return response.status_code

    async def handshakes():
        # 100 in flight at a time, a crowd reconnecting rather than one instant: with the
        # logins holding both cores, 500 at once wait longer than Daphne's 5 s for the accept
        # (websocket_connect_timeout), and nginx answers 502 for the CPU, not the database.
        crowd = asyncio.Semaphore(100)

        async def one():
            async with crowd, stack.connect(f"/ws/whoami/?session_key={key}") as ws:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                return frame["authenticated"]

        return await asyncio.gather(*(one() for _ in range(500)), return_exceptions=True)

    access_log = stack.state_dir / "log" / "nginx-access.log"
    seen = len(access_log.read_text().splitlines())  # the lines of earlier tests
    watcher = threading.Thread(target=watch)
    watcher.start()
    began = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            logins = pool.map(login, range(200))
            known = asyncio.run(handshakes())
            statuses = list(logins)
    finally:
        done.set()
        watcher.join()
    took = time.monotonic() - began
    assert statuses == [302] * 200, sorted(set(statuses))
    assert known == [True] * 500, [k for k in known if k is not True][:3]
    lines = access_log.read_text().splitlines()[seen:]
    answered = [line.split('" ', 1)[1].split()[0] for line in lines]
    assert answered.count("101") >= 500
    assert [s for s in answered if s.startswith("5")] == []
    assert counts and max(counts) > 0, "the count saw no connection: it measures nothing"
    assert max(counts) <= bound, f"{max(counts)} connections, bound {bound}"
    print(f"connections: max {max(counts)}, bound {bound}; {took:.1f} s for the load")


@pytest.mark.parametrize(
    ("env", "bound"),
    [
        ({}, 4),  # two workers and two Daphne processes, one persistent connection each
        ({"WEB_CONCURRENCY": "4", "ASGI_PROCESSES": "3"}, 7),
        ({"DATABASE_POOL": "true"}, 16),  # a pool of up to 4 per process
        ({"DATABASE_POOL": "true", "DATABASE_POOL_SIZE": "2", "ASGI_PROCESSES": "1"}, 6),
    ],
)
def test_the_runner_refuses_a_topology_that_could_exceed_max_connections(env, bound):
    env = {"ASGI_PROCESSES": "2", "DATABASE": "postgres", **env}
    topology = Topology.from_env(env)
    assert connections_bound(topology.asgi_processes, env) == bound
    # 3 of max_connections are the superusers': bound + 3 fits, one less does not.
    check_connections(Topology.from_env({**env, "POSTGRES_MAX_CONNECTIONS": str(bound + 3)}), env)
    tight = Topology.from_env({**env, "POSTGRES_MAX_CONNECTIONS": str(bound + 2)})
    with pytest.raises(SystemExit, match="Raise it, or lower"):
        check_connections(tight, env)
