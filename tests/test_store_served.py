"""The store's record of what the Postfix policy server served (for TLS-RPT): upgrading a
SQLite or PostgreSQL store from schema version 3, which had no such records, keeps its session
results and starts keeping records.

What the served log does on every backend (the record in force at a time, pruning, and Redis
refusing it) is in test_store_conformance.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import ServedPolicy, open_store
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy

pytest_plugins = ["servers"]

T0 = datetime(2026, 5, 1, 11, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def served(at: datetime, **kw: Any) -> ServedPolicy:
    sts = ReportedPolicy(
        PolicyType.STS,
        ("version: STSv1", "mode: enforce", "mx: *.example.com", "max_age: 86400"),
        ("*.example.com",), ("mailto:tlsrpt@example.com",),
    )  # fmt: skip
    base = ServedPolicy(
        domain="example.com", at=at, policy=sts,
        mx_hosts=("mx1.example.com", "mx2.example.com"), mx_addresses=("192.0.2.1", "2001:db8::1"),
        answer="OK secure match=mx1.example.com:mx2.example.com servername=hostname",
    )  # fmt: skip
    return replace(base, **kw)


A = served(T0)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())


def _version_3(url: str) -> None:
    """The version-3 schema (before served records) at `url`, with one session result."""
    if url.startswith("sqlite"):
        from mxguard.adapters.store.sqlite import MIGRATIONS as SQLITE

        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            for statement in (s for step in SQLITE[:3] for s in step):
                conn.execute(statement)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (3)")
            conn.execute(
                "INSERT INTO session_results (at, policy_domain, policy_type, policy_strings, "
                "mx_patterns, rua, is_report) VALUES ('2026-05-01T10:00:00.000000Z', "
                "'example.com', 'sts', '[]', '[]', '[]', 0)"
            )
        return
    import psycopg

    from mxguard.adapters.store.postgres import MIGRATIONS as POSTGRES

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in (s for step in POSTGRES[:3] for s in step):
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (3)")
        conn.execute(
            "INSERT INTO session_results (at, policy_domain, policy_type, policy_strings, "
            "mx_patterns, rua, is_report) VALUES (%s, 'example.com', 'sts', '{}', '{}', '{}', "
            "false)",
            (T0 - timedelta(hours=1),),
        )


def test_upgrading_from_version_3_adds_served_records_and_keeps_the_results(url: str) -> None:
    _version_3(url)

    async def body() -> None:
        store = await open_store(url)
        try:
            assert len(await store.results_between(T0 - DAY, T0 + DAY)) == 1
            assert await store.served_at("example.com", T0) is None
            await store.add_served([A])
            assert await store.served_at("example.com", T0) == A
        finally:
            await store.close()

    asyncio.run(body())
