"""The store's TLS-RPT report queue (RFC 8460 §5: keep the data until some rua accepted it),
specified once and checked against SQLite and PostgreSQL; Redis refuses it.

A session result belongs to at most one report; a day may have several reports (late results,
§4.4: each with its own report-id); a report is claimed by one reporter at a time; a dropped
report is no longer pending."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import PendingReport, SessionResult, StoreError, open_store

pytest_plugins = ["servers"]

DAY = datetime(2026, 5, 1, tzinfo=UTC)
T0 = DAY + timedelta(days=1, hours=1)


def result(**kw: Any) -> SessionResult:
    base = SessionResult(
        id=None, at=DAY + timedelta(hours=12), policy_domain="example.com", policy_type="sts",
        policy_strings=("version: STSv1",), mx_patterns=("*.example.com",), result_type=None,
        sending_ip="192.0.2.1", receiving_mx="mx.example.com", receiving_ip="198.51.100.1",
        receiving_helo="mx.example.com", detail=None, rua=("mailto:t@example.com",),
        is_report=False, reported=None,
    )  # fmt: skip
    return replace(base, **kw)


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


def test_a_stored_report_comes_back_exactly_and_survives_reopening(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        await store.add_results([result()])
        [r] = await store.results_between(DAY, DAY + timedelta(days=1))
        assert r.id is not None
        assert await store.add_report(report((r.id,)))
        await store.close()
        store = await open_store(url)
        try:
            assert await store.reports() == [report((r.id,))]
            assert await store.reports(start=DAY, pending_only=True) == [report((r.id,))]
            assert await store.reports(start=DAY + timedelta(days=1)) == []
        finally:
            await store.close()

    asyncio.run(body())


def test_a_result_goes_into_one_report_only_and_late_results_into_a_further_one(
    url: str,
) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.add_results([result(), result()])
            a, b = (r.id for r in await store.results_between(DAY, T0) if r.id)
            assert await store.add_report(report((a, b)))
            # A result recorded late, after the day was built:
            await store.add_results([result(at=DAY + timedelta(hours=23, minutes=59))])
            [late] = await store.results_between(DAY, T0, unbuilt_only=True)
            assert late.id is not None
            # A report over a result another report has is refused as a whole ...
            assert not await store.add_report(report((b, late.id), report_id="r2"))
            assert [r.id for r in await store.results_between(DAY, T0, unbuilt_only=True)] == [
                late.id
            ]
            # ... and a further report for the same domain and day takes the late one.
            assert await store.add_report(report((late.id,), report_id="r3"))
            assert [r.report_id for r in await store.reports(start=DAY)] == ["r1", "r3"]
            assert await store.results_between(DAY, T0, unbuilt_only=True) == []
        finally:
            await store.close()

    asyncio.run(body())


def test_oldest_unbuilt_counts_only_results_a_report_could_take(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            h = DAY + timedelta(hours=1)
            await store.add_results(
                [
                    result(at=h, is_report=True),  # RFC 8460 §5.3: never reported
                    result(at=h + timedelta(hours=1), rua=()),  # no rua: nowhere to send
                    result(at=h + timedelta(hours=2)),  # built below
                    result(at=h + timedelta(hours=3)),
                ]
            )
            assert await store.oldest_unbuilt(DAY, T0) == h + timedelta(hours=2)
            built = [r.id for r in await store.results_between(DAY, T0) if r.id][2]
            assert await store.add_report(report((built,)))
            assert await store.oldest_unbuilt(DAY, T0) == h + timedelta(hours=3)
            assert await store.oldest_unbuilt(DAY, h + timedelta(hours=3)) is None
        finally:
            await store.close()

    asyncio.run(body())


def test_a_claim_holds_the_report_until_its_lease_ends(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.add_report(report(()))
            due = T0 + timedelta(minutes=5)
            lease = due + timedelta(minutes=30)
            assert (
                await store.claim_report("r1", now=due - timedelta(seconds=1), until=lease) is None
            )
            claimed = await store.claim_report("r1", now=due, until=lease)
            assert claimed is not None and claimed.next_attempt_at == lease
            assert await store.claim_report("r1", now=due, until=lease) is None
            assert await store.claim_report("r1", now=lease, until=lease + timedelta(1)) is not None
            assert await store.claim_report("r1", now=T0, until=T0, force=True) is not None
            await store.report_delivered("r1", "mailto:t@example.com", T0)
            assert await store.claim_report("r1", now=T0, until=T0, force=True) is None
            assert await store.claim_report("missing", now=T0, until=T0, force=True) is None
        finally:
            await store.close()

    asyncio.run(body())


def test_of_many_concurrent_claims_on_one_store_exactly_one_wins(url: str) -> None:
    async def body() -> None:
        stores = [await open_store(url) for _ in range(4)]
        try:
            await stores[0].add_report(report(()))
            now, lease = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
            claims = await asyncio.gather(
                *(s.claim_report("r1", now=now, until=lease) for s in stores for _ in range(3))
            )
            assert sum(c is not None for c in claims) == 1
        finally:
            for s in stores:
                await s.close()

    asyncio.run(body())


def test_a_dropped_report_is_no_longer_pending_and_its_results_stay_unreported(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.add_results([result()])
            ids = tuple(r.id for r in await store.results_between(DAY, T0) if r.id)
            await store.add_report(report(ids))
            await store.report_dropped("r1", "550 no such user", T0)
            assert await store.reports(pending_only=True) == []
            [p] = await store.reports()
            assert (p.dropped_at, p.last_error, p.attempts) == (T0, "550 no such user", 1)
            assert await store.claim_report("r1", now=T0, until=T0, force=True) is None
            assert len(await store.results_between(DAY, T0, unreported_only=True)) == 1
            assert await store.results_between(DAY, T0, unbuilt_only=True) == []
        finally:
            await store.close()

    asyncio.run(body())


def test_failure_keeps_the_report_and_its_results_and_reschedules_it(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.add_results([result(), result()])
            ids = tuple(r.id for r in await store.results_between(DAY, T0) if r.id)
            await store.add_report(report(ids))
            later = T0 + timedelta(hours=1)
            await store.report_failed("r1", "connection refused", later)
            [p] = await store.reports(pending_only=True)
            assert (p.attempts, p.last_error, p.next_attempt_at) == (1, "connection refused", later)
            assert len(await store.results_between(DAY, T0, unreported_only=True)) == 2
        finally:
            await store.close()

    asyncio.run(body())


def test_delivery_marks_the_report_and_exactly_its_results_reported(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.add_results([result(), result(), result(policy_domain="other.example")])
            rs = await store.results_between(DAY, T0)
            ids = tuple(r.id for r in rs if r.policy_domain == "example.com" and r.id)
            await store.add_report(report(ids))
            await store.report_delivered("r1", "mailto:t@example.com", T0)
            assert await store.reports(pending_only=True) == []
            [done] = await store.reports()
            assert (done.delivered_to, done.delivered_at) == ("mailto:t@example.com", T0)
            left = await store.results_between(DAY, T0, unreported_only=True)
            assert [r.policy_domain for r in left] == ["other.example"]
            every = await store.results_between(DAY, T0, unreported_only=False)
            assert sorted(str(r.reported) for r in every) == ["None", "r1", "r1"]
            with pytest.raises(StoreError, match="no report"):
                await store.report_delivered("missing", "mailto:x@y", T0)
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_refuses_reports(redis_server: Any) -> None:
    async def body() -> None:
        store = await open_store(redis_server.url(prefix=f"t{uuid.uuid4().hex}:"))
        try:
            with pytest.raises(StoreError, match="policy cache only"):
                await store.add_report(report(()))
            with pytest.raises(StoreError, match="policy cache only"):
                await store.reports()
            with pytest.raises(StoreError, match="policy cache only"):
                await store.claim_report("r1", now=T0, until=T0)
        finally:
            await store.close()

    asyncio.run(body())


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
