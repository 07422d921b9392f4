"""The store's TLS-RPT report queue (RFC 8460 §5: keep the data until some rua accepted it):
upgrading a SQLite or PostgreSQL store from schema version 2, where a day had one report, to
version 3, where results recorded late go into a further report for their day (RFC 8460 §4.4:
each report with its own report-id).

What the queue does on every backend (one report per result, claims, attempts, drops,
delivery, and Redis refusing it) is in test_store_conformance.py."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import PendingReport, open_store

pytest_plugins = ["servers"]

DAY = datetime(2026, 5, 1, tzinfo=UTC)
T0 = DAY + timedelta(days=1, hours=1)


def report(ids: tuple[int, ...], **kw: Any) -> PendingReport:
    base = PendingReport(
        report_id="r1", policy_domain="example.com", start=DAY,
        filename="s!example.com!1!2!u.json.gz",
        body=b"\x1f\x8b gzip bytes \x00\xff", rua=("mailto:t@example.com", "https://r.example/x"),
        result_ids=ids, created_at=T0, next_attempt_at=T0 + timedelta(minutes=5),
    )  # fmt: skip
    return replace(base, **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())


# --- schema version 2 (one report per domain and day) to 3 ---------------------------------


def _version_2(url: str) -> None:
    """Create the version-2 schema at `url` with two results: one in a pending report, one
    recorded after that report was built."""
    if url.startswith("sqlite"):
        from mxguard.adapters.store.sqlite import MIGRATIONS as SQLITE

        path = url.removeprefix("sqlite://")
        with sqlite3.connect(path) as conn:
            for statement in (s for step in SQLITE[:2] for s in step):
                conn.execute(statement)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (2)")
            for n in (1, 2):
                conn.execute(
                    "INSERT INTO session_results (at, policy_domain, policy_type, "
                    "policy_strings, mx_patterns, rua, is_report) VALUES "
                    "(?, 'example.com', 'sts', '[]', '[]', '[\"mailto:t@example.com\"]', 0)",
                    (f"2026-05-01T1{n}:00:00.000000Z",),
                )
            conn.execute(
                "INSERT INTO tlsrpt_reports VALUES ('r1', 'example.com', "
                "'2026-05-01T00:00:00.000000Z', 'f', x'00', '[]', '[1]', "
                "'2026-05-02T01:00:00.000000Z', '2026-05-02T01:00:00.000000Z', 0, NULL, NULL, "
                "NULL)"
            )
        return
    import psycopg

    from mxguard.adapters.store.postgres import MIGRATIONS as POSTGRES

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in (s for step in POSTGRES[:2] for s in step):
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (2)")
        for n in (1, 2):
            conn.execute(
                "INSERT INTO session_results (at, policy_domain, policy_type, policy_strings, "
                "mx_patterns, rua, is_report) VALUES (%s, 'example.com', 'sts', '{}', '{}', "
                "'{mailto:t@example.com}', false)",
                (DAY + timedelta(hours=10 + n),),
            )
        conn.execute(
            "INSERT INTO tlsrpt_reports VALUES ('r1', 'example.com', %s, 'f', '\\x00', '{}', "
            "'{1}', %s, %s, 0, NULL, NULL, NULL)",
            (DAY, T0, T0),
        )


def test_upgrading_from_version_2_keeps_each_result_in_its_report_and_allows_further_reports(
    url: str,
) -> None:
    _version_2(url)

    async def body() -> None:
        store = await open_store(url)
        try:
            [pending] = await store.reports(pending_only=True)
            assert (pending.report_id, pending.result_ids, pending.dropped_at) == ("r1", (1,), None)
            [late] = await store.results_between(DAY, T0, unbuilt_only=True)
            assert late.id == 2
            assert await store.add_report(report((2,), report_id="r2"))
            assert not await store.add_report(report((1,), report_id="r3"))
        finally:
            await store.close()

    asyncio.run(body())
