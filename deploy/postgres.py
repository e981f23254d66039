"""
PostgreSQL for the native runtime (DATABASE=postgres): a cluster of its own under STATE_DIR.

The data directory is STATE_DIR/postgres, made once with initdb; the server listens on a Unix
socket in STATE_DIR/postgres-socket and on 127.0.0.1:POSTGRES_PORT. The socket trusts whoever
reaches it, and only the server's user (and root) can: its directory is 0700, so the
filesystem guards the database as it guards the SQLite file. Over TCP a password is asked,
and no role has one: nothing on the machine's network logs in. No secret to make, keep or
pass to every process.

PostgreSQL refuses to run as root; run as root, the runner starts it as Debian's `postgres`
user, the account Debian's own clusters run as (its package makes it). supervisord runs the
server (`server_command`); before that, the runner starts it briefly to create the database
and migrate (`prepared`).
"""

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import environ
import psycopg

# The database and its owner, as the compose env files name them.
NAME = USER = "app"
# Debian keeps the server's binaries off PATH, one folder per major version.
BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
# A Unix socket's path is at most 107 bytes; PostgreSQL refuses a longer one at start.
MAX_SOCKET_PATH = 107
INSTALL = "sudo apt-get install postgresql"
# Of max_connections, what PostgreSQL keeps for superusers (its default).
RESERVED_CONNECTIONS = 3


def binary(name):
    """The path of a PostgreSQL program: the newest Debian version's, else PATH's."""
    for folder in reversed(BIN_DIRS):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"PostgreSQL's {name} is missing. Install it with: {INSTALL}")
    return found


def connections_bound(asgi_processes, env):
    """
    The most connections the stack's processes hold: (Gunicorn workers + Daphne processes)
    x connections per process (1 persistent, or the pool's DATABASE_POOL_SIZE), as
    shared_settings.base configures them from the same variables.
    """
    # Read as shared_settings.base reads them (django-environ), so both agree on every spelling.
    values = environ.Env()
    values.ENVIRON = env
    pooled = values.bool("DATABASE_POOL", default=False)
    per_process = values.int("DATABASE_POOL_SIZE", default=4) if pooled else 1
    return (values.int("WEB_CONCURRENCY", default=2) + asgi_processes) * per_process


def check_connections(topology, env):
    """Stop early if the processes could open more connections than the server allows."""
    bound = connections_bound(topology.asgi_processes, env)
    # PostgreSQL keeps superuser_reserved_connections (3) of max_connections for superusers.
    allowed = topology.postgres_max_connections - RESERVED_CONNECTIONS
    if bound > allowed:
        raise SystemExit(
            f"The processes may hold {bound} PostgreSQL connections; POSTGRES_MAX_CONNECTIONS="
            f"{topology.postgres_max_connections} allows {allowed}. Raise it, or lower "
            "WEB_CONCURRENCY, ASGI_PROCESSES or DATABASE_POOL_SIZE."
        )


def engine_user():
    """The user the server runs as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise SystemExit(f"Run as root, PostgreSQL needs the postgres user: {INSTALL}") from None
    return "postgres"


def as_engine_user(command):
    user = engine_user()
    return ["runuser", "-u", user, "--", *command] if user else command


def server_options(topology):
    """The settings every start of the server gets, as `-c name=value` options."""
    settings = {
        "port": topology.postgres_port,
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": topology.postgres_socket_dir,
        "max_connections": topology.postgres_max_connections,
    }
    return [option for k, v in settings.items() for option in ("-c", f"{k}={v}")]


def server_command(topology):
    """The command supervisord runs: the server, in the foreground."""
    return [binary("postgres"), "-D", str(topology.postgres_data_dir), *server_options(topology)]


def initialise(topology):
    """Make the cluster and the socket folder once, owned by the server's user."""
    data, sockets = topology.postgres_data_dir, topology.postgres_socket_dir
    socket_path = sockets / f".s.PGSQL.{topology.postgres_port}"
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise SystemExit(f"STATE_DIR is too deep for PostgreSQL's socket ({socket_path}).")
    user = engine_user()
    for folder in (data, sockets):
        folder.mkdir(mode=0o700, exist_ok=True)
        if user:
            shutil.chown(folder, user, user)
    reachable = subprocess.run(as_engine_user(["test", "-w", str(data)]), check=False)
    if reachable.returncode != 0:
        raise SystemExit(
            f"PostgreSQL's user ({user}) cannot reach {data}: let it through the folders above "
            "(chmod o+x), or set STATE_DIR to a folder it can reach."
        )
    if not (data / "PG_VERSION").exists():
        initdb = [binary("initdb"), "-D", str(data), "-U", USER, "-E", "UTF8", "--locale=C"]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256"]
        subprocess.run(as_engine_user(initdb), check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def prepared(topology):
    """Run the server while the block runs (to migrate), the database created; then stop it."""
    initialise(topology)
    data = topology.postgres_data_dir
    # The server's user writes this log, so it lives in the data directory, not STATE_DIR/log.
    pg_ctl = [binary("pg_ctl"), "-D", str(data), "-w", "-l", str(data / "runner-start.log")]
    subprocess.run(
        as_engine_user([*pg_ctl, "-o", " ".join(server_options(topology)), "start"]),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        create_database(topology)
        yield
    finally:
        stop = [*pg_ctl, "-m", "fast", "stop"]
        subprocess.run(as_engine_user(stop), check=True, stdout=subprocess.DEVNULL)


def create_database(topology):
    with psycopg.connect(**connection_params(topology, "postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [NAME]).fetchone():
            conn.execute(f'CREATE DATABASE "{NAME}"')


def connection_params(topology, dbname=NAME):
    """How a client reaches the server: its socket, as USER (libpq keywords)."""
    return {
        "host": str(topology.postgres_socket_dir),
        "port": topology.postgres_port,
        "user": USER,
        "dbname": dbname,
    }
