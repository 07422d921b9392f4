"""The store's record of what the Postfix policy server served (for TLS-RPT), specified once and
checked against SQLite and PostgreSQL; Redis refuses it.

A record is in force from its `at` until the next record of its domain; the collector asks
for the one in force at a session's time. Pruning forgets records no longer in force at the
cutoff, never the one that still is (an unchanged policy is never written again).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import ServedPolicy, StoreError, open_store

pytest_plugins = ["servers"]

T0 = datetime(2026, 5, 1, 11, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)


def served(at: datetime, **kw: Any) -> ServedPolicy:
    base = ServedPolicy(
        domain="example.com", at=at, policy_type="sts",
        policy_strings=("version: STSv1", "mode: enforce", "mx: *.example.com", "max_age: 86400"),
        mx_patterns=("*.example.com",), rua=("mailto:tlsrpt@example.com",),
        mx_hosts=("mx1.example.com", "mx2.example.com"), mx_addresses=("192.0.2.1", "2001:db8::1"),
        answer="OK secure match=mx1.example.com:mx2.example.com servername=hostname",
    )  # fmt: skip
    return replace(base, **kw)


A = served(T0)
B = served(T0 + 20 * MINUTE, rua=("mailto:new@example.com",), mx_addresses=("192.0.2.9",))
OTHER = served(
    T0 - DAY, domain="dane.example", policy_type="tlsa", policy_strings=("3 1 1 " + "ab" * 32,),
    mx_patterns=(), answer="OK dane-only",
)  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())


# (domain, asked at) -> the record in force, or None
IN_FORCE: list[tuple[str, datetime, ServedPolicy | None]] = [
    ("example.com", T0 - timedelta(microseconds=1), None),  # before the first record
    ("example.com", T0, A),  # from its own moment on
    ("example.com", T0 + 10 * MINUTE, A),
    ("example.com", B.at - timedelta(microseconds=1), A),
    ("example.com", B.at, B),  # the later record replaces it
    ("example.com", T0 + 400 * DAY, B),  # however long nothing changes
    ("dane.example", T0, OTHER),  # domains are apart
    ("other.example", T0, None),
]


def test_the_record_in_force_is_the_latest_at_or_before_the_time_and_survives_reopening(
    url: str,
) -> None:
    async def body() -> None:
        store = await open_store(url)
        await store.add_served([A, OTHER])
        await store.add_served([B])
        await store.add_served([])  # nothing to write is no error
        await store.close()
        store = await open_store(url)
        try:
            got = [await store.served_at(d, at) for d, at, _ in IN_FORCE]
        finally:
            await store.close()
        assert got == [want for _, _, want in IN_FORCE]

    asyncio.run(body())


def test_of_two_records_at_one_moment_the_later_written_is_in_force(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.add_served([A, replace(A, answer="OK encrypt")])
            assert (await store.served_at("example.com", T0)) == replace(A, answer="OK encrypt")
        finally:
            await store.close()

    asyncio.run(body())


def test_pruning_keeps_each_domains_record_in_force_at_the_cutoff(url: str) -> None:
    cutoff = T0
    old = served(cutoff - 50 * DAY, answer="OK encrypt")  # replaced before the cutoff: goes
    in_force = served(cutoff - 45 * DAY)  # still in force at the cutoff: stays
    later = served(cutoff + DAY, rua=())  # after the cutoff: stays
    lonely = served(cutoff - 300 * DAY, domain="quiet.example")  # never changed: stays

    async def body() -> None:
        store = await open_store(url)
        try:
            await store.add_served([old, in_force, later, lonely])
            assert await store.prune_served(cutoff) == 1
            assert await store.prune_served(cutoff) == 0
            assert await store.served_at("example.com", cutoff - 46 * DAY) is None
            assert await store.served_at("example.com", cutoff - DAY) == in_force
            assert await store.served_at("example.com", cutoff + DAY) == later
            assert await store.served_at("quiet.example", cutoff) == lonely
        finally:
            await store.close()

    asyncio.run(body())


# (what is wrong, the record, what the error must say)
REFUSED = [
    ("a naive time", served(T0.replace(tzinfo=None)), "has no time zone"),
    ("an unknown policy type", served(T0, policy_type="dane"), "not an RFC 8460"),
    ("a domain not in A-label form", served(T0, domain="Example.COM."), "lower-case A-label"),
]


@pytest.mark.parametrize(("why", "record", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_records_the_store_could_not_give_back_unchanged_are_refused(
    tmp_path: Path, why: str, record: ServedPolicy, message: str
) -> None:
    async def body() -> None:
        store = await open_store(f"sqlite:///{tmp_path / 'state.db'}")
        try:
            with pytest.raises(StoreError, match=message):
                await store.add_served([record])
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_refuses_served_records_and_names_the_stores_that_keep_them(
    redis_server: Any,
) -> None:
    async def body() -> None:
        store = await open_store(redis_server.url(prefix=f"t{uuid.uuid4().hex}:"))
        try:
            for call in (
                store.add_served([A]),
                store.served_at("example.com", T0),
                store.prune_served(T0),
            ):
                with pytest.raises(StoreError, match="SQLite or PostgreSQL"):
                    await call
        finally:
            await store.close()

    asyncio.run(body())


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
