"""The state store, specified once and checked against every backend (real SQLite, PostgreSQL
and Redis servers): the MTA-STS policy cache (RFC 8461 §5) and the TLS-RPT session results
(RFC 8460 §4), durability, and the URL contract of `--store`."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mxguard.adapters.store import (
    CachedPolicy,
    SessionResult,
    Store,
    StoreError,
    default_store_url,
    open_store,
)
from mxguard.adapters.store.sqlite import SCHEMA_VERSION

pytest_plugins = ["servers"]

T = TypeVar("T")

T0 = datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
DAY = timedelta(days=1)
# Redis drops a key at expires_at, so cached policies in these tests expire far in the future;
# LONG_AGO is for policies that expired before the test ran.
FUTURE = datetime(2126, 5, 1, tzinfo=UTC)
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
# An RFC 8461 §3.2 body with CRLF and LF endings and a non-ASCII byte: kept exactly as given.
POLICY_TEXT = "version: STSv1\r\nmode: enforce\nmx: *.example.com\r\nmax_age: 86400\nnote: ü\n"


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    store = await open_store(url)
    try:
        yield store
    finally:
        await store.close()


def policy(domain: str = "example.com", policy_id: str = "20260501", **kw: Any) -> CachedPolicy:
    fields: dict[str, Any] = {
        "domain": domain,
        "policy_id": policy_id,
        "policy_text": POLICY_TEXT,
        "fetched_at": T0,
        "expires_at": FUTURE,
    }
    fields.update(kw)
    return CachedPolicy(**fields)


def result(at: datetime = T0, **kw: Any) -> SessionResult:
    fields: dict[str, Any] = {
        "id": None,
        "at": at,
        "policy_domain": "example.com",
        "policy_type": "sts",
        "policy_strings": ("version: STSv1", "mode: enforce", "mx: *.example.com"),
        "mx_patterns": ("*.example.com",),
        "result_type": "certificate-expired",
        "sending_ip": "192.0.2.1",
        "receiving_mx": "mx1.example.com",
        "receiving_ip": "198.51.100.7",
        "receiving_helo": "mx1.example.com",
        "detail": "certificate expired on 2026-04-30",
        "rua": ("mailto:tlsrpt@example.com", "https://report.example.com/v1"),
        "is_report": False,
        "reported": None,
    }
    fields.update(kw)
    return SessionResult(**fields)


def without_id(results: list[SessionResult]) -> list[SessionResult]:
    return [replace(r, id=None) for r in results]


# --- backends -------------------------------------------------------------------------------


def _url_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'state.db'}"
    if kind == "postgresql":
        return str(request.getfixturevalue("postgres_server").create_database())
    # A fresh key prefix gives each test an empty cache on the shared server.
    return str(request.getfixturevalue("redis_server").url(prefix=f"t{uuid.uuid4().hex}:"))


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def policy_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each backend that keeps the policy cache."""
    return _url_for(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def results_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each backend that keeps TLS-RPT session results."""
    return _url_for(request.param, request, tmp_path)


# --- the policy cache (RFC 8461 §5), every backend ------------------------------------------


class TestPolicyCache:
    def test_missing_domain_has_no_policy(self, policy_store_url: str) -> None:
        async def body() -> None:
            async with opened(policy_store_url) as store:
                assert await store.get_policy("example.com") is None
                assert await store.policies() == []

        run(body())

    def test_put_then_get_returns_the_policy_exactly(self, policy_store_url: str) -> None:
        async def body() -> None:
            async with opened(policy_store_url) as store:
                await store.put_policy(policy())
                got = await store.get_policy("example.com")
                assert got == policy()
                assert got is not None and got.fetched_at.tzinfo is UTC

        run(body())

    def test_times_in_other_zones_come_back_as_the_same_instant_in_utc(
        self, policy_store_url: str
    ) -> None:
        plus2 = timezone(timedelta(hours=2))

        async def body() -> None:
            async with opened(policy_store_url) as store:
                await store.put_policy(
                    policy(fetched_at=T0.astimezone(plus2), expires_at=FUTURE.astimezone(plus2))
                )
                got = await store.get_policy("example.com")
                assert got is not None
                assert (got.fetched_at, got.expires_at) == (T0, FUTURE)
                assert got.fetched_at.utcoffset() == timedelta(0)

        run(body())

    def test_put_replaces_the_policy_of_the_same_domain(self, policy_store_url: str) -> None:
        newer = policy(policy_id="20260502", policy_text="version: STSv1\nmode: testing\n")

        async def body() -> None:
            async with opened(policy_store_url) as store:
                await store.put_policy(policy())
                await store.put_policy(newer)
                assert await store.get_policy("example.com") == newer
                assert await store.policies() == [newer]

        run(body())

    def test_delete_forgets_the_policy_and_tolerates_a_missing_one(
        self, policy_store_url: str
    ) -> None:
        async def body() -> None:
            async with opened(policy_store_url) as store:
                await store.put_policy(policy())
                await store.put_policy(policy("example.org"))
                await store.delete_policy("example.com")
                await store.delete_policy("never-cached.example")
                assert await store.get_policy("example.com") is None
                assert await store.policies() == [policy("example.org")]

        run(body())

    def test_policies_lists_every_domain_in_order(self, policy_store_url: str) -> None:
        domains = ["b.example", "a.example", "xn--bcher-kva.example", "c.example"]

        async def body() -> None:
            async with opened(policy_store_url) as store:
                for d in domains:
                    await store.put_policy(policy(d))
                assert await store.policies() == [policy(d) for d in sorted(domains)]

        run(body())

    def test_writes_are_visible_to_a_second_store_and_after_reopening(
        self, policy_store_url: str
    ) -> None:
        async def body() -> None:
            async with opened(policy_store_url) as first:
                await first.put_policy(policy())
                async with opened(policy_store_url) as second:
                    assert await second.get_policy("example.com") == policy()
            async with opened(policy_store_url) as reopened:
                assert await reopened.get_policy("example.com") == policy()

        run(body())

    @pytest.mark.parametrize(
        ("rule", "domain"),
        [
            ("upper case is not the key form", "Example.com"),
            ("a trailing dot is not the key form", "example.com."),
            ("a U-label is not an A-label", "bücher.example"),
            ("an empty name is no domain", ""),
            ("white space is no domain", "example .com"),
        ],
    )
    def test_domain_not_in_key_form_is_refused(
        self, policy_store_url: str, rule: str, domain: str
    ) -> None:
        async def body() -> None:
            async with opened(policy_store_url) as store:
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: store.get_policy(domain),
                    lambda: store.put_policy(policy(domain)),
                    lambda: store.delete_policy(domain),
                ]
                for call in calls:
                    with pytest.raises(StoreError, match="lower-case A-label"):
                        await call()

        run(body())

    @pytest.mark.parametrize(
        ("field", "naive"),
        [
            ("fetched_at", policy(fetched_at=T0.replace(tzinfo=None))),
            ("expires_at", policy(expires_at=FUTURE.replace(tzinfo=None))),
        ],
    )
    def test_naive_datetime_is_refused(
        self, policy_store_url: str, field: str, naive: CachedPolicy
    ) -> None:
        async def body() -> None:
            async with opened(policy_store_url) as store:
                with pytest.raises(StoreError, match=f"{field} .* has no time zone"):
                    await store.put_policy(naive)
                assert await store.get_policy("example.com") is None

        run(body())


# --- expiry: the engine decides (RFC 8461 §5.1), except for Redis's TTL ---------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sql_stores_keep_expired_policies_for_the_engine_to_judge(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = _url_for(kind, request, tmp_path)
    expired = policy(fetched_at=LONG_AGO, expires_at=LONG_AGO + DAY)

    async def body() -> None:
        async with opened(url) as store:
            await store.put_policy(expired)
            assert await store.get_policy("example.com") == expired
            assert await store.policies() == [expired]

    run(body())


def test_redis_key_expires_exactly_at_expires_at(redis_server: Any) -> None:
    import redis.asyncio as aioredis

    prefix = f"t{uuid.uuid4().hex}:"
    expires = datetime.now(UTC).replace(microsecond=250000) + DAY
    cached = policy(fetched_at=expires - DAY, expires_at=expires)

    async def body() -> None:
        async with opened(redis_server.url(prefix=prefix)) as store:
            await store.put_policy(cached)
        client = aioredis.Redis.from_url(redis_server.url())
        try:
            expire_ms = await client.pexpiretime(f"{prefix}sts-policy:example.com")
        finally:
            await client.aclose()
        assert expire_ms == int(expires.timestamp() * 1000)

    run(body())


def test_redis_drops_a_policy_whose_expiry_has_passed(redis_server: Any) -> None:
    expired = policy(fetched_at=LONG_AGO, expires_at=LONG_AGO + DAY)

    async def body() -> None:
        async with opened(redis_server.url(prefix=f"t{uuid.uuid4().hex}:")) as store:
            await store.put_policy(policy("example.org"))
            await store.put_policy(expired)
            assert await store.get_policy("example.com") is None
            assert await store.policies() == [policy("example.org")]

    run(body())


def test_redis_prefixes_keep_caches_apart(redis_server: Any) -> None:
    a, b = (redis_server.url(prefix=f"{p}{uuid.uuid4().hex}*:") for p in "ab")

    async def body() -> None:
        async with opened(a) as store_a, opened(b) as store_b:
            await store_a.put_policy(policy())
            assert await store_b.get_policy("example.com") is None
            assert await store_b.policies() == []
            assert await store_a.policies() == [policy()]

    run(body())


# --- TLS-RPT session results (RFC 8460 §4), SQL backends ------------------------------------


class TestSessionResults:
    def test_added_results_come_back_with_ids_assigned(self, results_store_url: str) -> None:
        added = [
            result(),
            result(T0 + timedelta(seconds=1), result_type=None, detail=None, receiving_helo=None),
            result(
                T0 + timedelta(seconds=2),
                policy_type="no-policy-found",
                policy_strings=(),
                mx_patterns=(),
                rua=(),
                sending_ip=None,
                is_report=True,
            ),
        ]

        async def body() -> None:
            async with opened(results_store_url) as store:
                await store.add_results(added)
                got = await store.results_between(T0, T0 + DAY)
                assert without_id(got) == added
                ids = [r.id for r in got]
                assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)

        run(body())

    def test_results_are_ordered_by_time(self, results_store_url: str) -> None:
        times = [T0 + timedelta(minutes=m) for m in (30, 0, 45, 15)]

        async def body() -> None:
            async with opened(results_store_url) as store:
                await store.add_results([result(t) for t in times])
                got = await store.results_between(T0, T0 + DAY)
                assert [r.at for r in got] == sorted(times)

        run(body())

    @pytest.mark.parametrize(
        ("rule", "offset", "included"),
        [
            ("the start instant is inside", timedelta(0), True),
            ("just before the start is outside", -timedelta(microseconds=1), False),
            ("just before the end is inside", DAY - timedelta(microseconds=1), True),
            ("the end instant is outside", DAY, False),
        ],
    )
    def test_range_is_half_open(
        self, results_store_url: str, rule: str, offset: timedelta, included: bool
    ) -> None:
        # RFC 8460 §4.4 date-range: one UTC day, asked for as [00:00, next 00:00).
        day = T0.replace(hour=0, minute=0, second=0, microsecond=0)

        async def body() -> None:
            async with opened(results_store_url) as store:
                await store.add_results([result(day + offset)])
                got = await store.results_between(day, day + DAY)
                assert bool(got) is included, rule

        run(body())

    def test_reported_results_are_left_out_unless_asked_for(self, results_store_url: str) -> None:
        async def body() -> None:
            async with opened(results_store_url) as store:
                await store.add_results([result(T0 + timedelta(seconds=s)) for s in range(4)])
                first = await store.results_between(T0, T0 + DAY)
                done = [r.id for r in first[:2] if r.id is not None]
                await store.mark_reported(done, "report-2026-05-01@mxguard")
                pending = await store.results_between(T0, T0 + DAY)
                everything = await store.results_between(T0, T0 + DAY, unreported_only=False)
                assert [r.id for r in pending] == [r.id for r in first[2:]]
                assert [r.reported for r in everything] == [
                    "report-2026-05-01@mxguard" if r.id in done else None for r in first
                ]

        run(body())

    def test_results_survive_reopening(self, results_store_url: str) -> None:
        async def body() -> None:
            async with opened(results_store_url) as store:
                await store.add_results([result()])
            async with opened(results_store_url) as store:
                assert without_id(await store.results_between(T0, T0 + DAY)) == [result()]

        run(body())

    def test_adding_nothing_is_allowed(self, results_store_url: str) -> None:
        async def body() -> None:
            async with opened(results_store_url) as store:
                await store.add_results([])
                await store.mark_reported([], "r1")
                assert await store.results_between(T0, T0 + DAY) == []

        run(body())

    @pytest.mark.parametrize(
        ("rule", "bad", "message"),
        [
            ("the store assigns ids", result(id=7), "store assigns ids"),
            ("policy types are RFC 8460 §4.4's", result(policy_type="dane"), "policy type"),
            ("times carry a zone", result(T0.replace(tzinfo=None)), "has no time zone"),
            ("policy domains are in key form", result(policy_domain="EXAMPLE.com"), "A-label"),
        ],
    )
    def test_invalid_result_is_refused_and_nothing_is_added(
        self, results_store_url: str, rule: str, bad: SessionResult, message: str
    ) -> None:
        async def body() -> None:
            async with opened(results_store_url) as store:
                with pytest.raises(StoreError, match=message):
                    await store.add_results([result(), bad])
                got = await store.results_between(T0 - DAY, T0 + DAY, unreported_only=False)
                assert got == [], rule

        run(body())


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_calls_on_one_store_all_land(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = _url_for(kind, request, tmp_path)
    domains = [f"d{n}.example" for n in range(20)]

    async def body() -> None:
        async with opened(url) as store:
            async with asyncio.TaskGroup() as tg:
                for d in domains:
                    tg.create_task(store.put_policy(policy(d)))
                    tg.create_task(store.add_results([result(policy_domain=d)]))
                    tg.create_task(store.policies())
            assert [p.domain for p in await store.policies()] == sorted(domains)
            got = await store.results_between(T0, T0 + DAY)
            assert sorted(r.policy_domain for r in got) == sorted(domains)

    run(body())


def _terminate_other_sessions(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def test_postgres_reconnects_after_the_server_dropped_the_connection(
    postgres_server: Any,
) -> None:
    url = postgres_server.create_database()

    async def body() -> None:
        async with opened(url) as store:
            await store.put_policy(policy())
            # Reads and upserts give the same outcome when run twice: they are retried once.
            assert _terminate_other_sessions(url) == 1
            assert await store.get_policy("example.com") == policy()
            assert _terminate_other_sessions(url) == 1
            await store.put_policy(policy("example.org"))
            # An INSERT of results may have committed before the connection broke: the error
            # is reported rather than risking the same session counted twice in a report.
            assert _terminate_other_sessions(url) == 1
            with pytest.raises(StoreError, match="PostgreSQL store"):
                await store.add_results([result()])
            await store.add_results([result()])
            assert len(await store.results_between(T0, T0 + DAY)) == 1
            assert len(await store.policies()) == 2

    run(body())


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("add_results", lambda s: s.add_results([result()])),
        ("results_between", lambda s: s.results_between(T0, T0 + DAY)),
        ("mark_reported", lambda s: s.mark_reported([1], "r1")),
    ],
)
def test_redis_refuses_results_and_names_the_stores_that_keep_them(
    redis_server: Any, method: str, call: Callable[[Store], Awaitable[object]]
) -> None:
    async def body() -> None:
        async with opened(redis_server.url(prefix=f"t{uuid.uuid4().hex}:")) as store:
            with pytest.raises(StoreError, match="SQLite or PostgreSQL"):
                await call(store)

    run(body())


# --- SQLite specifics: durability, several processes, schema versions ------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from datetime import UTC, datetime, timedelta
    from mxguard.adapters.store import CachedPolicy, SessionResult, open_store

    async def main(url, n):
        at = datetime(2026, 5, 1, 12, tzinfo=UTC)
        store = await open_store(url)
        await store.put_policy(CachedPolicy(f"p{n}.example", "id1", "version: STSv1\\n", at,
                                            at + timedelta(days=1)))
        await store.add_results([SessionResult(None, at, f"p{n}.example", "sts", (), (), None,
                                 None, None, None, None, None, (), False, None)])
        print("written", flush=True)
        time.sleep(60)  # never closes: the parent kills us with SIGKILL

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_sqlite_write_survives_sigkill_right_after_it_returned(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'state.db'}"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, "1"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    async def body() -> None:
        async with opened(url) as store:
            assert [p.domain for p in await store.policies()] == ["p1.example"]
            got = await store.results_between(T0 - DAY, T0 + DAY)
            assert [r.policy_domain for r in got] == ["p1.example"]

    run(body())


def test_sqlite_file_is_shared_by_concurrent_processes(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'state.db'}"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(n)], stdout=subprocess.PIPE, text=True
        )
        for n in range(4)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "written"
    finally:
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)

    async def body() -> None:
        async with opened(url) as store:
            assert len(await store.policies()) == 4
            assert len(await store.results_between(T0 - DAY, T0 + DAY)) == 4

    run(body())


def test_sqlite_file_is_in_wal_mode_with_the_current_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    run(_open_and_close(f"sqlite://{path}"))  # opening creates and migrates
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


async def _open_and_close(url: str) -> None:
    async with opened(url):
        pass


def test_sqlite_file_from_a_newer_mxguard_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade mxguard"):
        run(open_store(f"sqlite://{path}"))


def test_sqlite_memory_store_works_and_starts_empty() -> None:
    async def body() -> None:
        async with opened("sqlite:///:memory:") as store:
            assert await store.policies() == []
            await store.put_policy(policy())
            assert await store.get_policy("example.com") == policy()
        async with opened("sqlite:///:memory:") as store:
            assert await store.policies() == []

    run(body())


# --- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "url", "message"),
    [
        ("a scheme is required", "/var/lib/mxguard/state.db", "has no scheme"),
        ("unknown schemes are named", "mysql://db.example/mxguard", "unknown scheme 'mysql'"),
        ("sqlite paths are absolute", "sqlite://state.db", "absolute file path"),
        ("sqlite needs a path", "sqlite:///", "absolute file path"),
        ("sqlite names a file, not a folder", "sqlite:///var/lib/", "absolute file path"),
    ],
)
def test_bad_url_is_refused_with_the_accepted_forms(rule: str, url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as info:
        run(open_store(url))
    assert "sqlite:///" in str(info.value), rule


@pytest.mark.parametrize(
    ("rule", "url"),
    [
        ("an unreachable PostgreSQL server", "postgresql://u:s3cret@127.205.0.1:1/mxguard"),
        ("an unreachable Redis server", "redis://:s3cret@127.205.0.2:1/0"),
        ("an invalid PostgreSQL URL", "postgresql://u:s3cret@127.205.0.1:notaport/x"),
    ],
)
def test_unusable_server_gives_store_error_without_the_password(rule: str, url: str) -> None:
    with pytest.raises(StoreError) as info:
        run(open_store(url))
    assert "s3cret" not in str(info.value), rule
    assert "127.205.0" in str(info.value), rule


def test_sqlite_url_to_an_unwritable_place_gives_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="SQLite store"):
        run(open_store(f"sqlite://{tmp_path}/missing-folder/state.db"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    yield tmp_path / "home"


@pytest.mark.parametrize(
    ("rule", "xdg_state_home", "expected"),
    [
        ("XDG_STATE_HOME is used when set", "{tmp}/state", "{tmp}/state/mxguard/state.db"),
        ("unset: ~/.local/state", None, "{tmp}/home/.local/state/mxguard/state.db"),
        ("a relative value is ignored", "rel/state", "{tmp}/home/.local/state/mxguard/state.db"),
    ],
)
def test_default_store_url_follows_xdg_and_creates_the_folder(
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    rule: str,
    xdg_state_home: str | None,
    expected: str,
) -> None:
    tmp = home.parent
    if xdg_state_home is not None:
        monkeypatch.setenv("XDG_STATE_HOME", xdg_state_home.format(tmp=tmp))
    url = default_store_url()
    assert url == "sqlite://" + expected.format(tmp=tmp), rule
    assert Path(expected.format(tmp=tmp)).parent.is_dir(), rule
