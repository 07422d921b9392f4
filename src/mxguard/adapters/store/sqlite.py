"""The default store: one SQLite file (or `:memory:`), embedded, no server to run. A `Store`:
all seven roles (store/__init__.py), call for call as the PostgreSQL backend does
(tests/test_store_conformance.py).

Durability (what docs/design.md "State" asks: durable before acknowledged): the database runs in
WAL mode with `synchronous=FULL`, so a transaction is fsynced to the WAL before COMMIT
returns; every write is one explicit transaction. Several mxguard processes may share the
file: writers take the lock with `BEGIN IMMEDIATE` and wait up to BUSY_TIMEOUT for each other.

sqlite3 blocks, so each store owns worker threads that hold its connections and run every
write and every read but the point reads below; coroutines hand work to them and await the
answer, keeping the event loop free.
There are two (a file; `:memory:` has one): a writer, and a reader with a connection of its
own, so that a read never queues behind a write waiting for another process's lock (in WAL
mode readers do not wait for writers). A reader waits at most READ_BUSY_TIMEOUT.

The exception: the point reads of a lookup (one domain's cached policy, learned levels,
drops and last served policy; the latest alarm), each one indexed row or a few, run at once
on the thread of the event loop that opened the store, on a third connection with no busy
timeout: SQLite answers them from the page cache in 5-15 µs of CPU, where handing one to the
reader thread and back cost 40-130 µs and two thread wake-ups, most of a cold lookup's store
time. When SQLite would have to wait for a lock (WAL recovery by another process, a lock held
in exclusive mode), that read goes to the reader thread as any other.

A damaged file is refused at open (`PRAGMA quick_check`), with what to do about it, rather
than failing lookup after lookup. Errors of the database itself become StoreError with a
`kind` (`corrupt`, `full`, `busy`, …) and SQLite's own words as `detail`.

The schema carries a version (table `schema_version`); MIGRATIONS upgrade an older file in
place, and a file from a newer mxguard is refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from mxguard.adapters.store import (
    CachedPolicy,
    CheckRecord,
    DayTotals,
    LearnedHost,
    LevelDrop,
    LevelSeen,
    OrganizationTotals,
    PendingReport,
    ReceivedRecord,
    ReportSource,
    ReportTotals,
    ServedPolicy,
    SessionResult,
    StoreError,
    StrippingAlarm,
    Tally,
    as_utc,
    assemble_received,
    check_alarm,
    check_check,
    check_claim,
    check_domain,
    check_drop,
    check_inbox_range,
    check_policy,
    check_received,
    check_report,
    check_report_id,
    check_result,
    check_run,
    check_seen,
    check_served,
    check_text,
    dkim_from_store,
    format_time,
    known_policy_type,
    known_result_type,
    level_from_store,
    parse_time,
    policy_from_store,
    readded_report,
    result_type_from_store,
)
from mxguard.protocol.tlsrpt_report import FailureDetail

if TYPE_CHECKING:  # a received report's classes: imported where one is read
    from mxguard.protocol.tlsrpt_ingest import ReceivedPolicy

T = TypeVar("T")

# Seconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT = 30.0
# Seconds a reader waits (only during WAL recovery, or for a writer in exclusive locking mode).
READ_BUSY_TIMEOUT = 2.0
# SQLite's primary result codes (https://sqlite.org/rescode.html), named for StoreError.kind.
_KINDS = {5: "busy", 6: "locked", 8: "readonly", 10: "ioerr", 11: "corrupt", 13: "full",
          14: "cantopen", 26: "notadb"}  # fmt: skip

# MIGRATIONS[n] takes a database from schema version n to n + 1 (version 0 = empty file).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # MTA-STS policy cache, RFC 8461 §5: one row per policy domain.
        """CREATE TABLE sts_policies (
            domain      TEXT PRIMARY KEY,
            policy_id   TEXT NOT NULL,
            policy_text TEXT NOT NULL,
            fetched_at  TEXT NOT NULL,
            expires_at  TEXT NOT NULL
        )""",
        # TLS-RPT raw material, RFC 8460 §4: one row per SMTP session. AUTOINCREMENT keeps
        # ids unique forever, so a report-id never lands on a row that reused a pruned id.
        # Tuples are JSON arrays.
        """CREATE TABLE session_results (
            id             INTEGER PRIMARY KEY AUTOINCREMENT,
            at             TEXT NOT NULL,
            policy_domain  TEXT NOT NULL,
            policy_type    TEXT NOT NULL,
            policy_strings TEXT NOT NULL,
            mx_patterns    TEXT NOT NULL,
            result_type    TEXT,
            sending_ip     TEXT,
            receiving_mx   TEXT,
            receiving_ip   TEXT,
            receiving_helo TEXT,
            detail         TEXT,
            rua            TEXT NOT NULL,
            is_report      INTEGER NOT NULL,
            reported       TEXT
        )""",
        "CREATE INDEX session_results_at ON session_results (at)",
        "CREATE INDEX session_results_domain_at ON session_results (policy_domain, at)",
    ),
    (
        # Built TLS-RPT reports waiting for (or done with) delivery, RFC 8460 §5: the data is
        # kept until some rua accepted it. One per policy domain and day. Tuples are JSON.
        """CREATE TABLE tlsrpt_reports (
            report_id       TEXT PRIMARY KEY,
            policy_domain   TEXT NOT NULL,
            start           TEXT NOT NULL,
            filename        TEXT NOT NULL,
            body            BLOB NOT NULL,
            rua             TEXT NOT NULL,
            result_ids      TEXT NOT NULL,
            created_at      TEXT NOT NULL,
            next_attempt_at TEXT NOT NULL,
            attempts        INTEGER NOT NULL,
            last_error      TEXT,
            delivered_at    TEXT,
            delivered_to    TEXT,
            UNIQUE (policy_domain, start)
        )""",
        "CREATE INDEX tlsrpt_reports_next ON tlsrpt_reports (next_attempt_at)",
    ),
    (
        # Results recorded after their day was built go into a further report for that day
        # (RFC 8460 §4.4: several reports, each with its own report-id), so the one-report-
        # per-day constraint goes; a result belongs to the report that was built over it
        # (`built_into`, set in the transaction that stores the report), which is what stops
        # a session from being reported twice. Reports no rua will accept are dropped.
        "ALTER TABLE session_results ADD COLUMN built_into TEXT",
        "UPDATE session_results SET built_into = reported WHERE reported IS NOT NULL",
        """UPDATE session_results SET built_into = (
            SELECT r.report_id FROM tlsrpt_reports r, json_each(r.result_ids) j
            WHERE j.value = session_results.id LIMIT 1
        ) WHERE built_into IS NULL""",
        "CREATE INDEX session_results_unbuilt ON session_results (at) WHERE built_into IS NULL",
        """CREATE TABLE tlsrpt_reports_v3 (
            report_id       TEXT PRIMARY KEY,
            policy_domain   TEXT NOT NULL,
            start           TEXT NOT NULL,
            filename        TEXT NOT NULL,
            body            BLOB NOT NULL,
            rua             TEXT NOT NULL,
            result_ids      TEXT NOT NULL,
            created_at      TEXT NOT NULL,
            next_attempt_at TEXT NOT NULL,
            attempts        INTEGER NOT NULL,
            last_error      TEXT,
            delivered_at    TEXT,
            delivered_to    TEXT,
            dropped_at      TEXT
        )""",
        """INSERT INTO tlsrpt_reports_v3 SELECT report_id, policy_domain, start, filename, body,
            rua, result_ids, created_at, next_attempt_at, attempts, last_error, delivered_at,
            delivered_to, NULL FROM tlsrpt_reports""",
        "DROP TABLE tlsrpt_reports",
        "ALTER TABLE tlsrpt_reports_v3 RENAME TO tlsrpt_reports",
        "CREATE INDEX tlsrpt_reports_next ON tlsrpt_reports (next_attempt_at)",
        "CREATE INDEX tlsrpt_reports_day ON tlsrpt_reports (policy_domain, start)",
    ),
    (
        # What the Postfix policy server served, from `at` on (store/__init__.py ServedPolicy):
        # the collector reports Postfix's sessions under these. Tuples are JSON arrays.
        """CREATE TABLE served_policies (
            id             INTEGER PRIMARY KEY AUTOINCREMENT,
            domain         TEXT NOT NULL,
            at             TEXT NOT NULL,
            policy_type    TEXT NOT NULL,
            policy_strings TEXT NOT NULL,
            mx_patterns    TEXT NOT NULL,
            rua            TEXT NOT NULL,
            mx_hosts       TEXT NOT NULL,
            mx_addresses   TEXT NOT NULL,
            answer         TEXT NOT NULL
        )""",
        "CREATE INDEX served_policies_domain_at ON served_policies (domain, at)",
    ),
    (
        # The history of `mxguard check` (store/__init__.py CheckRecord): one row per check of
        # a domain, the whole JSON report as text.
        """CREATE TABLE checks (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            domain        TEXT NOT NULL,
            at            TEXT NOT NULL,
            verdict       TEXT NOT NULL,
            report        TEXT NOT NULL,
            policy_id     TEXT,
            policy_digest TEXT,
            run           TEXT
        )""",
        "CREATE INDEX checks_domain_at ON checks (domain, at)",
        # Who checks which domain in a bulk run: `node` holds the claim until `lease_until`;
        # `check_id` (the check added for it) set means done. A claim created done by
        # add_check has neither node nor lease.
        """CREATE TABLE check_claims (
            run         TEXT NOT NULL,
            domain      TEXT NOT NULL,
            node        TEXT,
            lease_until TEXT,
            check_id    INTEGER,
            PRIMARY KEY (run, domain)
        )""",
    ),
    (
        # TLS reports received for domain owners (store/__init__.py ReceivedRecord), RFC 8460
        # §4: one row per report, stored once per dedupe_key, with its raw body; one row per
        # policy with its counts, one per failure detail. `position` keeps the report's order.
        # Tuples are JSON arrays; dkim_ok NULL means no signature was checked (not mail).
        """CREATE TABLE received_reports (
            id                INTEGER PRIMARY KEY AUTOINCREMENT,
            dedupe_key        TEXT NOT NULL UNIQUE,
            organization_name TEXT NOT NULL,
            report_id         TEXT NOT NULL,
            range_start       TEXT NOT NULL,
            range_end         TEXT NOT NULL,
            contact_info      TEXT,
            notes             TEXT NOT NULL,
            received_at       TEXT NOT NULL,
            source            TEXT NOT NULL,
            dkim_ok           INTEGER,
            dkim_domain       TEXT,
            dkim_selector     TEXT,
            dkim_detail       TEXT,
            raw               BLOB NOT NULL
        )""",
        "CREATE INDEX received_reports_start ON received_reports (range_start)",
        """CREATE TABLE received_policies (
            id             INTEGER PRIMARY KEY AUTOINCREMENT,
            received_id    INTEGER NOT NULL REFERENCES received_reports (id),
            position       INTEGER NOT NULL,
            policy_type    TEXT NOT NULL,
            policy_domain  TEXT,
            policy_strings TEXT NOT NULL,
            mx_hosts       TEXT NOT NULL,
            successful     INTEGER NOT NULL,
            failed         INTEGER NOT NULL
        )""",
        "CREATE INDEX received_policies_report ON received_policies (received_id)",
        "CREATE INDEX received_policies_domain ON received_policies (policy_domain)",
        """CREATE TABLE received_failures (
            id                     INTEGER PRIMARY KEY AUTOINCREMENT,
            policy_id              INTEGER NOT NULL REFERENCES received_policies (id),
            position               INTEGER NOT NULL,
            result_type            TEXT NOT NULL,
            sending_mta_ip         TEXT,
            receiving_mx_hostname  TEXT,
            receiving_mx_helo      TEXT,
            receiving_ip           TEXT,
            failed_session_count   INTEGER NOT NULL,
            additional_information TEXT,
            failure_reason_code    TEXT
        )""",
        "CREATE INDEX received_failures_policy ON received_failures (policy_id)",
    ),
    (
        # Learned security levels (docs/learned.md): one row per (domain, MX host, address).
        # `rank` orders the levels (plain 0 < tls 1 < webpki 2 < dane 3).
        """CREATE TABLE learned_hosts (
            domain     TEXT NOT NULL,
            mx         TEXT NOT NULL,
            ip         TEXT NOT NULL,
            level      TEXT NOT NULL,
            rank       INTEGER NOT NULL,
            first_seen TEXT NOT NULL,
            last_seen  TEXT NOT NULL,
            seen       INTEGER NOT NULL,
            PRIMARY KEY (domain, mx, ip)
        )""",
        """CREATE TABLE learned_drops (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            at          TEXT NOT NULL,
            domain      TEXT NOT NULL,
            mx          TEXT NOT NULL,
            ip          TEXT NOT NULL,
            learned     TEXT NOT NULL,
            seen        TEXT NOT NULL,
            result_type TEXT
        )""",
        "CREATE INDEX learned_drops_at ON learned_drops (at)",
        "CREATE INDEX learned_drops_domain ON learned_drops (domain, at)",
        # At most one active alarm: the partial unique index makes raising it atomic.
        """CREATE TABLE learned_alarms (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            raised_at  TEXT NOT NULL,
            domains    TEXT NOT NULL,
            hosts      TEXT NOT NULL,
            window_s   REAL NOT NULL,
            enforce    INTEGER NOT NULL,
            cleared_at TEXT
        )""",
        "CREATE UNIQUE INDEX learned_alarms_active ON learned_alarms ((cleared_at IS NULL)) "
        "WHERE cleared_at IS NULL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_RESULT_COLUMNS = (
    "at, policy_domain, policy_type, policy_strings, mx_patterns, result_type, sending_ip, "
    "receiving_mx, receiving_ip, receiving_helo, detail, rua, is_report, reported"
)
_SERVED_COLUMNS = (
    "domain, at, policy_type, policy_strings, mx_patterns, rua, mx_hosts, mx_addresses, answer"
)
_REPORT_COLUMNS = (
    "report_id, policy_domain, start, filename, body, rua, result_ids, created_at, "
    "next_attempt_at, attempts, last_error, delivered_at, delivered_to, dropped_at"
)
_CHECK_COLUMNS = "domain, at, verdict, report, policy_id, policy_digest, run"
_RECEIVED_COLUMNS = (
    "dedupe_key, organization_name, report_id, range_start, range_end, contact_info, notes, "
    "received_at, source, dkim_ok, dkim_domain, dkim_selector, dkim_detail, raw"
)
_RECEIVED_POLICY_COLUMNS = (
    "received_id, position, policy_type, policy_domain, policy_strings, mx_hosts, successful, "
    "failed"
)
_RECEIVED_FAILURE_COLUMNS = (
    "policy_id, position, result_type, sending_mta_ip, receiving_mx_hostname, "
    "receiving_mx_helo, receiving_ip, failed_session_count, additional_information, "
    "failure_reason_code"
)
# The reports of a domain whose date range starts in [start, end).
_INBOX_REPORTS = (
    "SELECT r.id FROM received_reports r WHERE r.range_start >= :start "
    "AND r.range_start < :end AND EXISTS (SELECT 1 FROM received_policies q "
    "WHERE q.received_id = r.id AND q.policy_domain = :domain)"
)
# The policies of a domain in the reports whose date range starts in [start, end).
_INBOX_POLICIES = (
    "FROM received_policies p JOIN received_reports r ON r.id = p.received_id "
    "WHERE p.policy_domain = :domain AND r.range_start >= :start AND r.range_start < :end"
)
_INBOX_FAILURES = (
    "FROM received_failures f JOIN received_policies p ON p.id = f.policy_id "
    "JOIN received_reports r ON r.id = p.received_id "
    "WHERE p.policy_domain = :domain AND r.range_start >= :start AND r.range_start < :end"
)


class SQLiteStore:
    """A Store on one SQLite database; open it with `await SQLiteStore.open(path)`."""

    def __init__(self, path: str, executor: _Worker) -> None:
        self.path = path
        self._executor = executor  # the writer
        self._reader: _Worker | None = None  # None: reads go to the writer
        self._conn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        # The point reads' connection, used only on the thread that opened the store.
        self._here: sqlite3.Connection | None = None
        self._here_thread: int | None = None
        self._closed = False
        self._inode: int | None = None  # the file opened, to notice it removed or replaced
        # put_policy's group commit: rows waiting for the next commit, and the task making it.
        self._policy_batch: list[tuple[tuple[str, ...], asyncio.Future[None]]] = []
        self._policy_flush: asyncio.Future[None] | None = None

    def file_problem(self) -> str | None:
        """Whether the file at ``path`` is still the one open (None: it is). A removed file
        stays usable through the open connection, but what is written now is gone at the
        next start: the trust-on-first-use cache silently shrinks."""
        if self._inode is None:
            return None
        # sqlite:////tmp/x names "//tmp/x", the same file as /tmp/x
        shown = "/" + self.path.lstrip("/") if self.path.startswith("/") else self.path
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return (
                f"the store file {shown} was removed while open: what is cached from now "
                "on is lost at the next start; restart mxguard to use a new file, or put the "
                "file back"
            )
        except OSError as exc:
            return f"the store file {shown} cannot be looked at: {exc.strerror}"
        if inode != self._inode:
            return (
                f"the store file {shown} was replaced while open; mxguard still uses the "
                "old one: restart it to use the new file"
            )
        return None

    @classmethod
    async def open(cls, path: str) -> SQLiteStore:
        """Open (creating if needed) the database at `path` (or ":memory:") and migrate it;
        refuse a damaged file."""
        store = cls(path, _Worker("mxguard-sqlite"))
        try:
            await store._run(store._connect)
            if path != ":memory:":  # a second connection to :memory: is another database
                store._reader = _Worker("mxguard-sqlite-read")
                await store._run(store._connect_reader, store._reader)
                store._connect_here()
        except BaseException:
            await store.close()
            raise
        return store

    # --- policy cache (RFC 8461 §5) ---

    async def get_policy(self, domain: str) -> CachedPolicy | None:
        check_domain(domain)

        def work(conn: sqlite3.Connection) -> CachedPolicy | None:
            row = conn.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, expires_at "
                "FROM sts_policies WHERE domain = ?",
                (domain,),
            ).fetchone()
            return None if row is None else _policy_from_row(row)

        return await self._read_point(work)

    async def put_policy(self, policy: CachedPolicy) -> None:
        """Durable when it returns, like every write; puts that arrive while a commit runs
        share the next one (a burst of cold lookups costs one fsync per batch, not per
        policy). If a shared commit fails, each put of it is tried again on its own, so
        one put's failure is never another's."""
        p = check_policy(policy)
        row = (
            p.domain,
            p.policy_id,
            p.policy_text,
            format_time(p.fetched_at),
            format_time(p.expires_at),
        )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._policy_batch.append((row, done))
        if self._policy_flush is None:
            self._policy_flush = asyncio.ensure_future(self._flush_policies())
        await done

    async def _flush_policies(self) -> None:
        batch: list[tuple[tuple[str, ...], asyncio.Future[None]]] = []
        try:
            while self._policy_batch:
                batch, self._policy_batch = self._policy_batch, []
                outcomes: list[StoreError | None] = [None] * len(batch)
                try:
                    await self._put_rows([row for row, _ in batch])
                except StoreError as exc:
                    if len(batch) == 1:
                        outcomes = [exc]
                    else:  # each on its own: one put's failure is not the others'
                        outcomes = [await self._try_put(row) for row, _ in batch]
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    _settle(done, None, outcome)
        except BaseException as exc:
            # Not SQLite's error (the worker gone, the task cancelled): no put may wait
            # forever for a commit that will not come.
            waiting, self._policy_batch = batch + self._policy_batch, []
            for _, done in waiting:
                if isinstance(exc, Exception):
                    _settle(done, None, exc)
                else:
                    done.cancel()
            raise
        finally:
            self._policy_flush = None

    async def _try_put(self, row: tuple[str, ...]) -> StoreError | None:
        try:
            await self._put_rows([row])
        except StoreError as exc:
            return exc
        return None

    async def _put_rows(self, rows: list[tuple[str, ...]]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            _put(conn, rows)

        await self._with_conn(work)

    async def delete_policy(self, domain: str) -> None:
        check_domain(domain)

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.execute("DELETE FROM sts_policies WHERE domain = ?", (domain,))

        await self._with_conn(work)

    async def policies(self) -> list[CachedPolicy]:
        def work(conn: sqlite3.Connection) -> list[CachedPolicy]:
            rows = conn.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, expires_at "
                "FROM sts_policies ORDER BY domain"
            ).fetchall()
            return [_policy_from_row(row) for row in rows]

        return await self._with_reader(work)

    # --- TLS-RPT session results (RFC 8460 §4) ---

    async def add_results(self, results: Sequence[SessionResult]) -> None:
        rows = [_result_to_row(check_result(r)) for r in results]
        if not rows:
            return

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.executemany(
                    f"INSERT INTO session_results ({_RESULT_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        await self._with_conn(work)

    async def results_between(
        self,
        start: datetime,
        end: datetime,
        *,
        unreported_only: bool = True,
        unbuilt_only: bool = False,
    ) -> list[SessionResult]:
        lo = format_time(as_utc(start, "start"))
        hi = format_time(as_utc(end, "end"))
        where = "at >= ? AND at < ?" + (" AND reported IS NULL" if unreported_only else "")
        where += " AND built_into IS NULL" if unbuilt_only else ""

        def work(conn: sqlite3.Connection) -> list[SessionResult]:
            rows = conn.execute(
                f"SELECT id, {_RESULT_COLUMNS} FROM session_results WHERE {where} ORDER BY at, id",
                (lo, hi),
            ).fetchall()
            return [_result_from_row(row) for row in rows]

        return await self._with_reader(work)

    async def oldest_unbuilt(self, start: datetime, end: datetime) -> datetime | None:
        lo = format_time(as_utc(start, "start"))
        hi = format_time(as_utc(end, "end"))

        def work(conn: sqlite3.Connection) -> datetime | None:
            row = conn.execute(
                "SELECT min(at) FROM session_results WHERE built_into IS NULL AND at >= ? "
                "AND at < ? AND is_report = 0 AND rua != '[]'",
                (lo, hi),
            ).fetchone()
            return None if row is None or row[0] is None else parse_time(str(row[0]))

        return await self._with_reader(work)

    async def mark_reported(self, ids: Iterable[int], report_id: str) -> None:
        params = [(report_id, int(i)) for i in ids]
        check_report_id(report_id)
        if not params:
            return

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.executemany(
                    "UPDATE session_results SET reported = ?1, "
                    "built_into = coalesce(built_into, ?1) WHERE id = ?2",
                    params,
                )

        await self._with_conn(work)

    # --- TLS-RPT reports awaiting delivery (RFC 8460 §5) ---

    async def add_report(self, report: PendingReport) -> bool:
        r = check_report(report)
        row = _report_to_row(r)
        ids = [(r.report_id, int(i)) for i in r.result_ids]

        def work(conn: sqlite3.Connection) -> bool:
            # BEGIN IMMEDIATE serialises this with every other writer of the file, so two
            # reporters cannot both take the same results.
            with _write(conn):
                stored = conn.execute(
                    f"SELECT {_REPORT_COLUMNS} FROM tlsrpt_reports WHERE report_id = ?",
                    (r.report_id,),
                ).fetchone()
                if stored is not None:
                    return readded_report(_report_from_row(stored), r)
                taken = 0
                for params in ids:
                    taken += conn.execute(
                        "UPDATE session_results SET built_into = ? "
                        "WHERE id = ? AND built_into IS NULL",
                        params,
                    ).rowcount
                if taken != len(ids):
                    raise _Refused
                conn.execute(
                    f"INSERT INTO tlsrpt_reports ({_REPORT_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                return True

        try:
            return await self._with_conn(work)
        except _Refused:
            return False

    async def claim_report(
        self, report_id: str, *, now: datetime, until: datetime, force: bool = False
    ) -> PendingReport | None:
        check_text(report_id, "report_id")
        lease = format_time(as_utc(until, "until"))
        due = format_time(as_utc(now, "now"))

        def work(conn: sqlite3.Connection) -> PendingReport | None:
            with _write(conn):
                # fetchall: the statement must be finished before COMMIT.
                rows = conn.execute(
                    "UPDATE tlsrpt_reports SET next_attempt_at = ? WHERE report_id = ? "
                    "AND delivered_at IS NULL AND dropped_at IS NULL "
                    f"AND (? OR next_attempt_at <= ?) RETURNING {_REPORT_COLUMNS}",
                    (lease, report_id, 1 if force else 0, due),
                ).fetchall()
            return _report_from_row(rows[0]) if rows else None

        return await self._with_conn(work)

    async def reports(
        self, *, start: datetime | None = None, pending_only: bool = False
    ) -> list[PendingReport]:
        where, params = ["1 = 1"], []
        if start is not None:
            where.append("start = ?")
            params.append(format_time(as_utc(start, "start")))
        if pending_only:
            where.append("delivered_at IS NULL AND dropped_at IS NULL")

        def work(conn: sqlite3.Connection) -> list[PendingReport]:
            rows = conn.execute(
                f"SELECT {_REPORT_COLUMNS} FROM tlsrpt_reports WHERE {' AND '.join(where)} "
                "ORDER BY next_attempt_at, report_id",
                params,
            ).fetchall()
            return [_report_from_row(row) for row in rows]

        return await self._with_reader(work)

    async def report_failed(self, report_id: str, error: str, next_attempt_at: datetime) -> None:
        await self._attempt_failed(report_id, error, "next_attempt_at", next_attempt_at)

    async def report_dropped(self, report_id: str, error: str, at: datetime) -> None:
        await self._attempt_failed(report_id, error, "dropped_at", at)

    async def _attempt_failed(
        self, report_id: str, error: str, column: str, when: datetime
    ) -> None:
        """Count a failed attempt and set ``column`` (retry time, or when it was given up)."""
        check_text(report_id, "report_id")
        check_text(error, "error")
        value = format_time(as_utc(when, column))

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.execute(
                    "UPDATE tlsrpt_reports SET attempts = attempts + 1, last_error = ?, "
                    f"{column} = ? WHERE report_id = ?",
                    (error, value, report_id),
                )

        await self._with_conn(work)

    async def report_delivered(self, report_id: str, uri: str, at: datetime) -> None:
        check_text(report_id, "report_id")
        check_text(uri, "uri")
        when = format_time(as_utc(at, "at"))

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                row = conn.execute(
                    "SELECT result_ids FROM tlsrpt_reports WHERE report_id = ?", (report_id,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"no report {report_id!r} in the store; add it first")
                conn.execute(
                    "UPDATE tlsrpt_reports SET attempts = attempts + 1, last_error = NULL, "
                    "delivered_at = ?, delivered_to = ? WHERE report_id = ?",
                    (when, uri, report_id),
                )
                conn.executemany(
                    "UPDATE session_results SET reported = ?1, "
                    "built_into = coalesce(built_into, ?1) WHERE id = ?2",
                    [(report_id, int(i)) for i in json.loads(row[0])],
                )

        await self._with_conn(work)

    # --- what the Postfix policy server served ---

    async def add_served(self, records: Sequence[ServedPolicy]) -> None:
        rows = [_served_to_row(check_served(r)) for r in records]
        if not rows:
            return

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.executemany(
                    f"INSERT INTO served_policies ({_SERVED_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        await self._with_conn(work)

    async def served_at(self, domain: str, at: datetime) -> ServedPolicy | None:
        check_domain(domain)
        when = format_time(as_utc(at, "at"))

        def work(conn: sqlite3.Connection) -> ServedPolicy | None:
            row = conn.execute(
                f"SELECT {_SERVED_COLUMNS} FROM served_policies WHERE domain = ? AND at <= ? "
                "ORDER BY at DESC, id DESC LIMIT 1",
                (domain, when),
            ).fetchone()
            return None if row is None else _served_from_row(row)

        return await self._read_point(work)

    async def prune_served(self, before: datetime) -> int:
        cutoff = format_time(as_utc(before, "before"))

        def work(conn: sqlite3.Connection) -> int:
            with _write(conn):
                # A record goes when a later one of its domain was already in force at the
                # cutoff; the one in force then stays, however old.
                return conn.execute(
                    "DELETE FROM served_policies AS old WHERE old.at < ?1 AND EXISTS ("
                    "SELECT 1 FROM served_policies AS new WHERE new.domain = old.domain "
                    "AND new.at <= ?1 AND (new.at, new.id) > (old.at, old.id))",
                    (cutoff,),
                ).rowcount

        return await self._with_conn(work)

    # --- the history of `mxguard check` and its bulk-run claims ---

    async def add_check(self, record: CheckRecord) -> int:
        r = check_check(record)
        row = (r.domain, format_time(r.at), r.verdict, r.report, r.policy_id, r.policy_digest,
               r.run)  # fmt: skip

        def work(conn: sqlite3.Connection) -> int:
            with _write(conn):
                # fetchall: the statement must be finished before COMMIT.
                [(check_id,)] = conn.execute(
                    f"INSERT INTO checks ({_CHECK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "RETURNING id",
                    row,
                ).fetchall()
                if r.run is not None:
                    # Done by the first check added for it; a later one leaves it so.
                    conn.execute(
                        "INSERT INTO check_claims (run, domain, check_id) VALUES (?, ?, ?) "
                        "ON CONFLICT (run, domain) DO UPDATE SET "
                        "check_id = coalesce(check_claims.check_id, excluded.check_id)",
                        (r.run, r.domain, check_id),
                    )
                return int(check_id)

        return await self._with_conn(work)

    async def last_check(self, domain: str, before: datetime | None = None) -> CheckRecord | None:
        check_domain(domain)
        where, params = "domain = ?", [domain]
        if before is not None:
            where += " AND at < ?"
            params.append(format_time(as_utc(before, "before")))

        def work(conn: sqlite3.Connection) -> CheckRecord | None:
            row = conn.execute(
                f"SELECT id, {_CHECK_COLUMNS} FROM checks WHERE {where} "
                "ORDER BY at DESC, id DESC LIMIT 1",
                params,
            ).fetchone()
            return None if row is None else _check_from_row(row)

        return await self._with_reader(work)

    async def claim_check(
        self, run: str, domain: str, node: str, now: datetime, lease: timedelta
    ) -> bool:
        start, until = check_claim(run, domain, node, now, lease)

        def work(conn: sqlite3.Connection) -> bool:
            # BEGIN IMMEDIATE serialises claims with every other writer of the file. An upsert
            # whose WHERE fails updates nothing and returns no row.
            with _write(conn):
                rows = conn.execute(
                    "INSERT INTO check_claims (run, domain, node, lease_until) "
                    "VALUES (?1, ?2, ?3, ?4) ON CONFLICT (run, domain) DO UPDATE SET "
                    "node = excluded.node, lease_until = excluded.lease_until "
                    "WHERE check_claims.check_id IS NULL AND check_claims.lease_until <= ?5 "
                    "RETURNING 1",
                    (run, domain, node, format_time(until), format_time(start)),
                ).fetchall()
            return bool(rows)

        return await self._with_conn(work)

    async def run_progress(self, run: str) -> tuple[int, int]:
        check_run(run)

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute(
                "SELECT count(*), count(check_id) FROM check_claims WHERE run = ?", (run,)
            ).fetchone()
            return (0, 0) if row is None else (int(row[0]), int(row[1]))

        return await self._with_reader(work)

    # --- TLS reports received for domain owners (RFC 8460 §4) ---

    async def add_received(self, record: ReceivedRecord) -> bool:
        r = check_received(record)
        rep, dkim = r.report, r.dkim
        head = (
            r.dedupe_key, rep.organization_name, rep.report_id, format_time(rep.start),
            format_time(rep.end), rep.contact_info, json.dumps(list(rep.notes)),
            format_time(r.received_at), r.source.value,
            None if dkim is None else int(dkim.ok), None if dkim is None else dkim.domain,
            None if dkim is None else dkim.selector, None if dkim is None else dkim.detail,
            r.raw,
        )  # fmt: skip

        def work(conn: sqlite3.Connection) -> bool:
            with _write(conn):
                # fetchall: each statement must be finished before the next and before COMMIT.
                rows = conn.execute(
                    f"INSERT INTO received_reports ({_RECEIVED_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                    head,
                ).fetchall()
                if not rows:
                    return False  # a resent report: stored once
                received_id = int(rows[0][0])
                for position, p in enumerate(rep.policies):
                    [(policy_id,)] = conn.execute(
                        f"INSERT INTO received_policies ({_RECEIVED_POLICY_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                        (received_id, position, str(p.policy_type), p.policy_domain,
                         json.dumps(list(p.policy_strings)), json.dumps(list(p.mx_hosts)),
                         p.successful, p.failed),
                    ).fetchall()  # fmt: skip
                    conn.executemany(
                        f"INSERT INTO received_failures ({_RECEIVED_FAILURE_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (policy_id, n, str(d.result_type), d.sending_mta_ip,
                             d.receiving_mx_hostname, d.receiving_mx_helo, d.receiving_ip,
                             d.failed_session_count, d.additional_information,
                             d.failure_reason_code)
                            for n, d in enumerate(p.failure_details)
                        ],
                    )  # fmt: skip
                return True

        return await self._with_conn(work)

    async def received_between(
        self, domain: str, start: datetime, end: datetime
    ) -> list[ReceivedRecord]:
        low, high = check_inbox_range(domain, start, end)
        params = {"domain": domain, "start": format_time(low), "end": format_time(high)}

        def work(conn: sqlite3.Connection) -> list[ReceivedRecord]:
            with _read(conn):  # one snapshot for the three queries
                heads = conn.execute(
                    f"SELECT id, {_RECEIVED_COLUMNS} FROM received_reports "
                    f"WHERE id IN ({_INBOX_REPORTS}) ORDER BY range_start, id",
                    params,
                ).fetchall()
                policies = conn.execute(
                    f"SELECT id, {_RECEIVED_POLICY_COLUMNS} FROM received_policies "
                    f"WHERE received_id IN ({_INBOX_REPORTS}) ORDER BY received_id, position",
                    params,
                ).fetchall()
                failures = conn.execute(
                    f"SELECT {_RECEIVED_FAILURE_COLUMNS} FROM received_failures WHERE policy_id "
                    f"IN (SELECT id FROM received_policies WHERE received_id IN "
                    f"({_INBOX_REPORTS})) ORDER BY policy_id, position",
                    params,
                ).fetchall()
            return assemble_received(
                [_received_from_row(row) for row in heads],
                [_received_policy_from_row(row) for row in policies],
                [_received_failure_from_row(row) for row in failures],
            )

        return await self._with_reader(work)

    async def report_totals(
        self, domain: str, start: datetime, end: datetime, *, top: int = 20
    ) -> ReportTotals:
        low, high = check_inbox_range(domain, start, end, top)
        params = {"domain": domain, "start": format_time(low), "end": format_time(high),
                  "top": top}  # fmt: skip

        def work(conn: sqlite3.Connection) -> ReportTotals:
            # exact_sum (see _ExactSum) adds without overflow and gives the sum as fixed-width
            # text, so that ordering by it is ordering by the number.
            with _read(conn):
                [(reports, ok, bad)] = conn.execute(
                    "SELECT count(DISTINCT r.id), exact_sum(p.successful), exact_sum(p.failed) "
                    f"{_INBOX_POLICIES}",
                    params,
                ).fetchall()
                days = conn.execute(
                    "SELECT substr(r.range_start, 1, 10) AS day, count(DISTINCT r.id), "
                    f"exact_sum(p.successful), exact_sum(p.failed) {_INBOX_POLICIES} "
                    "GROUP BY day ORDER BY day",
                    params,
                ).fetchall()
                orgs = conn.execute(
                    "SELECT r.organization_name, count(DISTINCT r.id), "
                    "exact_sum(p.successful) AS ok, exact_sum(p.failed) AS bad "
                    f"{_INBOX_POLICIES} GROUP BY r.organization_name "
                    "ORDER BY bad DESC, ok DESC, r.organization_name LIMIT :top",
                    params,
                ).fetchall()
                types = conn.execute(
                    "SELECT f.result_type, count(DISTINCT r.id), "
                    f"exact_sum(f.failed_session_count) AS bad {_INBOX_FAILURES} "
                    "GROUP BY f.result_type ORDER BY bad DESC, f.result_type LIMIT :top",
                    params,
                ).fetchall()
                hosts = conn.execute(
                    "SELECT f.receiving_mx_hostname, count(DISTINCT r.id), "
                    f"exact_sum(f.failed_session_count) AS bad {_INBOX_FAILURES} "
                    "GROUP BY f.receiving_mx_hostname ORDER BY bad DESC, "
                    "f.receiving_mx_hostname IS NULL, f.receiving_mx_hostname LIMIT :top",
                    params,
                ).fetchall()
            return ReportTotals(
                domain=domain, start=low, end=high, reports=int(reports),
                successful=int(ok or 0), failed=int(bad or 0),  # no rows: NULL
                days=tuple(DayTotals(date.fromisoformat(str(d)), int(n), int(s), int(f))
                           for d, n, s, f in days),
                organizations=tuple(OrganizationTotals(str(o), int(n), int(s), int(f))
                                    for o, n, s, f in orgs),
                result_types=tuple(Tally(_opt(k), int(n), int(f)) for k, n, f in types),
                mx_hosts=tuple(Tally(_opt(k), int(n), int(f)) for k, n, f in hosts),
            )  # fmt: skip

        return await self._with_reader(work)

    async def received_domains(self, start: datetime, end: datetime) -> list[str]:
        low, high = check_inbox_range(None, start, end)

        def work(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT p.policy_domain FROM received_policies p "
                "JOIN received_reports r ON r.id = p.received_id WHERE p.policy_domain "
                "IS NOT NULL AND r.range_start >= ? AND r.range_start < ? ORDER BY 1",
                (format_time(low), format_time(high)),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return await self._with_reader(work)

    # --- learned security levels (docs/learned.md) ---

    async def learn(self, seen: Sequence[LevelSeen], *, stale_before: datetime) -> None:
        rows = [
            (x.domain, x.mx, x.ip, x.level.value, x.level.rank, format_time(x.at))
            for x in map(check_seen, seen)
        ]
        stale = format_time(as_utc(stale_before, "stale_before"))
        if not rows:
            return

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.executemany(_LEARN, [(*r, stale) for r in rows])

        await self._with_conn(work)

    async def learned_hosts(self, domain: str | None = None) -> list[LearnedHost]:
        where, params = "", []
        if domain is not None:
            where, params = "WHERE domain = ?", [check_domain(domain)]

        def work(conn: sqlite3.Connection) -> list[LearnedHost]:
            rows = conn.execute(
                f"SELECT {_LEARNED_COLUMNS} FROM learned_hosts {where} ORDER BY domain, mx, ip",
                params,
            ).fetchall()
            return [_learned_from_row(row) for row in rows]

        if domain is None:
            return await self._with_reader(work)  # every domain's: not a point read
        return await self._read_point(work)

    async def forget_learned(self, domain: str) -> int:
        check_domain(domain)

        def work(conn: sqlite3.Connection) -> int:
            with _write(conn):
                n = conn.execute("DELETE FROM learned_hosts WHERE domain = ?", (domain,)).rowcount
                conn.execute("DELETE FROM learned_drops WHERE domain = ?", (domain,))
                return int(n)

        return await self._with_conn(work)

    async def add_drops(self, drops: Sequence[LevelDrop]) -> None:
        rows = [
            (format_time(d.at), d.domain, d.mx, d.ip, d.learned.value, d.seen.value,
             d.result_type.value if d.result_type else None)
            for d in map(check_drop, drops)
        ]  # fmt: skip
        if not rows:
            return

        def work(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.executemany(
                    f"INSERT INTO learned_drops ({_DROP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        await self._with_conn(work)

    async def drops_since(self, start: datetime, domain: str | None = None) -> list[LevelDrop]:
        where, params = "at >= ?", [format_time(as_utc(start, "start"))]
        if domain is not None:
            where += " AND domain = ?"
            params.append(check_domain(domain))

        def work(conn: sqlite3.Connection) -> list[LevelDrop]:
            rows = conn.execute(
                f"SELECT id, {_DROP_COLUMNS} FROM learned_drops WHERE {where} ORDER BY at, id",
                params,
            ).fetchall()
            return [_drop_from_row(row) for row in rows]

        if domain is None:
            return await self._with_reader(work)  # every domain's: not a point read
        return await self._read_point(work)

    async def raise_alarm(self, alarm: StrippingAlarm) -> bool:
        a = check_alarm(alarm)
        row = (format_time(a.raised_at), json.dumps(list(a.domains)), json.dumps(list(a.hosts)),
               float(a.window), int(a.enforce))  # fmt: skip

        def work(conn: sqlite3.Connection) -> bool:
            with _write(conn):
                rows = conn.execute(
                    "INSERT INTO learned_alarms (raised_at, domains, hosts, window_s, enforce) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                    row,
                ).fetchall()
            return bool(rows)

        return await self._with_conn(work)

    async def latest_alarm(self) -> StrippingAlarm | None:
        def work(conn: sqlite3.Connection) -> StrippingAlarm | None:
            row = conn.execute(
                f"SELECT {_ALARM_COLUMNS} FROM learned_alarms ORDER BY id DESC LIMIT 1"
            ).fetchone()
            return None if row is None else _alarm_from_row(row)

        return await self._read_point(work)

    async def extend_alarm(
        self, domains: Sequence[str], hosts: Sequence[str]
    ) -> StrippingAlarm | None:
        add_domains = [check_domain(d) for d in domains]
        add_hosts = [check_text(h, "alarm host") for h in hosts]

        def work(conn: sqlite3.Connection) -> StrippingAlarm | None:
            with _write(conn):
                row = conn.execute(
                    f"SELECT {_ALARM_COLUMNS} FROM learned_alarms WHERE cleared_at IS NULL"
                ).fetchone()
                if row is None:
                    return None
                alarm = _alarm_from_row(row)
                merged_domains = sorted({*alarm.domains, *add_domains})
                merged_hosts = sorted({*alarm.hosts, *add_hosts})
                conn.execute(
                    "UPDATE learned_alarms SET domains = ?, hosts = ? WHERE id = ?",
                    (json.dumps(merged_domains), json.dumps(merged_hosts), alarm.id),
                )
            return replace(alarm, domains=tuple(merged_domains), hosts=tuple(merged_hosts))

        return await self._with_conn(work)

    async def clear_alarm(self, at: datetime) -> StrippingAlarm | None:
        when = format_time(as_utc(at, "at"))

        def work(conn: sqlite3.Connection) -> StrippingAlarm | None:
            with _write(conn):
                row = conn.execute(
                    "UPDATE learned_alarms SET cleared_at = ? WHERE cleared_at IS NULL "
                    f"RETURNING {_ALARM_COLUMNS}",
                    (when,),
                ).fetchall()
            return _alarm_from_row(row[0]) if row else None

        return await self._with_conn(work)

    async def close(self) -> None:
        if self._closed:
            return
        if self._policy_flush is not None:  # puts already accepted are committed first
            with contextlib.suppress(Exception):
                await asyncio.shield(self._policy_flush)
        self._closed = True
        if self._here is not None:
            self._here.close()
            self._here = None

        def work() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        def read_work() -> None:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None

        try:
            if self._reader is not None and self._rconn is not None:
                await self._run(read_work, self._reader)
            if self._conn is not None:
                await self._run(work)
        finally:
            if self._reader is not None:
                self._reader.shutdown()
            self._executor.shutdown()

    # --- plumbing ---

    def _connect(self) -> None:
        # Runs in the worker thread, which then owns the connection. isolation_level=None:
        # no implicit transactions; every write below opens its own explicitly.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            if self.path != ":memory:":
                _check_integrity(conn, self.path)
            _wal_mode(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.create_aggregate("exact_sum", 1, _EXACT_SUM)
            _migrate(conn, self.path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _kind(exc) in ("corrupt", "notadb"):
                raise _damaged(self.path, str(exc)) from exc
            raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        if self.path != ":memory:":
            self._inode = os.stat(self.path).st_ino

    def _connect_here(self) -> None:
        # On the opening thread. Busy timeout 0: a read that would wait goes to the reader
        # thread instead (_read_point).
        self._here = self._read_only(timeout=0, check_same_thread=False)
        self._here_thread = threading.get_ident()

    def _connect_reader(self) -> None:
        # Runs in the reader thread.
        self._rconn = self._read_only(timeout=READ_BUSY_TIMEOUT)

    def _read_only(self, timeout: float, *, check_same_thread: bool = True) -> sqlite3.Connection:
        """A read-only connection, once _connect has made the file and put it in WAL mode."""
        conn = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=check_same_thread
        )
        try:
            conn.execute("PRAGMA query_only=ON")
            conn.create_aggregate("exact_sum", 1, _EXACT_SUM)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _with_conn(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                raise StoreError(f"SQLite store {self.path} is closed; open it again")
            return work(self._conn)

        return await self._run(call)

    async def _with_reader(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A read, on the reader's connection: never queued behind a write."""
        if self._reader is None:
            return await self._with_conn(work)

        def call() -> T:
            if self._rconn is None:
                raise StoreError(f"SQLite store {self.path} is closed; open it again")
            return work(self._rconn)

        return await self._run(call, self._reader)

    async def _read_point(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A point read (module docstring): at once on this thread's connection, unless
        SQLite would have to wait or this is not the thread that opened the store."""
        conn = self._here
        if conn is not None and threading.get_ident() == self._here_thread:
            try:
                return work(conn)
            except sqlite3.Error as exc:
                if _kind(exc) not in ("busy", "locked"):
                    raise self._error(exc) from exc
        return await self._with_reader(work)

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"SQLite store {self.path}: {exc}", kind=_kind(exc), detail=str(exc))

    async def _run(self, work: Callable[[], T], executor: _Worker | None = None) -> T:
        if self._closed and self._conn is None:
            raise StoreError(f"SQLite store {self.path} is closed; open it again")
        try:
            return await (executor or self._executor).run(work)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc


class _Worker:
    """One thread that runs the store's calls in order and hands each result to the event
    loop of its caller: a ThreadPoolExecutor of one worker without its per-call machinery
    (submit's locks and thread accounting, a concurrent future chained to an asyncio one),
    which was 5 % of the server's CPU in a burst of cold lookups.

    A call whose caller stopped waiting still runs (a write is never half-done because
    someone gave up on it). The thread is a daemon: a write is acknowledged only once it
    has committed, so nothing acknowledged is lost if the process ends without ``close``.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, work: Callable[[], T]) -> asyncio.Future[T]:
        if self._stopped:
            raise StoreError("the SQLite store is closed; open it again")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put((work, future))
        return future

    def shutdown(self) -> None:
        """Run what was asked, then end the thread."""
        if not self._stopped:
            self._stopped = True
            self._calls.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            work, future = call
            try:
                result, error = work(), None
            except BaseException as exc:  # handed to the caller, who raises it
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give ``future`` its result or ``error``, unless its caller has stopped waiting."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _kind(exc: sqlite3.Error) -> str:
    """The StoreError kind of a SQLite error, from its primary result code."""
    code = getattr(exc, "sqlite_errorcode", None)
    return "other" if code is None else _KINDS.get(code & 0xFF, "other")


def _wal_mode(conn: sqlite3.Connection) -> None:
    """Switch to WAL mode. SQLite answers "database is locked" at once, without its busy
    handler, while another process creates the same new file or changes its journal mode:
    several mxguard processes starting on one new file must wait for each other, as writers
    do, not fail."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if _kind(exc) not in ("busy", "locked") or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _check_integrity(conn: sqlite3.Connection, path: str) -> None:
    """Refuse a damaged file at open: otherwise every lookup that reads the damaged part
    fails, for as long as the server runs."""
    rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    if [tuple(r) for r in rows] != [("ok",)]:
        raise _damaged(path, "; ".join(str(r[0]) for r in rows))


def _damaged(path: str, what: str) -> StoreError:
    return StoreError(
        f"SQLite store {path} is damaged (integrity check: {what}). Stop mxguard and move the "
        f"file away (with its -wal and -shm files: mv {path} {path}.damaged), then start "
        "again: a new, empty store is created and the MTA-STS cache is rebuilt as policies are "
        "fetched, but until a domain's policy is fetched again its trust-on-first-use "
        "protection is lost (session results and reports not yet delivered are lost too, "
        f"unless recovered from the old file: sqlite3 {path}.damaged .recover)",
        kind="corrupt",
        detail=what,
    )


class _Refused(Exception):
    """Raised inside a write transaction to roll it back: the write must not happen."""


class _write:
    """`with _write(conn):` one write transaction, holding the write lock from the start
    (BEGIN IMMEDIATE) so that concurrent processes queue on the busy timeout instead of
    failing on a lock upgrade halfway through."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            # Some errors (a full disk, say) already rolled back; a second ROLLBACK would fail
            # and hide the first error.
            self.conn.execute("ROLLBACK")


def _put(conn: sqlite3.Connection, rows: Sequence[tuple[str, ...]]) -> None:
    """Insert or replace cached policies, all in one transaction."""
    with _write(conn):
        conn.executemany(
            "INSERT INTO sts_policies (domain, policy_id, policy_text, fetched_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET "
            "policy_id = excluded.policy_id, policy_text = excluded.policy_text, "
            "fetched_at = excluded.fetched_at, expires_at = excluded.expires_at",
            rows,
        )


class _read:
    """`with _read(conn):` one read transaction: the statements in it see one snapshot."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


class _ExactSum:
    """The SQL aggregate `exact_sum(x)`: the sum of integers as Python adds them (SQLite's sum()
    fails past 2**63, and a thousand reports at the largest count a report may hold get
    there), given back as 40-digit text, so that text order is number order."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, value: object) -> None:
        if isinstance(value, int):
            self.total += value

    def finalize(self) -> str:
        return f"{self.total:040d}"


# typeshed expects an aggregate's finalize() to give an int; SQLite takes text as well.
_EXACT_SUM: Any = _ExactSum


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    with _write(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = 0 if row is None or row[0] is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite store {path} has schema version {version}, but this mxguard knows "
                f"versions up to {SCHEMA_VERSION}; upgrade mxguard or use another --store"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


def _policy_from_row(row: tuple[str, str, str, str, str]) -> CachedPolicy:
    domain, policy_id, text, fetched_at, expires_at = row
    return CachedPolicy(
        domain=domain,
        policy_id=policy_id,
        policy_text=text,
        fetched_at=parse_time(fetched_at),
        expires_at=parse_time(expires_at),
    )


def _result_to_row(r: SessionResult) -> tuple[object, ...]:
    return (
        format_time(r.at),
        r.policy_domain,
        r.policy_type.value,
        json.dumps(list(r.policy_strings)),
        json.dumps(list(r.mx_patterns)),
        r.result_text,
        r.sending_ip,
        r.receiving_mx,
        r.receiving_ip,
        r.receiving_helo,
        r.detail,
        json.dumps(list(r.rua)),
        1 if r.is_report else 0,
        r.reported,
    )


def _result_from_row(row: tuple[object, ...]) -> SessionResult:
    (
        id_,
        at,
        policy_domain,
        policy_type,
        policy_strings,
        mx_patterns,
        result_type,
        sending_ip,
        receiving_mx,
        receiving_ip,
        receiving_helo,
        detail,
        rua,
        is_report,
        reported,
    ) = row
    known, other = result_type_from_store(_opt(result_type))
    return SessionResult(
        id=int(str(id_)),
        at=parse_time(str(at)),
        policy_domain=str(policy_domain),
        policy=policy_from_store(
            str(policy_type),
            _json_tuple(policy_strings),
            _json_tuple(mx_patterns),
            _json_tuple(rua),
        ),
        result_type=known,
        sending_ip=_opt(sending_ip),
        receiving_mx=_opt(receiving_mx),
        receiving_ip=_opt(receiving_ip),
        receiving_helo=_opt(receiving_helo),
        detail=_opt(detail),
        is_report=bool(is_report),
        reported=_opt(reported),
        other_result_type=other,
    )


def _json_tuple(value: object) -> tuple[str, ...]:
    return tuple(str(item) for item in json.loads(str(value)))


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


def _served_to_row(r: ServedPolicy) -> tuple[object, ...]:
    return (
        r.domain,
        format_time(r.at),
        r.policy_type.value,
        json.dumps(list(r.policy_strings)),
        json.dumps(list(r.mx_patterns)),
        json.dumps(list(r.rua)),
        json.dumps(list(r.mx_hosts)),
        json.dumps(list(r.mx_addresses)),
        r.answer,
    )


def _served_from_row(row: tuple[object, ...]) -> ServedPolicy:
    domain, at, ptype, strings, patterns, rua, hosts, addresses, answer = row
    return ServedPolicy(
        domain=str(domain),
        at=parse_time(str(at)),
        policy=policy_from_store(
            str(ptype), _json_tuple(strings), _json_tuple(patterns), _json_tuple(rua)
        ),
        mx_hosts=_json_tuple(hosts),
        mx_addresses=_json_tuple(addresses),
        answer=str(answer),
    )


def _report_to_row(r: PendingReport) -> tuple[object, ...]:
    return (
        r.report_id,
        r.policy_domain,
        format_time(r.start),
        r.filename,
        r.body,
        json.dumps(list(r.rua)),
        json.dumps(list(r.result_ids)),
        format_time(r.created_at),
        format_time(r.next_attempt_at),
        r.attempts,
        r.last_error,
        None if r.delivered_at is None else format_time(r.delivered_at),
        r.delivered_to,
        None if r.dropped_at is None else format_time(r.dropped_at),
    )


def _report_from_row(row: tuple[object, ...]) -> PendingReport:
    (report_id, domain, start, name, body, rua, ids, created, next_at, attempts, error,
     delivered_at, delivered_to, dropped_at) = row  # fmt: skip
    return PendingReport(
        report_id=str(report_id),
        policy_domain=str(domain),
        start=parse_time(str(start)),
        filename=str(name),
        body=bytes(body) if isinstance(body, bytes | memoryview) else str(body).encode(),
        rua=_json_tuple(rua),
        result_ids=tuple(int(i) for i in json.loads(str(ids))),
        created_at=parse_time(str(created)),
        next_attempt_at=parse_time(str(next_at)),
        attempts=int(str(attempts)),
        last_error=_opt(error),
        delivered_at=None if delivered_at is None else parse_time(str(delivered_at)),
        delivered_to=_opt(delivered_to),
        dropped_at=None if dropped_at is None else parse_time(str(dropped_at)),
    )


def _check_from_row(row: tuple[object, ...]) -> CheckRecord:
    id_, domain, at, verdict, report, policy_id, digest, run = row
    return CheckRecord(
        domain=str(domain),
        at=parse_time(str(at)),
        verdict=str(verdict),
        report=str(report),
        policy_id=_opt(policy_id),
        policy_digest=_opt(digest),
        run=_opt(run),
        id=int(str(id_)),
    )


def _received_from_row(row: tuple[object, ...]) -> ReceivedRecord:
    (id_, _key, org, report_id, start, end, contact, notes, received_at, source, dkim_ok,
     dkim_domain, dkim_selector, dkim_detail, raw) = row  # fmt: skip
    from mxguard.protocol.tlsrpt_ingest import ReceivedReport

    report = ReceivedReport(
        organization_name=str(org),
        start=parse_time(str(start)),
        end=parse_time(str(end)),
        contact_info=_opt(contact),
        report_id=str(report_id),
        policies=(),
        notes=_json_tuple(notes),
    )
    return ReceivedRecord(
        report=report,
        raw=bytes(raw) if isinstance(raw, bytes | memoryview) else str(raw).encode(),
        received_at=parse_time(str(received_at)),
        source=ReportSource(str(source)),
        dkim=dkim_from_store(
            None if dkim_ok is None else bool(dkim_ok),
            _opt(dkim_domain),
            _opt(dkim_selector),
            _opt(dkim_detail),
        ),
        id=int(str(id_)),
    )


def _received_policy_from_row(row: tuple[object, ...]) -> tuple[int, int, ReceivedPolicy]:
    policy_id, received_id, _position, ptype, domain, strings, mx, ok, bad = row
    from mxguard.protocol.tlsrpt_ingest import ReceivedPolicy

    policy = ReceivedPolicy(
        policy_type=known_policy_type(str(ptype)),
        policy_strings=_json_tuple(strings),
        policy_domain=_opt(domain),
        mx_hosts=_json_tuple(mx),
        successful=int(str(ok)),
        failed=int(str(bad)),
    )
    return int(str(received_id)), int(str(policy_id)), policy


def _received_failure_from_row(row: tuple[object, ...]) -> tuple[int, FailureDetail]:
    policy_id, _position, rtype, sip, mx, helo, rip, count, info, code = row
    return int(str(policy_id)), FailureDetail(
        result_type=known_result_type(str(rtype)),
        sending_mta_ip=_opt(sip),
        receiving_mx_hostname=_opt(mx),
        receiving_ip=_opt(rip),
        receiving_mx_helo=_opt(helo),
        failed_session_count=int(str(count)),
        additional_information=_opt(info),
        failure_reason_code=_opt(code),
    )


# No RFC: docs/learned.md. ?1..?6: domain, mx, ip, level, rank, at; ?7: stale_before. Every
# SET expression reads the row as it was, so the conditions agree with each other.
_LEARN = (
    "INSERT INTO learned_hosts (domain, mx, ip, level, rank, first_seen, last_seen, seen) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1) ON CONFLICT (domain, mx, ip) DO UPDATE SET "
    "level = CASE WHEN excluded.rank > learned_hosts.rank OR learned_hosts.last_seen < ?7 "
    "THEN excluded.level ELSE learned_hosts.level END, "
    "rank = CASE WHEN excluded.rank > learned_hosts.rank OR learned_hosts.last_seen < ?7 "
    "THEN excluded.rank ELSE learned_hosts.rank END, "
    "first_seen = CASE WHEN excluded.rank > learned_hosts.rank "
    "OR learned_hosts.last_seen < ?7 THEN excluded.first_seen "
    "ELSE learned_hosts.first_seen END, "
    "last_seen = CASE WHEN excluded.rank > learned_hosts.rank "
    "OR learned_hosts.last_seen < ?7 THEN excluded.last_seen "
    "WHEN excluded.rank = learned_hosts.rank "
    "THEN max(learned_hosts.last_seen, excluded.last_seen) ELSE learned_hosts.last_seen END, "
    "seen = CASE WHEN excluded.rank > learned_hosts.rank OR learned_hosts.last_seen < ?7 "
    "THEN 1 WHEN excluded.rank = learned_hosts.rank THEN learned_hosts.seen + 1 "
    "ELSE learned_hosts.seen END"
)
_LEARNED_COLUMNS = "domain, mx, ip, level, first_seen, last_seen, seen"
_DROP_COLUMNS = "at, domain, mx, ip, learned, seen, result_type"
_ALARM_COLUMNS = "id, raised_at, domains, hosts, window_s, enforce, cleared_at"


def _learned_from_row(row: tuple[object, ...]) -> LearnedHost:
    domain, mx, ip, level, first_seen, last_seen, seen = row
    return LearnedHost(
        domain=str(domain), mx=str(mx), ip=str(ip),
        level=level_from_store(level, f"learned_hosts row {domain} {mx} [{ip}]"),
        first_seen=parse_time(str(first_seen)), last_seen=parse_time(str(last_seen)),
        seen=int(str(seen)),
    )  # fmt: skip


def _drop_from_row(row: tuple[object, ...]) -> LevelDrop:
    id_, at, domain, mx, ip, learned, seen, result_type = row
    where = f"learned_drops row {id_}"
    known, _ = result_type_from_store(None if result_type is None else str(result_type))
    return LevelDrop(
        at=parse_time(str(at)), domain=str(domain), mx=str(mx), ip=str(ip),
        learned=level_from_store(learned, where), seen=level_from_store(seen, where),
        result_type=known, id=int(str(id_)),
    )  # fmt: skip


def _alarm_from_row(row: tuple[object, ...]) -> StrippingAlarm:
    id_, raised_at, domains, hosts, window, enforce, cleared_at = row
    return StrippingAlarm(
        raised_at=parse_time(str(raised_at)), domains=_json_tuple(domains),
        hosts=_json_tuple(hosts), window=float(str(window)), enforce=bool(enforce),
        cleared_at=None if cleared_at is None else parse_time(str(cleared_at)),
        id=int(str(id_)),
    )  # fmt: skip
