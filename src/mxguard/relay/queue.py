"""The relay's queue: accepted messages and the state of each of their recipients.

It lives next to the rest of mxguard's state, in the SQLite file or PostgreSQL database that
``--store`` names, in tables of its own (``relay_messages``, ``relay_recipients``) with a
schema version of its own (``relay_schema_version``), so that it never touches the main store.

Durability, as for the main store (docs/design.md, "State"): ``add()`` returns only once the
message is committed, and the listener answers 250 to DATA only then. SQLite runs in WAL mode
with ``synchronous=FULL`` on a worker thread, every write one ``BEGIN IMMEDIATE`` transaction;
PostgreSQL commits with its default ``synchronous_commit = on``.

Work is claimed per (message, recipient domain): the rows are marked with the claiming node
(``claimed_by``) and a lease (``lease_until``). A node renews the leases it holds while it
delivers; when a node dies its leases run out and any node may claim the work again. In
PostgreSQL the claim takes the rows ``FOR UPDATE SKIP LOCKED``, so that nodes claiming at the
same moment never wait for each other or take the same rows. ``finish()`` records the outcome
of every recipient and queues the bounce, if any, in one transaction; a message whose
recipients are all done is deleted with it.

Delivery is at least once, as SMTP's is: a node killed after the remote server's 250 and
before ``finish()`` committed leaves the work to be done again.

Times are seconds since the epoch (float), in UTC by definition.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from mxguard.adapters.store import StoreError, redact_url

T = TypeVar("T")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 30.0  # seconds a SQLite writer waits for another process's transaction
CLAIM_SCAN = 1000  # recipients claimed together at most (the listener's limit per message)

QUEUED, DELIVERED, BOUNCED = "queued", "delivered", "bounced"

_TABLES = (
    """CREATE TABLE IF NOT EXISTS relay_messages (
        id          TEXT PRIMARY KEY,
        mail_from   TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        size        INTEGER NOT NULL,
        requiretls  INTEGER NOT NULL,
        tls_optional INTEGER NOT NULL,
        client      TEXT NOT NULL,
        data        {blob} NOT NULL
    )""",
    # One row per recipient; state queued -> delivered | bounced (rows are deleted with the
    # message once none is queued).
    """CREATE TABLE IF NOT EXISTS relay_recipients (
        message_id      TEXT NOT NULL,
        recipient       TEXT NOT NULL,
        domain          TEXT NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error      TEXT,
        claimed_by      TEXT,
        lease_until     DOUBLE PRECISION,
        PRIMARY KEY (message_id, recipient)
    )""",
    "CREATE INDEX IF NOT EXISTS relay_recipients_due ON relay_recipients (state, next_attempt_at)",
)


@dataclass(frozen=True)
class NewMessage:
    """A message to queue: the envelope (RFC 5321), the content, and how it must travel."""

    mail_from: str  # "" is the null reverse-path (a bounce)
    recipients: tuple[str, ...]
    data: bytes
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS (RFC 8689 §2)
    tls_optional: bool = False  # TLS-Required: No (RFC 8689 §3)
    client: str = ""  # who handed it to us, for people


@dataclass(frozen=True)
class Work:
    """What one node claimed: the due recipients of one message in one domain."""

    message_id: str
    domain: str
    recipients: tuple[str, ...]
    attempts: int  # attempts made so far (the most of these recipients)
    mail_from: str
    data: bytes
    requiretls: bool
    tls_optional: bool
    received_at: float


@dataclass(frozen=True)
class Decision:
    """What became of one recipient after an attempt."""

    recipient: str
    state: str  # QUEUED (try again at next_attempt_at), DELIVERED or BOUNCED
    next_attempt_at: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Entry:
    """One queued recipient, for ``relay queue``."""

    message_id: str
    recipient: str
    domain: str
    mail_from: str
    received_at: float
    size: int
    requiretls: bool
    tls_optional: bool
    attempts: int
    next_attempt_at: float
    last_error: str | None
    claimed_by: str | None
    lease_until: float | None


def new_id() -> str:
    return secrets.token_hex(10)


def domain_of(recipient: str) -> str:
    return recipient.rpartition("@")[2].lower().rstrip(".")


class RelayQueue:
    """The operations both backends offer; SQL is written with ``?`` placeholders."""

    placeholder = "?"
    lock_rows = ""  # appended to the claim's SELECT

    async def _transaction(self, work: Callable[[Any], T]) -> T:  # pragma: no cover
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    # Each operation is a function of a cursor-like ``db`` with ``execute(sql, params)``
    # returning rows, run inside one transaction by the backend.

    async def add(self, message: NewMessage, now: float) -> str:
        """Queue ``message``; returns its id once it is committed (durable)."""
        message_id = new_id()

        def work(db: Any) -> str:
            self._insert(db, message_id, message, now)
            return message_id

        return await self._transaction(work)

    def _insert(self, db: Any, message_id: str, m: NewMessage, now: float) -> None:
        db(
            "INSERT INTO relay_messages (id, mail_from, received_at, size, requiretls, "
            "tls_optional, client, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (message_id, m.mail_from, now, len(m.data), int(m.requiretls), int(m.tls_optional),
             m.client, m.data),
        )  # fmt: skip
        for rcpt in dict.fromkeys(m.recipients):
            db(
                "INSERT INTO relay_recipients (message_id, recipient, domain, state, attempts, "
                "next_attempt_at) VALUES (?, ?, ?, ?, 0, ?)",
                (message_id, rcpt, domain_of(rcpt), QUEUED, now),
            )

    async def claim(
        self, node: str, now: float, lease: float, busy: Sequence[str] = ()
    ) -> Work | None:
        """Claim the due recipients of one message in one domain not in ``busy``, for
        ``lease`` seconds; None when nothing is due."""

        def work(db: Any) -> Work | None:
            skip = ""
            if busy:
                skip = " AND domain NOT IN (" + ", ".join("?" for _ in busy) + ")"
            due = "state = ? AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
            first = db(
                f"SELECT message_id, domain FROM relay_recipients WHERE {due}{skip} "
                f"ORDER BY next_attempt_at, message_id LIMIT 1{self.lock_rows}",
                (QUEUED, now, now, *busy),
            )
            if not first:
                return None
            message_id, domain = first[0][0], first[0][1]
            # The other due recipients of the same message and domain; rows another node is
            # claiming right now are skipped, not waited for (no deadlock, no double claim).
            rows = db(
                f"SELECT recipient, attempts FROM relay_recipients WHERE {due} AND "
                f"message_id = ? AND domain = ? LIMIT {CLAIM_SCAN}{self.lock_rows}",
                (QUEUED, now, now, message_id, domain),
            )
            if not rows:
                return None
            mine = [(str(r[0]), int(r[1])) for r in rows]
            for rcpt, _ in mine:
                db(
                    "UPDATE relay_recipients SET claimed_by = ?, lease_until = ? "
                    "WHERE message_id = ? AND recipient = ?",
                    (node, now + lease, message_id, rcpt),
                )
            [m] = db(
                "SELECT mail_from, data, requiretls, tls_optional, received_at "
                "FROM relay_messages WHERE id = ?",
                (message_id,),
            )
            return Work(
                message_id, domain, tuple(r for r, _ in mine), max(a for _, a in mine),
                str(m[0]), bytes(m[1]), bool(m[2]), bool(m[3]), float(m[4]),
            )  # fmt: skip

        return await self._transaction(work)

    async def renew(self, work: Work, node: str, until: float) -> None:
        """Extend the lease on ``work`` while it is being delivered."""

        def run(db: Any) -> None:
            db(
                "UPDATE relay_recipients SET lease_until = ? WHERE message_id = ? AND "
                "claimed_by = ? AND state = ?",
                (until, work.message_id, node, QUEUED),
            )

        await self._transaction(run)

    async def finish(
        self, work: Work, decisions: Sequence[Decision], bounce: NewMessage | None, now: float
    ) -> str | None:
        """Record ``decisions`` and queue ``bounce``, in one transaction; the bounce's id."""
        bounce_id = new_id() if bounce is not None else None

        def run(db: Any) -> None:
            for d in decisions:
                if d.state == QUEUED:
                    db(
                        "UPDATE relay_recipients SET attempts = attempts + 1, "
                        "next_attempt_at = ?, last_error = ?, claimed_by = NULL, "
                        "lease_until = NULL WHERE message_id = ? AND recipient = ? AND state = ?",
                        (d.next_attempt_at, d.error, work.message_id, d.recipient, QUEUED),
                    )
                else:
                    db(
                        "UPDATE relay_recipients SET attempts = attempts + 1, state = ?, "
                        "last_error = ?, claimed_by = NULL, lease_until = NULL "
                        "WHERE message_id = ? AND recipient = ? AND state = ?",
                        (d.state, d.error, work.message_id, d.recipient, QUEUED),
                    )
            if bounce is not None and bounce_id is not None:
                self._insert(db, bounce_id, bounce, now)
            left = db(
                "SELECT COUNT(*) FROM relay_recipients WHERE message_id = ? AND state = ?",
                (work.message_id, QUEUED),
            )
            if int(left[0][0]) == 0:
                db("DELETE FROM relay_recipients WHERE message_id = ?", (work.message_id,))
                db("DELETE FROM relay_messages WHERE id = ?", (work.message_id,))

        await self._transaction(run)
        return bounce_id

    async def release(self, node: str) -> int:
        """Give up every lease ``node`` holds (a node starting again holds nothing)."""

        def run(db: Any) -> int:
            rows = db(
                "SELECT COUNT(*) FROM relay_recipients WHERE claimed_by = ? AND state = ?",
                (node, QUEUED),
            )
            db(
                "UPDATE relay_recipients SET claimed_by = NULL, lease_until = NULL "
                "WHERE claimed_by = ?",
                (node,),
            )
            return int(rows[0][0])

        return await self._transaction(run)

    async def next_due(self) -> float | None:
        """When the earliest queued recipient may be tried (its lease's end if leased)."""

        def run(db: Any) -> float | None:
            rows = db(
                "SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until > "
                "next_attempt_at THEN lease_until ELSE next_attempt_at END) "
                "FROM relay_recipients WHERE state = ?",
                (QUEUED,),
            )
            return None if not rows or rows[0][0] is None else float(rows[0][0])

        return await self._transaction(run)

    async def entries(self) -> list[Entry]:
        """Every queued recipient, oldest message first."""

        def run(db: Any) -> list[Entry]:
            rows = db(
                "SELECT r.message_id, r.recipient, r.domain, m.mail_from, m.received_at, m.size, "
                "m.requiretls, m.tls_optional, r.attempts, r.next_attempt_at, r.last_error, "
                "r.claimed_by, r.lease_until FROM relay_recipients r JOIN relay_messages m "
                "ON m.id = r.message_id WHERE r.state = ? "
                "ORDER BY m.received_at, r.message_id, r.recipient",
                (QUEUED,),
            )
            return [
                Entry(
                    str(r[0]),
                    str(r[1]),
                    str(r[2]),
                    str(r[3]),
                    float(r[4]),
                    int(r[5]),
                    bool(r[6]),
                    bool(r[7]),
                    int(r[8]),
                    float(r[9]),
                    r[10],
                    r[11],
                    None if r[12] is None else float(r[12]),
                )
                for r in rows
            ]

        return await self._transaction(run)


# --- SQLite ---------------------------------------------------------------------------------


class SqliteQueue(RelayQueue):
    """The queue in a SQLite file (the one ``--store sqlite:///PATH`` names)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-queue")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> SqliteQueue:
        q = cls(path)
        try:
            await q._call(q._connect)
        except BaseException:
            await q.close()
            raise
        return q

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for ddl in _TABLES:
                conn.execute(ddl.format(blob="BLOB"))
            _check_version(lambda s, p: conn.execute(s, p).fetchall())
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def _call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            kind = {5: "busy", 8: "readonly", 10: "ioerr", 11: "corrupt", 13: "full",
                    14: "cantopen", 26: "notadb"}.get(code, "other")  # fmt: skip
            raise StoreError(
                f"the relay queue in {self.path} failed: {exc}; check that the file is "
                "writable and the disk not full, then try again",
                kind=kind,
                detail=str(exc),
            ) from exc

    async def _transaction(self, work: Callable[[Any], T]) -> T:
        def run() -> T:
            conn = self._conn
            if conn is None:
                raise StoreError("the relay queue is closed")

            def db(sql: str, params: Sequence[Any] = ()) -> list[Any]:
                return conn.execute(sql, tuple(params)).fetchall()

            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return await self._call(run)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)


def _check_version(db: Callable[[str, Sequence[Any]], list[Any]]) -> None:
    db("CREATE TABLE IF NOT EXISTS relay_schema_version (version INTEGER NOT NULL)", ())
    rows = db("SELECT version FROM relay_schema_version", ())
    if not rows:
        db("INSERT INTO relay_schema_version (version) VALUES (1)", ())
    elif int(rows[0][0]) > SCHEMA_VERSION:
        raise StoreError(
            f"the relay queue has schema version {rows[0][0]}, newer than this mxguard's "
            f"({SCHEMA_VERSION}); run the newer mxguard, or give the relay another --store"
        )


# --- PostgreSQL -----------------------------------------------------------------------------


class PostgresQueue(RelayQueue):
    """The queue in the PostgreSQL database ``--store postgresql://...`` names, shared by
    several relay nodes (each with its own ``--node-id``).

    The operations are plain functions of a ``db`` callable (shared with SQLite), so they run
    on a worker thread with psycopg's synchronous connection, one at a time."""

    lock_rows = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-queue")

    @classmethod
    async def open(cls, url: str) -> PostgresQueue:
        q = cls(url)

        def schema(db: Any) -> None:
            db("SELECT pg_advisory_xact_lock(hashtext('mxguard relay schema'))")
            for ddl in _TABLES:
                db(ddl.format(blob="BYTEA"))
            _check_version(db)

        try:
            await q._transaction(schema)
        except BaseException:
            await q.close()
            raise
        return q

    async def _transaction(self, work: Callable[[Any], T]) -> T:
        import psycopg

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._run, work)
        except psycopg.Error as exc:
            if self._conn is not None and self._conn.broken:
                self._conn = None  # connect again next time
            raise StoreError(
                f"the relay queue in {redact_url(self.url)} failed: {exc}; check that the "
                "server is up and the URL, user and password are right, then try again",
                detail=str(exc),
            ) from exc

    def _run(self, work: Callable[[Any], T]) -> T:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        conn = self._conn

        def db(sql: str, params: Sequence[Any] = ()) -> list[Any]:
            cur = conn.execute(sql.replace("?", "%s"), tuple(params))
            return list(cur.fetchall()) if cur.description is not None else []

        with conn.transaction():
            return work(db)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)


async def open_queue(url: str) -> RelayQueue:
    """The relay queue in the store ``url`` names (sqlite:///PATH or postgresql://...)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite" and sep:
        if rest == "/:memory:" or not rest.startswith("/") or rest.endswith("/"):
            raise StoreError(
                f"the relay queue needs a file: {url!r} does not name one; use "
                "sqlite:///ABSOLUTE/PATH (a queue in memory would lose accepted mail)"
            )
        return await SqliteQueue.open(rest)
    if scheme in ("postgresql", "postgres") and sep:
        return await PostgresQueue.open(url)
    raise StoreError(
        f"the relay queue cannot live in {redact_url(url)!r}; use --store sqlite:///PATH "
        "(one node) or --store postgresql://... (several nodes)"
    )
