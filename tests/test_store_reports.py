"""The store's TLS-RPT report queue (RFC 8460 §5: keep the data until some rua accepted it),
specified once and checked against SQLite and PostgreSQL; Redis refuses it."""

from __future__ import annotations

import asyncio
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


def test_a_day_is_reported_once_per_domain(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            assert await store.add_report(report(()))
            assert not await store.add_report(report((), report_id="r2"))
            assert await store.add_report(report((), report_id="r3", policy_domain="other.example"))
            assert [r.report_id for r in await store.reports()] == ["r1", "r3"]
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
        finally:
            await store.close()

    asyncio.run(body())
