"""Throw-away PostgreSQL, Redis and Dovecot servers on loopback, for tests that need the real
thing.

They listen on this suite's own addresses (PostgreSQL on 127.205.0.1, Redis on 127.205.0.2,
Dovecot where the test says, 127.74.0.1 by default), keep all their files in a temporary
folder, and are stopped by their own process id at the end. Use them from a test module with

    pytest_plugins = ["servers"]

and the session-scoped fixtures `postgres_server` and `redis_server`, or `running_dovecot(...)`
with a certificate of the test's choice. When a server binary is missing the fixture skips,
naming the Debian packages that provide it.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
`postgres` user (or `nobody`), in a folder that user owns. Dovecot runs as root (its master
process binds port 993 and starts its login and mail processes as Debian's `dovenull` and
`dovecot` users, and the mailbox's as `nobody`).
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
from typing import Any

import pytest

POSTGRES_HOST = "127.205.0.1"
REDIS_HOST = "127.205.0.2"
INSTALL_HINT = "apt-get install postgresql redis-server"
DOVECOT_HOST = "127.74.0.1"
DOVECOT_INSTALL_HINT = "apt-get install dovecot-imapd"
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


def free_port(host: str, preferred: int, *, reuse_address: bool = False) -> int:
    """`preferred` if nothing listens on host:preferred, else a free port the kernel picks
    (another test session on this machine may already run its own server). `reuse_address`:
    probe as a server that sets SO_REUSEADDR does, so that connections of an earlier server
    still in TIME_WAIT do not count as taking the port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if reuse_address:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


# --- Dovecot: a real IMAP server with one mailbox ----------------------------------------


@dataclass(frozen=True)
class DovecotServer:
    """A running Dovecot with one passwd-file user whose mail is the Maildir ``maildir``."""

    host: str
    port: int
    user: str
    password: str
    password_file: Path
    maildir: Path
    folder: Path
    uid: int
    gid: int

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    def _dir(self, mailbox: str | None) -> Path:
        # Maildir++ (Dovecot's default layout for maildir:): INBOX is the root, others ".NAME".
        return self.maildir if mailbox in (None, "INBOX") else self.maildir / f".{mailbox}"

    def deliver(self, message: bytes, mailbox: str | None = None) -> Path:
        """Put ``message`` into ``mailbox`` (INBOX by default) as an MDA does: written to tmp/,
        then renamed into new/, owned by the mailbox's user."""
        folder = self._dir(mailbox)
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            os.chown(folder / sub, self.uid, self.gid)
        os.chown(folder, self.uid, self.gid)
        name = f"{time.time_ns()}.M{next(_mail_numbers)}P{os.getpid()}.mxguard-test"
        temporary = folder / "tmp" / name
        temporary.write_bytes(message)
        os.chown(temporary, self.uid, self.gid)
        final = folder / "new" / name
        temporary.rename(final)
        return final

    def messages(self, mailbox: str | None = None) -> list[bytes]:
        """The messages in ``mailbox`` (new/ and cur/), oldest name first."""
        folder = self._dir(mailbox)
        files = sorted(
            (p for sub in ("new", "cur") if (folder / sub).is_dir()
             for p in (folder / sub).iterdir() if p.is_file()),
            key=lambda p: p.name,
        )  # fmt: skip
        return [p.read_bytes() for p in files]


_mail_numbers = itertools.count(1)


def issue_server_certificate(
    issuer_key: Any, issuer_cert: Any, names: list[str], addresses: list[str], folder: Path
) -> tuple[Path, Path]:
    """A server certificate for ``names`` and IP ``addresses`` signed by the given CA (e.g. a
    LabPKI root), written as PEM files: (certificate, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names or addresses)[0])]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


_DOVECOT_CONF = """\
# Written by tests/servers.py: one throw-away Dovecot, IMAP over TLS only.
protocols = imap
listen = {host}
instance_name = mxguard-test-{name}
base_dir = {folder}/run
state_dir = {folder}/state
log_path = {folder}/dovecot.log
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
{dh}
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain
auth_failure_delay = 0  # a refused login answers at once: a test waits for nothing
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {folder}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {folder}/passwd
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
"""


@contextlib.contextmanager
def running_dovecot(
    cert_file: Path,
    key_file: Path,
    *,
    host: str = DOVECOT_HOST,
    user: str = "tlsrpt",
    password: str = "report-inbox-secret",
) -> Iterator[DovecotServer]:
    """Start Dovecot on host:993 (or a free port) serving ``cert_file``; stop it and delete
    its folder afterwards."""
    binary = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.skip(f"dovecot not found: {DOVECOT_INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip("the Dovecot of these tests runs as root (port 993, its system users)")
    for account in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(account)
        except KeyError:
            pytest.skip(f"Dovecot's user {account!r} is missing: {DOVECOT_INSTALL_HINT}")
    mail_user = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="mxguard-dovecot-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        folder.chmod(0o755)  # the mail process (as nobody) walks to the mailbox
        home = folder / "home" / user
        maildir = home / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True)
        for path in (home, maildir, *(maildir / sub for sub in ("tmp", "new", "cur"))):
            os.chown(path, mail_user.pw_uid, mail_user.pw_gid)
        (folder / "home").chmod(0o755)
        password_file = folder / "password"
        password_file.write_text(password + "\n", encoding="utf-8")
        password_file.chmod(0o600)
        (folder / "passwd").write_text(
            f"{user}:{{PLAIN}}{password}:{mail_user.pw_uid}:{mail_user.pw_gid}::{home}::\n",
            encoding="utf-8",
        )
        port = free_port(host, 993, reuse_address=True)  # Dovecot sets SO_REUSEADDR
        dh = Path("/usr/share/dovecot/dh.pem")
        (folder / "dovecot.conf").write_text(
            _DOVECOT_CONF.format(
                host=host, port=port, folder=folder, cert=cert_file, key=key_file,
                name=f"{os.getpid()}-{port}-{host.replace('.', '-')}",
                dh=f"ssl_dh = <{dh}" if dh.exists() else "",
            ),
            encoding="utf-8",
        )  # fmt: skip
        log = folder / "dovecot.log"
        with open(folder / "dovecot.out", "wb") as out:
            proc = subprocess.Popen(
                [binary, "-F", "-c", str(folder / "dovecot.conf")],
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_until_listening(proc, host, port, log)
        yield DovecotServer(host, port, user, password, password_file, maildir, folder,
                            mail_user.pw_uid, mail_user.pw_gid)  # fmt: skip
    finally:
        if proc is not None:
            _stop(proc, signal.SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)
