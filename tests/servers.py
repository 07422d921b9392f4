"""Throw-away PostgreSQL and Redis servers on loopback, for tests that need the real thing.

Both listen on this suite's own addresses (PostgreSQL on 127.205.0.1, Redis on 127.205.0.2),
keep all their files in a temporary folder, and are stopped by their own process id at the
end of the test session. Use them from a test module with

    pytest_plugins = ["servers"]

and the session-scoped fixtures `postgres_server` and `redis_server`. When a server binary is
missing the fixture skips, naming the Debian packages that provide it.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
`postgres` user (or `nobody`), in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTGRES_HOST = "127.205.0.1"
REDIS_HOST = "127.205.0.2"
INSTALL_HINT = "apt-get install postgresql redis-server"
START_TIMEOUT = 30.0

_database_numbers = itertools.count(1)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    folder: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database on this server; returns its URL."""
        import psycopg
        from psycopg import sql

        name = f"test_{os.getpid()}_{next(_database_numbers)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int

    def url(self, db: int = 0, prefix: str | None = None) -> str:
        query = "" if prefix is None else f"?prefix={prefix}"
        return f"redis://{self.host}:{self.port}/{db}{query}"


def find_binary(name: str) -> str | None:
    """`name` from the newest /usr/lib/postgresql/*/bin, else from PATH."""
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    return shutil.which(name)


def free_port(host: str, preferred: int) -> int:
    """`preferred` if nothing listens on host:preferred, else a free port the kernel picks
    (another test session on this machine may already run its own server)."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port on {host}")


def _wait_until_listening(proc: subprocess.Popen[bytes], host: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with status {proc.returncode} before listening on "
                f"{host}:{port}; its log:\n{_tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"server not listening on {host}:{port} after {START_TIMEOUT}s:\n{_tail(log)}"
    )


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-4000:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: None to stay ourselves when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a fresh PostgreSQL cluster on POSTGRES_HOST; stop it and delete it afterwards."""
    initdb, postgres = find_binary("initdb"), find_binary("postgres")
    if initdb is None or postgres is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, postgres) not found: {INSTALL_HINT}")
    account = _unprivileged_user()
    folder = Path(tempfile.mkdtemp(prefix="mxguard-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        run_as: dict[str, object] = {}
        if account is not None:
            os.chown(folder, account.pw_uid, account.pw_gid)
            run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        data = folder / "data"
        log = folder / "postgres.log"
        subprocess.run(
            [
                initdb,
                "-D",
                str(data),
                "-U",
                "mxguard",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=folder,
            env=env,
            check=True,
            capture_output=True,
            **run_as,  # type: ignore[call-overload]
        )
        port = free_port(POSTGRES_HOST, 5432)
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                # fsync off: speed over crash safety of the test server's own disk; the tests
                # check that mxguard commits before it returns, not that the disk has it.
                [
                    postgres,
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-c",
                    f"listen_addresses={POSTGRES_HOST}",
                    "-c",
                    f"unix_socket_directories={folder}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                ],
                cwd=folder,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                **run_as,  # type: ignore[call-overload]
            )
        _wait_until_listening(proc, POSTGRES_HOST, port, log)
        server = PostgresServer(POSTGRES_HOST, port, "mxguard", folder)
        _wait_for_sql(server, log)
        yield server
    finally:
        if proc is not None:
            # SIGINT is PostgreSQL's "fast shutdown": end sessions, checkpoint, exit.
            _stop(proc, signal.SIGINT)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_sql(server: PostgresServer, log: Path) -> None:
    # Listening is not ready: the server refuses logins while it is still starting up.
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with psycopg.connect(server.url(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL does not accept logins:\n{_tail(log)}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """Start a Redis server on REDIS_HOST without persistence; stop it afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(f"redis-server not found: {INSTALL_HINT}")
    folder = Path(tempfile.mkdtemp(prefix="mxguard-redis-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = free_port(REDIS_HOST, 6379)
        log = folder / "redis.log"
        proc = subprocess.Popen(
            [
                binary,
                "--bind",
                REDIS_HOST,
                "--port",
                str(port),
                "--dir",
                str(folder),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(log),
            ],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until_listening(proc, REDIS_HOST, port, log)
        yield RedisServer(REDIS_HOST, port)
    finally:
        if proc is not None:
            _stop(proc, signal.SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server
