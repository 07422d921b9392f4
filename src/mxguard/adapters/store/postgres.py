"""The shared store: PostgreSQL, for several mxguard nodes with one policy cache and one
TLS-RPT result table (docs/design.md, "State"). A `Store`: all seven roles (store/__init__.py),
call for call as the SQLite backend does (tests/test_store_conformance.py).

Uses psycopg 3's asyncio connection. Each store holds one connection and runs one operation
at a time on it (a lock), every write in its own transaction; PostgreSQL's default
`synchronous_commit = on` makes a committed write durable before COMMIT returns. The session
time zone is UTC, so `timestamptz` values come back as UTC-aware datetimes.

The schema is created on open, under an advisory lock so that nodes starting together do not
race, and is versioned like the SQLite schema (table `schema_version`). Give mxguard its own
database (or its own schema via `?options=-csearch_path%3Dmxguard`): the table names are
plain (`sts_policies`, `session_results`, `tlsrpt_reports`, `served_policies`, `checks`,
`check_claims`, `received_reports`, `received_policies`, `received_failures`,
`learned_hosts`, `learned_drops`, `learned_alarms`, `schema_version`).

Text is sorted with `COLLATE "C"`, code point order as in SQLite and Redis, whatever collation
the database was created with (a language's collation puts `a_b.example` before
`a-c.example`, and report-id `ra` before `rB`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import psycopg.conninfo

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
    known_policy_type,
    known_result_type,
    level_from_store,
    policy_from_store,
    readded_report,
    redact_url,
    result_type_from_store,
)
from mxguard.protocol.tlsrpt_report import FailureDetail

if TYPE_CHECKING:  # a received report's classes: imported where one is read
    from mxguard.protocol.tlsrpt_ingest import ReceivedPolicy

T = TypeVar("T")

# Seconds to wait for the server when connecting, unless the URL says otherwise.
CONNECT_TIMEOUT = 10

# Any constant works; it only has to be the same for every mxguard node.
_SCHEMA_LOCK = 0x6D78_6775_6172_64  # "mxguard"

# MIGRATIONS[n] takes the database from schema version n to n + 1 (0 = no tables yet).
# Same tables and meaning as the SQLite backend (see sqlite.py).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sts_policies (
            domain      text PRIMARY KEY,
            policy_id   text NOT NULL,
            policy_text text NOT NULL,
            fetched_at  timestamptz NOT NULL,
            expires_at  timestamptz NOT NULL
        )""",
        """CREATE TABLE session_results (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at             timestamptz NOT NULL,
            policy_domain  text NOT NULL,
            policy_type    text NOT NULL,
            policy_strings text[] NOT NULL,
            mx_patterns    text[] NOT NULL,
            result_type    text,
            sending_ip     text,
            receiving_mx   text,
            receiving_ip   text,
            receiving_helo text,
            detail         text,
            rua            text[] NOT NULL,
            is_report      boolean NOT NULL,
            reported       text
        )""",
        "CREATE INDEX session_results_at ON session_results (at)",
        "CREATE INDEX session_results_domain_at ON session_results (policy_domain, at)",
    ),
    (
        """CREATE TABLE tlsrpt_reports (
            report_id       text PRIMARY KEY,
            policy_domain   text NOT NULL,
            start           timestamptz NOT NULL,
            filename        text NOT NULL,
            body            bytea NOT NULL,
            rua             text[] NOT NULL,
            result_ids      bigint[] NOT NULL,
            created_at      timestamptz NOT NULL,
            next_attempt_at timestamptz NOT NULL,
            attempts        integer NOT NULL,
            last_error      text,
            delivered_at    timestamptz,
            delivered_to    text,
            UNIQUE (policy_domain, start)
        )""",
        "CREATE INDEX tlsrpt_reports_next ON tlsrpt_reports (next_attempt_at)",
    ),
    (
        # Late results get a further report for their day; a result belongs to the report
        # built over it; reports no rua will accept are dropped (see sqlite.py, version 3).
        "ALTER TABLE session_results ADD COLUMN built_into text",
        "UPDATE session_results SET built_into = reported WHERE reported IS NOT NULL",
        """UPDATE session_results s SET built_into = r.report_id FROM tlsrpt_reports r
           WHERE s.built_into IS NULL AND s.id = ANY(r.result_ids)""",
        "CREATE INDEX session_results_unbuilt ON session_results (at) WHERE built_into IS NULL",
        "ALTER TABLE tlsrpt_reports "
        "DROP CONSTRAINT IF EXISTS tlsrpt_reports_policy_domain_start_key",
        "ALTER TABLE tlsrpt_reports ADD COLUMN dropped_at timestamptz",
        "CREATE INDEX tlsrpt_reports_day ON tlsrpt_reports (policy_domain, start)",
    ),
    (
        # What the Postfix policy server served, from `at` on (see sqlite.py, version 4).
        """CREATE TABLE served_policies (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            domain         text NOT NULL,
            at             timestamptz NOT NULL,
            policy_type    text NOT NULL,
            policy_strings text[] NOT NULL,
            mx_patterns    text[] NOT NULL,
            rua            text[] NOT NULL,
            mx_hosts       text[] NOT NULL,
            mx_addresses   text[] NOT NULL,
            answer         text NOT NULL
        )""",
        "CREATE INDEX served_policies_domain_at ON served_policies (domain, at)",
    ),
    (
        # The history of `mxguard check` and the claims of its bulk runs (see sqlite.py,
        # version 5).
        """CREATE TABLE checks (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            domain        text NOT NULL,
            at            timestamptz NOT NULL,
            verdict       text NOT NULL,
            report        text NOT NULL,
            policy_id     text,
            policy_digest text,
            run           text
        )""",
        "CREATE INDEX checks_domain_at ON checks (domain, at)",
        """CREATE TABLE check_claims (
            run         text NOT NULL,
            domain      text NOT NULL,
            node        text,
            lease_until timestamptz,
            check_id    bigint,
            PRIMARY KEY (run, domain)
        )""",
    ),
    (
        # TLS reports received for domain owners (see sqlite.py, version 6).
        """CREATE TABLE received_reports (
            id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            dedupe_key        text NOT NULL UNIQUE,
            organization_name text NOT NULL,
            report_id         text NOT NULL,
            range_start       timestamptz NOT NULL,
            range_end         timestamptz NOT NULL,
            contact_info      text,
            notes             text[] NOT NULL,
            received_at       timestamptz NOT NULL,
            source            text NOT NULL,
            dkim_ok           boolean,
            dkim_domain       text,
            dkim_selector     text,
            dkim_detail       text,
            raw               bytea NOT NULL
        )""",
        "CREATE INDEX received_reports_start ON received_reports (range_start)",
        """CREATE TABLE received_policies (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            received_id    bigint NOT NULL REFERENCES received_reports (id),
            position       integer NOT NULL,
            policy_type    text NOT NULL,
            policy_domain  text,
            policy_strings text[] NOT NULL,
            mx_hosts       text[] NOT NULL,
            successful     bigint NOT NULL,
            failed         bigint NOT NULL
        )""",
        "CREATE INDEX received_policies_report ON received_policies (received_id)",
        "CREATE INDEX received_policies_domain ON received_policies (policy_domain)",
        """CREATE TABLE received_failures (
            id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            policy_id              bigint NOT NULL REFERENCES received_policies (id),
            position               integer NOT NULL,
            result_type            text NOT NULL,
            sending_mta_ip         text,
            receiving_mx_hostname  text,
            receiving_mx_helo      text,
            receiving_ip           text,
            failed_session_count   bigint NOT NULL,
            additional_information text,
            failure_reason_code    text
        )""",
        "CREATE INDEX received_failures_policy ON received_failures (policy_id)",
    ),
    (
        # Learned security levels (see sqlite.py, version 8).
        """CREATE TABLE learned_hosts (
            domain     text NOT NULL,
            mx         text NOT NULL,
            ip         text NOT NULL,
            level      text NOT NULL,
            rank       integer NOT NULL,
            first_seen timestamptz NOT NULL,
            last_seen  timestamptz NOT NULL,
            seen       bigint NOT NULL,
            PRIMARY KEY (domain, mx, ip)
        )""",
        """CREATE TABLE learned_drops (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at          timestamptz NOT NULL,
            domain      text NOT NULL,
            mx          text NOT NULL,
            ip          text NOT NULL,
            learned     text NOT NULL,
            seen        text NOT NULL,
            result_type text
        )""",
        "CREATE INDEX learned_drops_at ON learned_drops (at)",
        "CREATE INDEX learned_drops_domain ON learned_drops (domain, at)",
        """CREATE TABLE learned_alarms (
            id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            raised_at  timestamptz NOT NULL,
            domains    text[] NOT NULL,
            hosts      text[] NOT NULL,
            window_s   double precision NOT NULL,
            enforce    boolean NOT NULL,
            cleared_at timestamptz
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
_REPORT_COLUMNS = (
    "report_id, policy_domain, start, filename, body, rua, result_ids, created_at, "
    "next_attempt_at, attempts, last_error, delivered_at, delivered_to, dropped_at"
)
_SERVED_COLUMNS = (
    "domain, at, policy_type, policy_strings, mx_patterns, rua, mx_hosts, mx_addresses, answer"
)
_POLICY_COLUMNS = "domain, policy_id, policy_text, fetched_at, expires_at"
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
# As in sqlite.py: a domain's reports, policies and failure details of [start, end).
_INBOX_REPORTS = (
    "SELECT r.id FROM received_reports r WHERE r.range_start >= %(start)s "
    "AND r.range_start < %(end)s AND EXISTS (SELECT 1 FROM received_policies q "
    "WHERE q.received_id = r.id AND q.policy_domain = %(domain)s)"
)
_INBOX_POLICIES = (
    "FROM received_policies p JOIN received_reports r ON r.id = p.received_id "
    "WHERE p.policy_domain = %(domain)s AND r.range_start >= %(start)s "
    "AND r.range_start < %(end)s"
)
_INBOX_FAILURES = (
    "FROM received_failures f JOIN received_policies p ON p.id = f.policy_id "
    "JOIN received_reports r ON r.id = p.received_id "
    "WHERE p.policy_domain = %(domain)s AND r.range_start >= %(start)s "
    "AND r.range_start < %(end)s"
)


class PostgresStore:
    """A Store on a PostgreSQL database; open it with `await PostgresStore.open(url)`."""

    def __init__(self, url: str, params: dict[str, Any]) -> None:
        self.url = url
        self._params = params
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect to the database `url` names and create or upgrade the schema."""
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(
                f"store URL {redact_url(url)!r} is not a valid PostgreSQL URL ({exc}); "
                "use postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE"
            ) from exc
        params.setdefault("connect_timeout", CONNECT_TIMEOUT)
        # Text comes back as str only when the client encoding names one; a database created
        # as SQL_ASCII (initdb --locale=C without -E) would otherwise hand back bytes.
        params.setdefault("client_encoding", "UTF8")
        store = cls(url, params)
        async with store._lock:
            conn = await store._connection()
            try:
                await _migrate(conn, redact_url(url))
            except psycopg.Error as exc:
                await conn.close()
                raise store._error(exc) from exc
            except BaseException:
                await conn.close()
                raise
        return store

    # --- policy cache (RFC 8461 §5) ---

    async def get_policy(self, domain: str) -> CachedPolicy | None:
        check_domain(domain)
        rows = await self._fetch(
            f"SELECT {_POLICY_COLUMNS} FROM sts_policies WHERE domain = %s", (domain,)
        )
        return _policy_from_row(rows[0]) if rows else None

    async def put_policy(self, policy: CachedPolicy) -> None:
        p = check_policy(policy)
        await self._write(
            f"INSERT INTO sts_policies ({_POLICY_COLUMNS}) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (domain) DO UPDATE SET policy_id = EXCLUDED.policy_id, "
            "policy_text = EXCLUDED.policy_text, fetched_at = EXCLUDED.fetched_at, "
            "expires_at = EXCLUDED.expires_at",
            [(p.domain, p.policy_id, p.policy_text, p.fetched_at, p.expires_at)],
        )

    async def delete_policy(self, domain: str) -> None:
        check_domain(domain)
        await self._write("DELETE FROM sts_policies WHERE domain = %s", [(domain,)])

    async def policies(self) -> list[CachedPolicy]:
        rows = await self._fetch(
            f'SELECT {_POLICY_COLUMNS} FROM sts_policies ORDER BY domain COLLATE "C"'
        )
        return [_policy_from_row(row) for row in rows]

    # --- TLS-RPT session results (RFC 8460 §4) ---

    async def add_results(self, results: Sequence[SessionResult]) -> None:
        rows = [_result_to_row(check_result(r)) for r in results]
        if rows:
            await self._write(
                f"INSERT INTO session_results ({_RESULT_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
                idempotent=False,
            )

    async def results_between(
        self,
        start: datetime,
        end: datetime,
        *,
        unreported_only: bool = True,
        unbuilt_only: bool = False,
    ) -> list[SessionResult]:
        where = "at >= %s AND at < %s" + (" AND reported IS NULL" if unreported_only else "")
        where += " AND built_into IS NULL" if unbuilt_only else ""
        rows = await self._fetch(
            f"SELECT id, {_RESULT_COLUMNS} FROM session_results WHERE {where} ORDER BY at, id",
            (as_utc(start, "start"), as_utc(end, "end")),
        )
        return [_result_from_row(row) for row in rows]

    async def oldest_unbuilt(self, start: datetime, end: datetime) -> datetime | None:
        rows = await self._fetch(
            "SELECT min(at) FROM session_results WHERE built_into IS NULL AND at >= %s "
            "AND at < %s AND NOT is_report AND cardinality(rua) > 0",
            (as_utc(start, "start"), as_utc(end, "end")),
        )
        oldest = rows[0][0] if rows else None
        return None if oldest is None else oldest.astimezone(UTC)

    async def mark_reported(self, ids: Iterable[int], report_id: str) -> None:
        id_list = [int(i) for i in ids]
        check_report_id(report_id)
        if id_list:
            await self._write(
                "UPDATE session_results SET reported = %s, "
                "built_into = coalesce(built_into, %s) WHERE id = ANY(%s)",
                [(report_id, report_id, id_list)],
            )

    # --- TLS-RPT reports awaiting delivery (RFC 8460 §5) ---

    async def add_report(self, report: PendingReport) -> bool:
        r = check_report(report)
        row = (
            r.report_id, r.policy_domain, r.start, r.filename, r.body, list(r.rua),
            list(r.result_ids), r.created_at, r.next_attempt_at, r.attempts, r.last_error,
            r.delivered_at, r.delivered_to, r.dropped_at,
        )  # fmt: skip

        async def work(conn: psycopg.AsyncConnection[Any]) -> bool:
            try:
                async with conn.transaction():
                    cur = await conn.execute(
                        f"SELECT {_REPORT_COLUMNS} FROM tlsrpt_reports WHERE report_id = %s",
                        (r.report_id,),
                    )
                    stored = await cur.fetchone()
                    if stored is not None:
                        return readded_report(_report_from_row(stored), r)
                    # Row locks: a concurrent reporter taking the same results waits here,
                    # then finds them taken (READ COMMITTED re-checks the WHERE clause).
                    cur = await conn.execute(
                        "UPDATE session_results SET built_into = %s "
                        "WHERE id = ANY(%s) AND built_into IS NULL",
                        (r.report_id, list(r.result_ids)),
                    )
                    if cur.rowcount != len(r.result_ids):
                        raise _Refused
                    await conn.execute(
                        f"INSERT INTO tlsrpt_reports ({_REPORT_COLUMNS}) VALUES "
                        "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        row,
                    )
            except _Refused:
                return False
            return True

        # Safe to run again on a new connection: a report that did get stored is found.
        return await self._run(work, idempotent=True)

    async def claim_report(
        self, report_id: str, *, now: datetime, until: datetime, force: bool = False
    ) -> PendingReport | None:
        check_text(report_id, "report_id")
        rows = await self._fetch(
            "UPDATE tlsrpt_reports SET next_attempt_at = %s WHERE report_id = %s "
            "AND delivered_at IS NULL AND dropped_at IS NULL "
            f"AND (%s OR next_attempt_at <= %s) RETURNING {_REPORT_COLUMNS}",
            (as_utc(until, "until"), report_id, force, as_utc(now, "now")),
            idempotent=False,
        )
        return _report_from_row(rows[0]) if rows else None

    async def reports(
        self, *, start: datetime | None = None, pending_only: bool = False
    ) -> list[PendingReport]:
        where, params = ["TRUE"], []
        if start is not None:
            where.append("start = %s")
            params.append(as_utc(start, "start"))
        if pending_only:
            where.append("delivered_at IS NULL AND dropped_at IS NULL")
        rows = await self._fetch(
            f"SELECT {_REPORT_COLUMNS} FROM tlsrpt_reports WHERE {' AND '.join(where)} "
            'ORDER BY next_attempt_at, report_id COLLATE "C"',
            tuple(params),
        )
        return [_report_from_row(row) for row in rows]

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
        await self._write(
            "UPDATE tlsrpt_reports SET attempts = attempts + 1, last_error = %s, "
            f"{column} = %s WHERE report_id = %s",
            [(error, as_utc(when, column), report_id)],
            idempotent=False,
        )

    async def report_delivered(self, report_id: str, uri: str, at: datetime) -> None:
        check_text(report_id, "report_id")
        check_text(uri, "uri")
        when = as_utc(at, "at")

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                cur = await conn.execute(
                    "UPDATE tlsrpt_reports SET attempts = attempts + 1, last_error = NULL, "
                    "delivered_at = %s, delivered_to = %s WHERE report_id = %s "
                    "RETURNING result_ids",
                    (when, uri, report_id),
                )
                row = await cur.fetchone()
                if row is None:
                    raise StoreError(f"no report {report_id!r} in the store; add it first")
                await conn.execute(
                    "UPDATE session_results SET reported = %s, "
                    "built_into = coalesce(built_into, %s) WHERE id = ANY(%s)",
                    (report_id, report_id, list(row[0])),
                )

        await self._run(work, idempotent=True)

    # --- what the Postfix policy server served ---

    async def add_served(self, records: Sequence[ServedPolicy]) -> None:
        rows = [
            (r.domain, r.at, r.policy_type.value, list(r.policy_strings), list(r.mx_patterns),
             list(r.rua), list(r.mx_hosts), list(r.mx_addresses), r.answer)
            for r in map(check_served, records)
        ]  # fmt: skip
        if rows:
            # Not retried on a broken connection: it may have committed (see _run); a lost
            # record only makes the collector resolve the policy itself.
            await self._write(
                f"INSERT INTO served_policies ({_SERVED_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
                idempotent=False,
            )

    async def served_at(self, domain: str, at: datetime) -> ServedPolicy | None:
        check_domain(domain)
        rows = await self._fetch(
            f"SELECT {_SERVED_COLUMNS} FROM served_policies WHERE domain = %s AND at <= %s "
            "ORDER BY at DESC, id DESC LIMIT 1",
            (domain, as_utc(at, "at")),
        )
        return _served_from_row(rows[0]) if rows else None

    async def prune_served(self, before: datetime) -> int:
        cutoff = as_utc(before, "before")

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                # The record of each domain in force at the cutoff stays (see sqlite.py).
                cur = await conn.execute(
                    "DELETE FROM served_policies old WHERE old.at < %(c)s AND EXISTS ("
                    "SELECT 1 FROM served_policies new WHERE new.domain = old.domain "
                    "AND new.at <= %(c)s AND (new.at, new.id) > (old.at, old.id))",
                    {"c": cutoff},
                )
                return cur.rowcount

        return await self._run(work, idempotent=True)

    # --- the history of `mxguard check` and its bulk-run claims ---

    async def add_check(self, record: CheckRecord) -> int:
        r = check_check(record)
        row = (r.domain, r.at, r.verdict, r.report, r.policy_id, r.policy_digest, r.run)

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                cur = await conn.execute(
                    f"INSERT INTO checks ({_CHECK_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    row,
                )
                added = await cur.fetchone()
                if added is None:  # INSERT … RETURNING always gives the row
                    raise StoreError("the new check record got no id")
                check_id = int(added[0])
                if r.run is not None:
                    # Done by the first check added for it; a later one leaves it so.
                    await conn.execute(
                        "INSERT INTO check_claims (run, domain, check_id) VALUES (%s, %s, %s) "
                        "ON CONFLICT (run, domain) DO UPDATE SET "
                        "check_id = coalesce(check_claims.check_id, EXCLUDED.check_id)",
                        (r.run, r.domain, check_id),
                    )
                return check_id

        # Not retried on a broken connection: it may have committed (see _run).
        return await self._run(work, idempotent=False)

    async def last_check(self, domain: str, before: datetime | None = None) -> CheckRecord | None:
        check_domain(domain)
        params: list[object] = [domain]
        where = "domain = %s"
        if before is not None:
            where += " AND at < %s"
            params.append(as_utc(before, "before"))
        rows = await self._fetch(
            f"SELECT id, {_CHECK_COLUMNS} FROM checks WHERE {where} "
            "ORDER BY at DESC, id DESC LIMIT 1",
            tuple(params),
        )
        return _check_from_row(rows[0]) if rows else None

    async def claim_check(
        self, run: str, domain: str, node: str, now: datetime, lease: timedelta
    ) -> bool:
        start, until = check_claim(run, domain, node, now, lease)
        # One statement, atomic under concurrency: of callers inserting the same claim, one
        # inserts; the others wait for its row lock, then evaluate the WHERE against the
        # committed claim (its lease runs) and update nothing, so return no row. Not retried
        # on a broken connection: the claim may have committed, and a retry would find it
        # held and answer False.
        rows = await self._fetch(
            "INSERT INTO check_claims (run, domain, node, lease_until) "
            "VALUES (%(run)s, %(domain)s, %(node)s, %(until)s) "
            "ON CONFLICT (run, domain) DO UPDATE SET "
            "node = EXCLUDED.node, lease_until = EXCLUDED.lease_until "
            "WHERE check_claims.check_id IS NULL AND check_claims.lease_until <= %(now)s "
            "RETURNING 1",
            {"run": run, "domain": domain, "node": node, "until": until, "now": start},
            idempotent=False,
        )
        return bool(rows)

    async def run_progress(self, run: str) -> tuple[int, int]:
        check_run(run)
        rows = await self._fetch(
            "SELECT count(*), count(check_id) FROM check_claims WHERE run = %s", (run,)
        )
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    # --- TLS reports received for domain owners (RFC 8460 §4) ---

    async def add_received(self, record: ReceivedRecord) -> bool:
        r = check_received(record)
        rep, dkim = r.report, r.dkim
        head = (
            r.dedupe_key, rep.organization_name, rep.report_id, rep.start, rep.end,
            rep.contact_info, list(rep.notes), r.received_at, r.source.value,
            None if dkim is None else dkim.ok, None if dkim is None else dkim.domain,
            None if dkim is None else dkim.selector, None if dkim is None else dkim.detail,
            r.raw,
        )  # fmt: skip

        async def work(conn: psycopg.AsyncConnection[Any]) -> bool:
            async with conn.transaction():
                # Of concurrent inserts of one dedupe_key, one inserts; the others wait for
                # it to commit, then do nothing and return no row.
                cur = await conn.execute(
                    f"INSERT INTO received_reports ({_RECEIVED_COLUMNS}) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                    head,
                )
                added = await cur.fetchone()
                if added is None:
                    return False  # a resent report: stored once
                for position, p in enumerate(rep.policies):
                    cur = await conn.execute(
                        f"INSERT INTO received_policies ({_RECEIVED_POLICY_COLUMNS}) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                        (added[0], position, str(p.policy_type), p.policy_domain,
                         list(p.policy_strings), list(p.mx_hosts), p.successful, p.failed),
                    )  # fmt: skip
                    policy = await cur.fetchone()
                    if policy is None:  # INSERT … RETURNING always gives the row
                        raise StoreError("the new received policy got no id")
                    if p.failure_details:
                        async with conn.cursor() as many:
                            await many.executemany(
                                f"INSERT INTO received_failures ({_RECEIVED_FAILURE_COLUMNS}) "
                                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                                [
                                    (policy[0], n, str(d.result_type), d.sending_mta_ip,
                                     d.receiving_mx_hostname, d.receiving_mx_helo,
                                     d.receiving_ip, d.failed_session_count,
                                     d.additional_information, d.failure_reason_code)
                                    for n, d in enumerate(p.failure_details)
                                ],
                            )  # fmt: skip
            return True

        # Not retried on a broken connection: it may have committed, and a retry would answer
        # False for a report this call stored (see _run).
        return await self._run(work, idempotent=False)

    async def received_between(
        self, domain: str, start: datetime, end: datetime
    ) -> list[ReceivedRecord]:
        low, high = check_inbox_range(domain, start, end)
        params = {"domain": domain, "start": low, "end": high}

        async def work(
            conn: psycopg.AsyncConnection[Any],
        ) -> tuple[list[tuple[Any, ...]], ...]:
            # One snapshot for the three queries.
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                heads = await conn.execute(
                    f"SELECT id, {_RECEIVED_COLUMNS} FROM received_reports "
                    f"WHERE id IN ({_INBOX_REPORTS}) ORDER BY range_start, id",
                    params,
                )
                policies = await conn.execute(
                    f"SELECT id, {_RECEIVED_POLICY_COLUMNS} FROM received_policies "
                    f"WHERE received_id IN ({_INBOX_REPORTS}) ORDER BY received_id, position",
                    params,
                )
                policy_rows = await policies.fetchall()
                failures = await conn.execute(
                    f"SELECT {_RECEIVED_FAILURE_COLUMNS} FROM received_failures WHERE policy_id "
                    "IN (SELECT id FROM received_policies WHERE received_id IN "
                    f"({_INBOX_REPORTS})) ORDER BY policy_id, position",
                    params,
                )
                return await heads.fetchall(), policy_rows, await failures.fetchall()

        heads, policies, failures = await self._run(work, idempotent=True)
        return assemble_received(
            [_received_from_row(row) for row in heads],
            [_received_policy_from_row(row) for row in policies],
            [_received_failure_from_row(row) for row in failures],
        )

    async def report_totals(
        self, domain: str, start: datetime, end: datetime, *, top: int = 20
    ) -> ReportTotals:
        low, high = check_inbox_range(domain, start, end, top)
        params = {"domain": domain, "start": low, "end": high, "top": top}

        async def work(
            conn: psycopg.AsyncConnection[Any],
        ) -> tuple[list[tuple[Any, ...]], ...]:
            # sum() of bigint is numeric in PostgreSQL: exact, however large.
            queries = (
                "SELECT count(DISTINCT r.id), coalesce(sum(p.successful), 0), "
                f"coalesce(sum(p.failed), 0) {_INBOX_POLICIES}",
                "SELECT (r.range_start AT TIME ZONE 'UTC')::date AS day, count(DISTINCT r.id), "
                f"sum(p.successful), sum(p.failed) {_INBOX_POLICIES} GROUP BY day ORDER BY day",
                "SELECT r.organization_name, count(DISTINCT r.id), sum(p.successful) AS ok, "
                f"sum(p.failed) AS bad {_INBOX_POLICIES} GROUP BY r.organization_name "
                'ORDER BY bad DESC, ok DESC, r.organization_name COLLATE "C" LIMIT %(top)s',
                "SELECT f.result_type, count(DISTINCT r.id), sum(f.failed_session_count) AS bad "
                f"{_INBOX_FAILURES} GROUP BY f.result_type "
                'ORDER BY bad DESC, f.result_type COLLATE "C" LIMIT %(top)s',
                "SELECT f.receiving_mx_hostname, count(DISTINCT r.id), "
                f"sum(f.failed_session_count) AS bad {_INBOX_FAILURES} "
                "GROUP BY f.receiving_mx_hostname ORDER BY bad DESC, "
                'f.receiving_mx_hostname IS NULL, f.receiving_mx_hostname COLLATE "C" '
                "LIMIT %(top)s",
            )
            out = []
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                for query in queries:
                    cur = await conn.execute(query, params)
                    out.append(await cur.fetchall())
            return tuple(out)

        totals, days, orgs, types, hosts = await self._run(work, idempotent=True)
        [(reports, ok, bad)] = totals
        return ReportTotals(
            domain=domain, start=low, end=high, reports=int(reports), successful=int(ok),
            failed=int(bad),
            days=tuple(DayTotals(d, int(n), int(s), int(f)) for d, n, s, f in days),
            organizations=tuple(OrganizationTotals(o, int(n), int(s), int(f))
                                for o, n, s, f in orgs),
            result_types=tuple(Tally(k, int(n), int(f)) for k, n, f in types),
            mx_hosts=tuple(Tally(k, int(n), int(f)) for k, n, f in hosts),
        )  # fmt: skip

    async def received_domains(self, start: datetime, end: datetime) -> list[str]:
        low, high = check_inbox_range(None, start, end)
        rows = await self._fetch(
            'SELECT DISTINCT p.policy_domain COLLATE "C" FROM received_policies p '
            "JOIN received_reports r ON r.id = p.received_id WHERE p.policy_domain IS NOT NULL "
            "AND r.range_start >= %s AND r.range_start < %s ORDER BY 1",
            (low, high),
        )
        return [str(row[0]) for row in rows]

    # --- learned security levels (docs/learned.md) ---

    async def learn(self, seen: Sequence[LevelSeen], *, stale_before: datetime) -> None:
        stale = as_utc(stale_before, "stale_before")
        rows = [
            {"d": x.domain, "m": x.mx, "i": x.ip, "l": x.level.value, "r": x.level.rank,
             "a": x.at, "s": stale}
            for x in map(check_seen, seen)
        ]  # fmt: skip
        if not rows:
            return

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(_LEARN, rows)

        # Not retried: counting a session twice would be wrong.
        await self._run(work, idempotent=False)

    async def learned_hosts(self, domain: str | None = None) -> list[LearnedHost]:
        where, params = "", tuple[str, ...]()
        if domain is not None:
            where, params = "WHERE domain = %s", (check_domain(domain),)
        rows = await self._fetch(
            f"SELECT {_LEARNED_COLUMNS} FROM learned_hosts {where} "
            'ORDER BY domain COLLATE "C", mx COLLATE "C", ip COLLATE "C"',
            params,
        )
        return [_learned_from_row(row) for row in rows]

    async def forget_learned(self, domain: str) -> int:
        check_domain(domain)

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                cur = await conn.execute("DELETE FROM learned_hosts WHERE domain = %s", (domain,))
                await conn.execute("DELETE FROM learned_drops WHERE domain = %s", (domain,))
                return cur.rowcount

        return await self._run(work, idempotent=True)

    async def add_drops(self, drops: Sequence[LevelDrop]) -> None:
        rows = [
            (d.at, d.domain, d.mx, d.ip, d.learned.value, d.seen.value,
             d.result_type.value if d.result_type else None)
            for d in map(check_drop, drops)
        ]  # fmt: skip
        if rows:
            await self._write(
                f"INSERT INTO learned_drops ({_DROP_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                rows,
                idempotent=False,
            )

    async def drops_since(self, start: datetime, domain: str | None = None) -> list[LevelDrop]:
        where, params = "at >= %s", list[object]([as_utc(start, "start")])
        if domain is not None:
            where += " AND domain = %s"
            params.append(check_domain(domain))
        rows = await self._fetch(
            f"SELECT id, {_DROP_COLUMNS} FROM learned_drops WHERE {where} ORDER BY at, id",
            tuple(params),
        )
        return [_drop_from_row(row) for row in rows]

    async def raise_alarm(self, alarm: StrippingAlarm) -> bool:
        a = check_alarm(alarm)
        rows = await self._fetch(
            "INSERT INTO learned_alarms (raised_at, domains, hosts, window_s, enforce) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
            (a.raised_at, list(a.domains), list(a.hosts), float(a.window), a.enforce),
            idempotent=False,
        )
        return bool(rows)

    async def latest_alarm(self) -> StrippingAlarm | None:
        rows = await self._fetch(
            f"SELECT {_ALARM_COLUMNS} FROM learned_alarms ORDER BY id DESC LIMIT 1"
        )
        return _alarm_from_row(rows[0]) if rows else None

    async def extend_alarm(
        self, domains: Sequence[str], hosts: Sequence[str]
    ) -> StrippingAlarm | None:
        add_domains = [check_domain(d) for d in domains]
        add_hosts = [check_text(h, "alarm host") for h in hosts]

        async def work(conn: psycopg.AsyncConnection[Any]) -> StrippingAlarm | None:
            async with conn.transaction():
                cur = await conn.execute(
                    f"SELECT {_ALARM_COLUMNS} FROM learned_alarms WHERE cleared_at IS NULL "
                    "FOR UPDATE"
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                alarm = _alarm_from_row(row)
                merged_domains = sorted({*alarm.domains, *add_domains})
                merged_hosts = sorted({*alarm.hosts, *add_hosts})
                await conn.execute(
                    "UPDATE learned_alarms SET domains = %s, hosts = %s WHERE id = %s",
                    (merged_domains, merged_hosts, alarm.id),
                )
            return replace(alarm, domains=tuple(merged_domains), hosts=tuple(merged_hosts))

        return await self._run(work, idempotent=True)

    async def clear_alarm(self, at: datetime) -> StrippingAlarm | None:
        rows = await self._fetch(
            "UPDATE learned_alarms SET cleared_at = %s WHERE cleared_at IS NULL "
            f"RETURNING {_ALARM_COLUMNS}",
            (as_utc(at, "at"),),
            idempotent=False,
        )
        return _alarm_from_row(rows[0]) if rows else None

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await conn.close()

    # --- plumbing ---

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        # Called with the lock held. A connection known to be closed or broken is replaced
        # here; see _run for one that breaks while in use.
        if self._closed:
            raise StoreError(f"PostgreSQL store {redact_url(self.url)} is closed; open it again")
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            conn = await psycopg.AsyncConnection.connect(autocommit=True, **self._params)
            await conn.execute("SET TIME ZONE 'UTC'")
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        self._conn = conn
        return conn

    async def _fetch(
        self,
        query: str,
        params: tuple[Any, ...] | dict[str, Any] = (),
        *,
        idempotent: bool = True,
    ) -> list[tuple[Any, ...]]:
        async def work(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

        return await self._run(work, idempotent=idempotent)

    async def _write(
        self, query: str, rows: Sequence[tuple[Any, ...]], *, idempotent: bool = True
    ) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(query, rows)

        await self._run(work, idempotent=idempotent)

    async def _run(
        self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], *, idempotent: bool
    ) -> T:
        async with self._lock:
            conn = await self._connection()
            try:
                return await work(conn)
            except psycopg.OperationalError as exc:
                # A connection the server dropped while idle (a restart, a failover, an idle
                # timeout) shows up only when used. Run the work again on a new connection
                # when running it twice cannot change the outcome; an INSERT of results
                # could have committed before the connection broke, so it is not retried.
                if not (idempotent and conn.broken):
                    raise self._error(exc) from exc
            except psycopg.Error as exc:
                raise self._error(exc) from exc
            conn = await self._connection()
            try:
                return await work(conn)
            except psycopg.Error as exc:
                raise self._error(exc) from exc

    def _error(self, exc: psycopg.Error) -> StoreError:
        reason = str(exc).strip() or type(exc).__name__
        return StoreError(f"PostgreSQL store {redact_url(self.url)}: {reason}")


class _Refused(Exception):
    """Raised inside a transaction to roll it back: the write must not happen."""


async def _migrate(conn: psycopg.AsyncConnection[Any], where: str) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        cur = await conn.execute("SELECT max(version) FROM schema_version")
        row = await cur.fetchone()
        version = 0 if row is None or row[0] is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"PostgreSQL store {where} has schema version {version}, but this mxguard "
                f"knows versions up to {SCHEMA_VERSION}; upgrade mxguard on every node"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                await conn.execute(statement)
        if version < SCHEMA_VERSION:
            await conn.execute("DELETE FROM schema_version")
            await conn.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,)
            )


def _policy_from_row(row: tuple[Any, ...]) -> CachedPolicy:
    domain, policy_id, text, fetched_at, expires_at = row
    return CachedPolicy(
        domain=domain,
        policy_id=policy_id,
        policy_text=text,
        fetched_at=fetched_at.astimezone(UTC),
        expires_at=expires_at.astimezone(UTC),
    )


def _result_to_row(r: SessionResult) -> tuple[Any, ...]:
    return (
        r.at,
        r.policy_domain,
        r.policy_type.value,
        list(r.policy_strings),
        list(r.mx_patterns),
        r.result_text,
        r.sending_ip,
        r.receiving_mx,
        r.receiving_ip,
        r.receiving_helo,
        r.detail,
        list(r.rua),
        r.is_report,
        r.reported,
    )


def _result_from_row(row: tuple[Any, ...]) -> SessionResult:
    (id_, at, domain, ptype, strings, patterns, rtype, sip, rmx, rip, helo, detail, rua, is_report,
     reported) = row  # fmt: skip
    known, other = result_type_from_store(rtype)
    return SessionResult(
        id=int(id_),
        at=at.astimezone(UTC),
        policy_domain=domain,
        policy=policy_from_store(ptype, strings, patterns, rua),
        result_type=known,
        sending_ip=sip,
        receiving_mx=rmx,
        receiving_ip=rip,
        receiving_helo=helo,
        detail=detail,
        is_report=bool(is_report),
        reported=reported,
        other_result_type=other,
    )


def _served_from_row(row: tuple[Any, ...]) -> ServedPolicy:
    domain, at, ptype, strings, patterns, rua, hosts, addresses, answer = row
    return ServedPolicy(
        domain=domain,
        at=at.astimezone(UTC),
        policy=policy_from_store(ptype, strings, patterns, rua),
        mx_hosts=tuple(hosts),
        mx_addresses=tuple(addresses),
        answer=answer,
    )


def _report_from_row(row: tuple[Any, ...]) -> PendingReport:
    (report_id, domain, start, name, body, rua, ids, created, next_at, attempts, error,
     delivered_at, delivered_to, dropped_at) = row  # fmt: skip
    return PendingReport(
        report_id=report_id,
        policy_domain=domain,
        start=start.astimezone(UTC),
        filename=name,
        body=bytes(body),
        rua=tuple(rua),
        result_ids=tuple(int(i) for i in ids),
        created_at=created.astimezone(UTC),
        next_attempt_at=next_at.astimezone(UTC),
        attempts=int(attempts),
        last_error=error,
        delivered_at=None if delivered_at is None else delivered_at.astimezone(UTC),
        delivered_to=delivered_to,
        dropped_at=None if dropped_at is None else dropped_at.astimezone(UTC),
    )


def _check_from_row(row: tuple[Any, ...]) -> CheckRecord:
    id_, domain, at, verdict, report, policy_id, digest, run = row
    return CheckRecord(
        domain=domain,
        at=at.astimezone(UTC),
        verdict=verdict,
        report=report,
        policy_id=policy_id,
        policy_digest=digest,
        run=run,
        id=int(id_),
    )


def _received_from_row(row: tuple[Any, ...]) -> ReceivedRecord:
    (id_, _key, org, report_id, start, end, contact, notes, received_at, source, dkim_ok,
     dkim_domain, dkim_selector, dkim_detail, raw) = row  # fmt: skip
    from mxguard.protocol.tlsrpt_ingest import ReceivedReport

    report = ReceivedReport(
        organization_name=org,
        start=start.astimezone(UTC),
        end=end.astimezone(UTC),
        contact_info=contact,
        report_id=report_id,
        policies=(),
        notes=tuple(notes),
    )
    return ReceivedRecord(
        report=report,
        raw=bytes(raw),
        received_at=received_at.astimezone(UTC),
        source=ReportSource(source),
        dkim=dkim_from_store(dkim_ok, dkim_domain, dkim_selector, dkim_detail),
        id=int(id_),
    )


def _received_policy_from_row(row: tuple[Any, ...]) -> tuple[int, int, ReceivedPolicy]:
    policy_id, received_id, _position, ptype, domain, strings, mx, ok, bad = row
    from mxguard.protocol.tlsrpt_ingest import ReceivedPolicy

    policy = ReceivedPolicy(
        policy_type=known_policy_type(ptype),
        policy_strings=tuple(strings),
        policy_domain=domain,
        mx_hosts=tuple(mx),
        successful=int(ok),
        failed=int(bad),
    )
    return int(received_id), int(policy_id), policy


def _received_failure_from_row(row: tuple[Any, ...]) -> tuple[int, FailureDetail]:
    policy_id, _position, rtype, sip, mx, helo, rip, count, info, code = row
    return int(policy_id), FailureDetail(
        result_type=known_result_type(rtype),
        sending_mta_ip=sip,
        receiving_mx_hostname=mx,
        receiving_ip=rip,
        receiving_mx_helo=helo,
        failed_session_count=int(count),
        additional_information=info,
        failure_reason_code=code,
    )


# See sqlite.py: every SET expression reads the row as it was.
_REPLACE = "(excluded.rank > learned_hosts.rank OR learned_hosts.last_seen < %(s)s)"
_SAME = "excluded.rank = learned_hosts.rank"
_LEARN = (
    "INSERT INTO learned_hosts (domain, mx, ip, level, rank, first_seen, last_seen, seen) "
    "VALUES (%(d)s, %(m)s, %(i)s, %(l)s, %(r)s, %(a)s, %(a)s, 1) "
    "ON CONFLICT (domain, mx, ip) DO UPDATE SET "
    f"level = CASE WHEN {_REPLACE} THEN excluded.level ELSE learned_hosts.level END, "
    f"rank = CASE WHEN {_REPLACE} THEN excluded.rank ELSE learned_hosts.rank END, "
    f"first_seen = CASE WHEN {_REPLACE} THEN excluded.first_seen "
    "ELSE learned_hosts.first_seen END, "
    f"last_seen = CASE WHEN {_REPLACE} THEN excluded.last_seen WHEN {_SAME} "
    "THEN greatest(learned_hosts.last_seen, excluded.last_seen) ELSE learned_hosts.last_seen END, "
    f"seen = CASE WHEN {_REPLACE} THEN 1 WHEN {_SAME} THEN learned_hosts.seen + 1 "
    "ELSE learned_hosts.seen END"
)
_LEARNED_COLUMNS = "domain, mx, ip, level, first_seen, last_seen, seen"
_DROP_COLUMNS = "at, domain, mx, ip, learned, seen, result_type"
_ALARM_COLUMNS = "id, raised_at, domains, hosts, window_s, enforce, cleared_at"


def _learned_from_row(row: tuple[Any, ...]) -> LearnedHost:
    domain, mx, ip, level, first_seen, last_seen, seen = row
    return LearnedHost(
        domain=domain, mx=mx, ip=ip,
        level=level_from_store(level, f"learned_hosts row {domain} {mx} [{ip}]"),
        first_seen=first_seen.astimezone(UTC), last_seen=last_seen.astimezone(UTC),
        seen=int(seen),
    )  # fmt: skip


def _drop_from_row(row: tuple[Any, ...]) -> LevelDrop:
    id_, at, domain, mx, ip, learned, seen, result_type = row
    where = f"learned_drops row {id_}"
    known, _ = result_type_from_store(result_type)
    return LevelDrop(
        at=at.astimezone(UTC), domain=domain, mx=mx, ip=ip,
        learned=level_from_store(learned, where), seen=level_from_store(seen, where),
        result_type=known, id=int(id_),
    )  # fmt: skip


def _alarm_from_row(row: tuple[Any, ...]) -> StrippingAlarm:
    id_, raised_at, domains, hosts, window, enforce, cleared_at = row
    return StrippingAlarm(
        raised_at=raised_at.astimezone(UTC), domains=tuple(domains), hosts=tuple(hosts),
        window=float(window), enforce=bool(enforce),
        cleared_at=None if cleared_at is None else cleared_at.astimezone(UTC), id=int(id_),
    )  # fmt: skip
