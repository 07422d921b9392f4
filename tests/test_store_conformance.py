"""The store's seven roles, specified once and run against every backend that keeps each role:
real SQLite files, a real PostgreSQL server and a real Redis server (tests/servers.py).

| role | interface | backends |
|---|---|---|
| MTA-STS policy cache (RFC 8461 §5) | `PolicyCache` | SQLite, PostgreSQL, Redis |
| TLS-RPT session log (RFC 8460 §4) | `SessionLog` | SQLite, PostgreSQL |
| report queue (RFC 8460 §5) | `ReportQueue` | SQLite, PostgreSQL |
| what the Postfix server served | `ServedLog` | SQLite, PostgreSQL |
| the history of `mxguard check`, bulk-run claims | `CheckLog` | SQLite, PostgreSQL |
| TLS reports received for domain owners (RFC 8460 §4, §5) | `ReportInbox` | SQLite, PostgreSQL |
| learned security levels, drops, the stripping alarm | `LearnedLevels` | SQLite, PostgreSQL |

A backend that lacks a role refuses each of its calls with a StoreError that says where the
role is kept. Every PostgreSQL database here is created with a language's collation (ICU
en-US), as production databases usually are, not byte order: a query that sorts text without
saying how then differs from SQLite and Redis, and a case shows it. What only one backend
does (Redis's key expiry, SQLite's file, PostgreSQL's reconnection, schema migrations) is in
test_store.py, test_store_reports.py and test_store_served.py.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mxguard.adapters.dkim import DkimResult
from mxguard.adapters.store import (
    CachedPolicy,
    CheckLog,
    CheckRecord,
    Closable,
    DayTotals,
    LearnedHost,
    LearnedLevels,
    LevelDrop,
    LevelSeen,
    OrganizationTotals,
    PendingReport,
    PolicyCache,
    ReceivedRecord,
    ReportInbox,
    ReportQueue,
    ReportSource,
    ReportTotals,
    ServedLog,
    ServedPolicy,
    SessionLog,
    SessionResult,
    Store,
    StoreError,
    StrippingAlarm,
    Tally,
    open_store,
)
from mxguard.adapters.store.cache_only import PolicyCacheOnly
from mxguard.adapters.store.postgres import PostgresStore
from mxguard.adapters.store.redis import RedisStore
from mxguard.adapters.store.sqlite import SQLiteStore
from mxguard.protocol.levels import SecurityLevel
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_ingest import ReceivedPolicy, ReceivedReport
from mxguard.protocol.tlsrpt_report import FailureDetail, PolicyType, ReportedPolicy

pytest_plugins = ["servers"]

T = TypeVar("T")

# --- backends and roles ----------------------------------------------------------------------

ROLES: dict[str, type[Any]] = {
    "policy cache": PolicyCache,
    "session log": SessionLog,
    "report queue": ReportQueue,
    "served log": ServedLog,
    "check log": CheckLog,
    "report inbox": ReportInbox,
    "learned levels": LearnedLevels,
}
KEEPS: dict[str, tuple[str, ...]] = {
    "sqlite": tuple(ROLES),
    "postgresql": tuple(ROLES),
    "redis": ("policy cache",),
}
# What a refused role's error must name.
REFUSED_WORDS = {
    "session log": "TLS-RPT session results",
    "report queue": "TLS-RPT reports awaiting delivery",
    "served log": "Postfix policy server served",
    "check log": "history of mxguard check",
    "report inbox": "TLS reports received for domain owners",
    "learned levels": "security levels learned per domain",
}

_databases = itertools.count(1)


def backends(role: str) -> list[str]:
    return [kind for kind, roles in KEEPS.items() if role in roles]


def fresh_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store of backend `kind`."""
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'state.db'}"
    if kind == "postgresql":
        return postgres_database(request.getfixturevalue("postgres_server"))
    # A fresh key prefix gives each test an empty cache on the shared server.
    return str(request.getfixturevalue("redis_server").url(prefix=f"t{uuid.uuid4().hex}:"))


def postgres_database(server: Any) -> str:
    """A new database on `server` whose default collation is ICU's en-US, where "a_b" sorts
    before "a-c" and "ra" before "rB" (byte order has them the other way round); a plain
    database when the server has no ICU."""
    import psycopg
    from psycopg import sql

    name = f"conformance_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server.url(), autocommit=True) as conn:
        try:
            conn.execute(
                sql.SQL(
                    "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' "
                    "LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
                ).format(sql.Identifier(name))
            )
        except psycopg.Error:  # before PostgreSQL 15, or built without ICU
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return str(server.url(name))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    store = await open_store(url)
    try:
        yield store
    finally:
        await store.close()


# --- values ----------------------------------------------------------------------------------

DAY = datetime(2026, 5, 1, tzinfo=UTC)  # the UTC day the results and reports are of
T0 = datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
NEXT_DAY = DAY + timedelta(days=1)
BUILT_AT = NEXT_DAY + timedelta(hours=1)
# Redis drops a key at expires_at, so cached policies here expire far in the future.
FUTURE = datetime(2126, 5, 1, tzinfo=UTC)
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
# An RFC 8461 §3.2 body with CRLF and LF endings and a non-ASCII letter: kept exactly as given.
POLICY_TEXT = "version: STSv1\r\nmode: enforce\nmx: *.example.com\r\nmax_age: 86400\nnote: ü\n"


def policy(domain: str = "example.com", **kw: Any) -> CachedPolicy:
    base = CachedPolicy(domain, "20260501", POLICY_TEXT, T0, FUTURE)
    return replace(base, **kw)


def _with_policy(base: ReportedPolicy, kw: dict[str, Any]) -> ReportedPolicy:
    """`base` with the policy fields among `kw` (taken out of it): the flat names the store
    keeps them under."""
    fields = ("policy_type", "policy_strings", "mx_patterns", "rua")
    return replace(base, **{k: kw.pop(k) for k in fields if k in kw})


def result(at: datetime = T0, **kw: Any) -> SessionResult:
    sts = ReportedPolicy(
        PolicyType.STS, ("version: STSv1", "mode: enforce", "mx: *.example.com"),
        ("*.example.com",), ("mailto:tlsrpt@example.com", "https://report.example.com/v1"),
    )  # fmt: skip
    base = SessionResult(
        id=None, at=at, policy_domain="example.com", policy=_with_policy(sts, kw),
        result_type=ResultType.CERTIFICATE_EXPIRED, sending_ip="192.0.2.1",
        receiving_mx="mx1.example.com", receiving_ip="198.51.100.7",
        receiving_helo="mx1.example.com", detail="certificate expired on 2026-04-30",
        is_report=False, reported=None,
    )  # fmt: skip
    return replace(base, **kw)


def report(ids: tuple[int, ...], **kw: Any) -> PendingReport:
    base = PendingReport(
        report_id="r1", policy_domain="example.com", start=DAY,
        filename="s!example.com!1!2!u.json.gz", body=b"\x1f\x8b gzip bytes \x00\xff",
        rua=("mailto:t@example.com", "https://r.example/x"), result_ids=ids,
        created_at=BUILT_AT, next_attempt_at=BUILT_AT + timedelta(minutes=5),
    )  # fmt: skip
    return replace(base, **kw)


def served(at: datetime, **kw: Any) -> ServedPolicy:
    sts = ReportedPolicy(
        PolicyType.STS,
        ("version: STSv1", "mode: enforce", "mx: *.example.com", "max_age: 86400"),
        ("*.example.com",), ("mailto:tlsrpt@example.com",),
    )  # fmt: skip
    base = ServedPolicy(
        domain="example.com", at=at, policy=_with_policy(sts, kw),
        mx_hosts=("mx1.example.com", "mx2.example.com"), mx_addresses=("192.0.2.1", "2001:db8::1"),
        answer="OK secure match=mx1.example.com:mx2.example.com servername=hostname",
    )  # fmt: skip
    return replace(base, **kw)


def without_id(results: list[SessionResult]) -> list[SessionResult]:
    return [replace(r, id=None) for r in results]


async def ids_of(store: Store, start: datetime = DAY, end: datetime = NEXT_DAY) -> list[int]:
    return [r.id for r in await store.results_between(start, end) if r.id is not None]


# Text no backend could give back unchanged: PostgreSQL's text holds no NUL, and a lone
# surrogate (left by errors="surrogateescape") has no UTF-8 form.
NUL = "mx1.example.com\x00evil"
SURROGATE = "certificate for \udcff"

# --- the interfaces --------------------------------------------------------------------------


def _methods(protocol: type[Any]) -> set[str]:
    return {n for n, v in vars(protocol).items() if inspect.iscoroutinefunction(v)}


def _signature(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    # Names, kinds and defaults: annotations are strings and may be spelled differently.
    params = inspect.signature(function).parameters.values()
    return [(p.name, p.kind, p.default) for p in params]


def test_store_is_the_seven_roles_and_each_method_belongs_to_one_role() -> None:
    owned = [_methods(protocol) for protocol in ROLES.values()]
    assert [len(m) for m in owned] == [4, 4, 6, 3, 4, 4, 9]
    assert len(set().union(*owned)) == 34  # no method in two roles
    assert all(Closable in protocol.__mro__ for protocol in ROLES.values())
    every = {n for n in dir(Store) if inspect.iscoroutinefunction(getattr(Store, n))}
    assert every == set().union(*owned, _methods(Closable)) and len(every) == 35


@pytest.mark.parametrize(
    ("backend", "roles"),
    [
        (SQLiteStore, tuple(ROLES)),
        (PostgresStore, tuple(ROLES)),
        (RedisStore, ("policy cache",)),
        (PolicyCacheOnly, tuple(ROLES)),  # what open_store gives for Redis
    ],
)
def test_each_backend_has_the_methods_of_its_roles_with_the_same_parameters_and_defaults(
    backend: type[Any], roles: tuple[str, ...]
) -> None:
    for role in roles:
        for name in _methods(ROLES[role]) | {"close"}:
            want = _signature(getattr(ROLES[role], name))
            assert _signature(getattr(backend, name)) == want, f"{backend.__name__}.{name}"
    if backend is RedisStore:
        assert not hasattr(backend, "add_results")


@pytest.mark.parametrize(
    ("kind", "role"),
    [(kind, role) for kind in KEEPS for role in ROLES if role not in KEEPS[kind]],
)
def test_a_backend_without_a_role_refuses_each_of_its_calls_and_names_where_it_is_kept(
    kind: str, role: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = fresh_url(kind, request, tmp_path)
    calls: dict[str, list[Callable[[Store], Awaitable[object]]]] = {
        "session log": [
            lambda s: s.add_results([result()]),
            lambda s: s.results_between(DAY, NEXT_DAY),
            lambda s: s.oldest_unbuilt(DAY, NEXT_DAY),
            lambda s: s.mark_reported([1], "r1"),
        ],
        "report queue": [
            lambda s: s.add_report(report(())),
            lambda s: s.claim_report("r1", now=T0, until=T0),
            lambda s: s.reports(),
            lambda s: s.report_failed("r1", "refused", T0),
            lambda s: s.report_dropped("r1", "refused", T0),
            lambda s: s.report_delivered("r1", "mailto:t@example.com", T0),
        ],
        "served log": [
            lambda s: s.add_served([served(T0)]),
            lambda s: s.served_at("example.com", T0),
            lambda s: s.prune_served(T0),
        ],
        "check log": [
            lambda s: s.add_check(check()),
            lambda s: s.last_check("example.com"),
            lambda s: s.claim_check("run-1", "example.com", "node-a", T0, LEASE),
            lambda s: s.run_progress("run-1"),
        ],
        "report inbox": [
            lambda s: s.add_received(received()),
            lambda s: s.received_between("example.com", DAY, NEXT_DAY),
            lambda s: s.report_totals("example.com", DAY, NEXT_DAY),
            lambda s: s.received_domains(DAY, NEXT_DAY),
        ],
        "learned levels": [
            lambda s: s.learn([seen()], stale_before=LONG_AGO),
            lambda s: s.learned_hosts(),
            lambda s: s.forget_learned("example.com"),
            lambda s: s.add_drops([drop()]),
            lambda s: s.drops_since(LONG_AGO),
            lambda s: s.raise_alarm(alarm()),
            lambda s: s.latest_alarm(),
            lambda s: s.extend_alarm(["example.com"], []),
            lambda s: s.clear_alarm(T0),
        ],
    }
    assert len(calls[role]) == len(_methods(ROLES[role]))

    async def body() -> None:
        async with opened(url) as store:
            for call in calls[role]:
                with pytest.raises(StoreError) as info:
                    await call(store)
                message = str(info.value)
                assert REFUSED_WORDS[role] in message
                assert "policy cache only" in message
                assert "SQLite or PostgreSQL" in message
                assert url.split("?")[0] in message  # which store
            await store.put_policy(policy())  # the role it keeps still works
            assert await store.get_policy("example.com") == policy()

    run(body())


# --- the MTA-STS policy cache (RFC 8461 §5) -------------------------------------------------


class TestPolicyCache:
    @pytest.fixture(params=backends("policy cache"))
    def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return fresh_url(request.param, request, tmp_path)

    def test_policy_cache_has_nothing_for_a_domain_never_cached(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                assert await store.get_policy("example.com") is None
                assert await store.policies() == []

        run(body())

    def test_policy_cache_gives_back_exactly_what_was_put(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.put_policy(policy())
                got = await store.get_policy("example.com")
                assert got == policy()
                assert got is not None and got.fetched_at.tzinfo is UTC

        run(body())

    def test_policy_cache_gives_times_back_as_the_same_instant_in_utc(self, url: str) -> None:
        plus2 = timezone(timedelta(hours=2))

        async def body() -> None:
            async with opened(url) as store:
                await store.put_policy(
                    policy(fetched_at=T0.astimezone(plus2), expires_at=FUTURE.astimezone(plus2))
                )
                got = await store.get_policy("example.com")
                assert got is not None
                assert (got.fetched_at, got.expires_at) == (T0, FUTURE)
                assert got.fetched_at.utcoffset() == timedelta(0)

        run(body())

    @pytest.mark.parametrize(
        "fetched_at",
        [
            datetime(1, 1, 1, tzinfo=UTC),
            datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
        ],
    )
    def test_policy_cache_keeps_any_time_a_utc_datetime_can_hold(
        self, url: str, fetched_at: datetime
    ) -> None:
        last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

        async def body() -> None:
            async with opened(url) as store:
                await store.put_policy(policy(fetched_at=fetched_at, expires_at=last))
                assert await store.get_policy("example.com") == policy(
                    fetched_at=fetched_at, expires_at=last
                )

        run(body())

    def test_policy_cache_keeps_the_newest_policy_per_domain(self, url: str) -> None:
        newer = policy(policy_id="20260502", policy_text="version: STSv1\nmode: testing\n")

        async def body() -> None:
            async with opened(url) as store:
                await store.put_policy(policy())
                await store.put_policy(policy("example.org"))
                await store.put_policy(newer)
                assert await store.get_policy("example.com") == newer
                assert await store.policies() == [newer, policy("example.org")]

        run(body())

    def test_policy_cache_forgets_a_deleted_policy_and_tolerates_a_missing_one(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.put_policy(policy())
                await store.put_policy(policy("example.org"))
                await store.delete_policy("example.com")
                await store.delete_policy("never-cached.example")
                assert await store.get_policy("example.com") is None
                assert await store.policies() == [policy("example.org")]

        run(body())

    def test_policy_cache_lists_every_domain_in_code_point_order(self, url: str) -> None:
        # A collation other than byte order would put a_b before a-c, and a-c after ab.
        domains = ["b.example", "a.example", "xn--bcher-kva.example", "a-c.example",
                   "ab.example", "a_b.example", "a1b.example", "c.example"]  # fmt: skip

        async def body() -> None:
            async with opened(url) as store:
                for d in domains:
                    await store.put_policy(policy(d))
                assert await store.policies() == [policy(d) for d in sorted(domains)]

        run(body())

    def test_policy_cache_is_shared_by_two_stores_and_survives_reopening(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as first:
                await first.put_policy(policy())
                async with opened(url) as second:
                    assert await second.get_policy("example.com") == policy()
                    await second.delete_policy("example.com")
                    await second.put_policy(policy("example.org"))
                assert await first.get_policy("example.com") is None
            async with opened(url) as reopened:
                assert await reopened.policies() == [policy("example.org")]

        run(body())

    def test_policy_cache_takes_concurrent_calls_on_one_store(self, url: str) -> None:
        domains = [f"d{n}.example" for n in range(20)]

        async def body() -> None:
            async with opened(url) as store:
                async with asyncio.TaskGroup() as tg:
                    for d in domains:
                        tg.create_task(store.put_policy(policy(d)))
                        tg.create_task(store.policies())
                        tg.create_task(store.get_policy(d))
                assert [p.domain for p in await store.policies()] == sorted(domains)

        run(body())

    def test_policy_cache_leaves_expiry_to_the_engine_unless_the_backend_expires_keys(
        self, url: str
    ) -> None:
        # RFC 8461 §5.1: what an expired policy means is the engine's decision. Redis alone
        # drops the key at expires_at (test_store.py checks the exact moment).
        expired = policy(fetched_at=LONG_AGO, expires_at=LONG_AGO + timedelta(days=1))
        expires_keys = url.startswith("redis")

        async def body() -> None:
            async with opened(url) as store:
                await store.put_policy(expired)
                await store.put_policy(policy("example.org"))
                got = await store.get_policy("example.com")
                assert got == (None if expires_keys else expired)
                assert await store.policies() == [
                    *([] if expires_keys else [expired]),
                    policy("example.org"),
                ]

        run(body())

    @pytest.mark.parametrize(
        ("rule", "domain"),
        [
            ("upper case is not the key form", "Example.com"),
            ("a trailing dot is not the key form", "example.com."),
            ("a U-label is not an A-label", "bücher.example"),
            ("an empty name is no domain", ""),
            ("white space is no domain", "example .com"),
            ("a control character is no domain", "example\x00.com"),
        ],
    )
    def test_policy_cache_refuses_a_domain_not_in_key_form(
        self, url: str, rule: str, domain: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: store.get_policy(domain),
                    lambda: store.put_policy(policy(domain)),
                    lambda: store.delete_policy(domain),
                ]
                for call in calls:
                    with pytest.raises(StoreError, match="lower-case A-label"):
                        await call()
                assert await store.policies() == [], rule

        run(body())

    @pytest.mark.parametrize(
        ("rule", "bad", "message"),
        [
            ("fetched_at needs a zone", policy(fetched_at=T0.replace(tzinfo=None)),
             "fetched_at .* has no time zone"),
            ("expires_at needs a zone", policy(expires_at=FUTURE.replace(tzinfo=None)),
             "expires_at .* has no time zone"),
            ("a time must be one in UTC too",
             policy(expires_at=datetime(9999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=5)))),
             "outside the years 1 to 9999"),
            ("the TXT id is needed", policy(policy_id=""), "empty policy_id"),
            ("no NUL in the text", policy(policy_text="version: STSv1\n\x00"), "NUL character"),
            ("no NUL in the id", policy(policy_id="2026\x00"), "NUL character"),
            ("no lone surrogate", policy(policy_text=SURROGATE), "lone surrogate"),
        ],
    )  # fmt: skip
    def test_policy_cache_refuses_a_policy_it_could_not_give_back_unchanged(
        self, url: str, rule: str, bad: CachedPolicy, message: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                with pytest.raises(StoreError, match=message):
                    await store.put_policy(bad)
                assert await store.get_policy("example.com") is None, rule

        run(body())

    def test_a_closed_store_refuses_further_use_and_may_be_closed_again(self, url: str) -> None:
        async def body() -> None:
            store = await open_store(url)
            await store.put_policy(policy())
            await store.close()
            with pytest.raises(StoreError, match="closed"):
                await store.get_policy("example.com")
            with pytest.raises(StoreError, match="closed"):
                await store.put_policy(policy("example.org"))
            await store.close()
            async with opened(url) as reopened:
                assert await reopened.policies() == [policy()]

        run(body())


# --- the TLS-RPT session log (RFC 8460 §4) --------------------------------------------------


class TestSessionLog:
    @pytest.fixture(params=backends("session log"))
    def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return fresh_url(request.param, request, tmp_path)

    def test_session_log_gives_results_back_with_ids_assigned(self, url: str) -> None:
        added = [
            result(),
            result(T0 + timedelta(seconds=1), result_type=None, detail=None, receiving_helo=None),
            result(T0 + timedelta(seconds=2), policy_type=PolicyType.NO_POLICY_FOUND,
                   policy_strings=(), mx_patterns=(), rua=(), sending_ip=None, is_report=True,
                   detail="ünïcode and a ' quote"),
            # A result type registered after this mxguard (RFC 8460 made them an IANA registry),
            # as a newer one wrote it.
            result(T0 + timedelta(seconds=3), result_type=None, other_result_type="x-new-type"),
        ]  # fmt: skip

        async def body() -> None:
            async with opened(url) as store:
                await store.add_results(added)
                got = await store.results_between(DAY, NEXT_DAY)
                assert without_id(got) == added
                ids = [r.id for r in got]
                assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
                assert all(r.at.tzinfo is UTC for r in got)

        run(body())

    def test_session_log_orders_results_by_time_in_any_year(self, url: str) -> None:
        times = [T0 + timedelta(minutes=30), T0, datetime(999, 5, 1, tzinfo=UTC),
                 T0 + timedelta(minutes=15), datetime(1, 1, 1, tzinfo=UTC)]  # fmt: skip
        first = datetime(1, 1, 1, tzinfo=UTC)

        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(t) for t in times])
                got = await store.results_between(first, NEXT_DAY)
                assert [r.at for r in got] == sorted(times)
                later = await store.results_between(datetime(1000, 1, 1, tzinfo=UTC), NEXT_DAY)
                assert [r.at for r in later] == sorted(times)[2:]

        run(body())

    def test_session_log_orders_results_of_one_moment_as_they_were_added(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(detail=str(n)) for n in range(5)])
                await store.add_results([result(detail="5")])
                got = await store.results_between(DAY, NEXT_DAY)
                assert [r.detail for r in got] == [str(n) for n in range(6)]
                assert [r.id for r in got] == sorted(r.id for r in got if r.id is not None)

        run(body())

    @pytest.mark.parametrize(
        ("rule", "offset", "included"),
        [
            ("the start instant is inside", timedelta(0), True),
            ("just before the start is outside", -timedelta(microseconds=1), False),
            ("just before the end is inside", timedelta(days=1, microseconds=-1), True),
            ("the end instant is outside", timedelta(days=1), False),
        ],
    )
    def test_session_log_range_is_half_open(
        self, url: str, rule: str, offset: timedelta, included: bool
    ) -> None:
        # RFC 8460 §4.4 date-range: one UTC day, asked for as [00:00, next 00:00).
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(DAY + offset)])
                got = await store.results_between(DAY, NEXT_DAY)
                assert bool(got) is included, rule

        run(body())

    def test_session_log_leaves_out_reported_results_unless_asked_for(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(T0 + timedelta(seconds=s)) for s in range(4)])
                first = await store.results_between(DAY, NEXT_DAY)
                done = [r.id for r in first[:2] if r.id is not None]
                await store.mark_reported(done, "report-2026-05-01@mxguard")
                pending = await store.results_between(DAY, NEXT_DAY)
                everything = await store.results_between(DAY, NEXT_DAY, unreported_only=False)
                assert [r.id for r in pending] == [r.id for r in first[2:]]
                assert [r.reported for r in everything] == [
                    "report-2026-05-01@mxguard" if r.id in done else None for r in first
                ]
                # A reported result counts as built: no report takes it again.
                unbuilt = await store.results_between(DAY, NEXT_DAY, unbuilt_only=True)
                assert [r.id for r in unbuilt] == [r.id for r in first[2:]]

        run(body())

    def test_session_log_is_shared_by_two_stores_and_survives_reopening(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as first, opened(url) as second:
                await first.add_results([result()])
                await second.add_results([result(T0 + timedelta(seconds=1))])
                assert len(await first.results_between(DAY, NEXT_DAY)) == 2
            async with opened(url) as store:
                got = without_id(await store.results_between(DAY, NEXT_DAY))
                assert got == [result(), result(T0 + timedelta(seconds=1))]

        run(body())

    def test_session_log_accepts_nothing_to_add_or_mark(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([])
                await store.mark_reported([], "r1")
                assert await store.results_between(DAY, NEXT_DAY) == []

        run(body())

    def test_session_log_takes_concurrent_batches_on_one_store(self, url: str) -> None:
        domains = [f"d{n}.example" for n in range(20)]

        async def body() -> None:
            async with opened(url) as store:
                async with asyncio.TaskGroup() as tg:
                    for d in domains:
                        tg.create_task(store.add_results([result(policy_domain=d)] * 2))
                        tg.create_task(store.results_between(DAY, NEXT_DAY))
                got = await store.results_between(DAY, NEXT_DAY)
                assert sorted(r.policy_domain for r in got) == sorted(domains * 2)

        run(body())

    @pytest.mark.parametrize(
        ("rule", "bad", "message"),
        [
            ("the store assigns ids", result(id=7), "store assigns ids"),
            ("policy types are RFC 8460 §4.4's", result(policy_type="dane"), "policy type"),
            ("result types are RFC 8460 §4.3's", result(result_type="dane-failed"), "§4.3"),
            (
                "a known type is a result_type",
                result(result_type=None, other_result_type="tlsa-invalid"),
                "pass a known",
            ),
            ("one result type, not two", result(other_result_type="x-new-type"), "without result"),
            ("times carry a zone", result(T0.replace(tzinfo=None)), "has no time zone"),
            ("policy domains are in key form", result(policy_domain="EXAMPLE.com"), "A-label"),
            ("no NUL in a HELO name", result(receiving_helo=NUL), "receiving_helo .* NUL"),
            ("no NUL in a rua", result(rua=("mailto:a@example.com", NUL)), "rua .* NUL"),
            ("no lone surrogate in the detail", result(detail=SURROGATE), "detail .* surrogate"),
        ],
    )
    def test_session_log_refuses_a_batch_with_a_result_it_could_not_give_back_unchanged(
        self, url: str, rule: str, bad: SessionResult, message: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                with pytest.raises(StoreError, match=message):
                    await store.add_results([result(), bad])
                got = await store.results_between(DAY, NEXT_DAY, unreported_only=False)
                assert got == [], rule

        run(body())

    def test_oldest_unbuilt_counts_only_results_a_report_could_take(self, url: str) -> None:
        h = DAY + timedelta(hours=1)

        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([
                    result(h, is_report=True),  # RFC 8460 §5.3: never reported
                    result(h + timedelta(hours=1), rua=()),  # no rua: nowhere to send
                    result(h + timedelta(hours=2)),  # built below
                    result(h + timedelta(hours=3)),
                ])  # fmt: skip
                assert await store.oldest_unbuilt(DAY, NEXT_DAY) == h + timedelta(hours=2)
                built = (await ids_of(store))[2]
                assert await store.add_report(report((built,)))
                assert await store.oldest_unbuilt(DAY, NEXT_DAY) == h + timedelta(hours=3)
                assert await store.oldest_unbuilt(DAY, h + timedelta(hours=3)) is None

        run(body())


# --- the report queue (RFC 8460 §5) ---------------------------------------------------------


class TestReportQueue:
    @pytest.fixture(params=backends("report queue"))
    def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return fresh_url(request.param, request, tmp_path)

    def test_a_stored_report_comes_back_exactly_and_survives_reopening(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result()])
                ids = tuple(await ids_of(store))
                assert await store.add_report(report(ids))
            async with opened(url) as store:
                assert await store.reports() == [report(ids)]
                assert await store.reports(start=DAY, pending_only=True) == [report(ids)]
                assert await store.reports(start=NEXT_DAY) == []

        run(body())

    def test_add_report_is_idempotent_per_report_id(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(), result()])
                ids = tuple(await ids_of(store))
                assert await store.add_report(report(ids))
                assert await store.add_report(report(ids))  # a retry: still stored, once
                assert await store.add_report(report((), report_id="r2"))
                assert await store.add_report(report((), report_id="r2"))
                assert [r.report_id for r in await store.reports()] == ["r1", "r2"]
                # The delivery state moved on; adding the same build again changes nothing.
                await store.report_failed("r1", "connection refused", BUILT_AT)
                assert await store.add_report(report(ids))
                [r1, _] = await store.reports()
                assert (r1.attempts, r1.next_attempt_at) == (1, BUILT_AT)
                assert await store.results_between(DAY, NEXT_DAY, unbuilt_only=True) == []

        run(body())

    @pytest.mark.parametrize(
        ("rule", "change"),
        [
            ("other results", {"result_ids": ()}),
            ("another body", {"body": b"other"}),
            ("another domain", {"policy_domain": "example.org"}),
        ],
    )
    def test_add_report_refuses_another_report_under_a_stored_report_id(
        self, url: str, rule: str, change: dict[str, Any]
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result()])
                ids = tuple(await ids_of(store))
                assert await store.add_report(report(ids))
                with pytest.raises(StoreError, match="another report with report-id 'r1'"):
                    await store.add_report(replace(report(ids), **change))
                assert await store.reports() == [report(ids)], rule

        run(body())

    def test_add_report_refuses_a_report_that_lists_a_result_twice(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(), result()])
                a, b = await ids_of(store)
                with pytest.raises(StoreError, match=f"lists session result {a} more than once"):
                    await store.add_report(report((a, b, a)))
                assert await store.reports() == []
                assert len(await store.results_between(DAY, NEXT_DAY, unbuilt_only=True)) == 2

        run(body())

    def test_add_report_refuses_results_the_store_does_not_have(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result()])
                [a] = await ids_of(store)
                assert not await store.add_report(report((a, a + 1000)))
                assert await store.reports() == []
                assert len(await store.results_between(DAY, NEXT_DAY, unbuilt_only=True)) == 1

        run(body())

    def test_a_result_goes_into_one_report_only_and_late_results_into_a_further_one(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(), result()])
                a, b = await ids_of(store)
                assert await store.add_report(report((a, b)))
                # A result recorded late, after the day was built:
                await store.add_results([result(DAY + timedelta(hours=23, minutes=59))])
                [late] = await store.results_between(DAY, NEXT_DAY, unbuilt_only=True)
                assert late.id is not None
                # A report over a result another report has is refused as a whole ...
                assert not await store.add_report(report((b, late.id), report_id="r2"))
                unbuilt = await store.results_between(DAY, NEXT_DAY, unbuilt_only=True)
                assert [r.id for r in unbuilt] == [late.id]
                # ... and a further report for the same domain and day takes the late one.
                assert await store.add_report(report((late.id,), report_id="r3"))
                assert [r.report_id for r in await store.reports(start=DAY)] == ["r1", "r3"]
                assert await store.results_between(DAY, NEXT_DAY, unbuilt_only=True) == []

        run(body())

    def test_of_reporters_building_the_same_results_at_once_one_stores_its_report(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as first:
                await first.add_results([result() for _ in range(5)])
                ids = tuple(await ids_of(first))
            stores = [await open_store(url) for _ in range(4)]
            try:
                stored = await asyncio.gather(
                    *(s.add_report(report(ids, report_id=f"r{n}")) for n, s in enumerate(stores))
                )
                assert stored.count(True) == 1
                [kept] = await stores[0].reports()
                assert kept.report_id == f"r{stored.index(True)}"
            finally:
                for s in stores:
                    await s.close()

        run(body())

    def test_a_claim_holds_the_report_until_its_lease_ends(self, url: str) -> None:
        due = BUILT_AT + timedelta(minutes=5)
        lease = due + timedelta(minutes=30)

        async def body() -> None:
            async with opened(url) as store:
                await store.add_report(report(()))
                early = due - timedelta(seconds=1)
                assert await store.claim_report("r1", now=early, until=lease) is None
                claimed = await store.claim_report("r1", now=due, until=lease)
                assert claimed is not None and claimed.next_attempt_at == lease
                assert claimed == replace(report(()), next_attempt_at=lease)
                assert await store.claim_report("r1", now=due, until=lease) is None
                later = lease + timedelta(days=1)
                assert await store.claim_report("r1", now=lease, until=later) is not None
                forced = await store.claim_report("r1", now=T0, until=T0, force=True)
                assert forced is not None
                await store.report_delivered("r1", "mailto:t@example.com", T0)
                assert await store.claim_report("r1", now=T0, until=T0, force=True) is None
                assert await store.claim_report("missing", now=T0, until=T0, force=True) is None

        run(body())

    def test_claim_gives_a_report_to_one_node(self, url: str) -> None:
        async def body() -> None:
            stores = [await open_store(url) for _ in range(4)]
            try:
                await stores[0].add_report(report(()))
                now, lease = BUILT_AT + timedelta(hours=1), BUILT_AT + timedelta(hours=2)
                claims = await asyncio.gather(
                    *(s.claim_report("r1", now=now, until=lease) for s in stores for _ in range(3))
                )
                assert sum(c is not None for c in claims) == 1
            finally:
                for s in stores:
                    await s.close()

        run(body())

    def test_reports_are_listed_by_next_attempt_then_report_id_in_code_point_order(
        self, url: str
    ) -> None:
        # A collation other than byte order would put "r_a" first and "rB" last.
        at = BUILT_AT + timedelta(minutes=5)
        order = [("ra", at), ("rB", at), ("r_a", at), ("r-b", at), ("z", at - timedelta(1))]

        async def body() -> None:
            async with opened(url) as store:
                for report_id, next_at in order:
                    await store.add_report(report((), report_id=report_id, next_attempt_at=next_at))
                got = [r.report_id for r in await store.reports()]
                assert got == ["z", *sorted(["ra", "rB", "r_a", "r-b"])]

        run(body())

    def test_a_dropped_report_is_no_longer_pending_and_its_results_stay_unreported(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result()])
                await store.add_report(report(tuple(await ids_of(store))))
                await store.report_dropped("r1", "550 no such user", BUILT_AT)
                assert await store.reports(pending_only=True) == []
                [p] = await store.reports()
                assert (p.dropped_at, p.last_error, p.attempts) == (BUILT_AT, "550 no such user", 1)
                assert await store.claim_report("r1", now=T0, until=T0, force=True) is None
                assert len(await store.results_between(DAY, NEXT_DAY)) == 1
                assert await store.results_between(DAY, NEXT_DAY, unbuilt_only=True) == []

        run(body())

    def test_a_failed_attempt_keeps_the_report_and_its_results_and_reschedules_it(
        self, url: str
    ) -> None:
        later = BUILT_AT + timedelta(hours=1)

        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(), result()])
                await store.add_report(report(tuple(await ids_of(store))))
                await store.report_failed("r1", "connection refused", later)
                await store.report_failed("r1", "timed out", later + timedelta(hours=1))
                [p] = await store.reports(pending_only=True)
                assert (p.attempts, p.last_error) == (2, "timed out")
                assert p.next_attempt_at == later + timedelta(hours=1)
                assert len(await store.results_between(DAY, NEXT_DAY)) == 2
                await store.report_failed("missing", "no such report", later)  # no error

        run(body())

    def test_delivery_marks_the_report_and_exactly_its_results_reported(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_results([result(), result(), result(policy_domain="other.example")])
                rs = await store.results_between(DAY, NEXT_DAY)
                ids = tuple(r.id for r in rs if r.policy_domain == "example.com" and r.id)
                await store.add_report(report(ids))
                await store.report_failed("r1", "connection refused", BUILT_AT)
                await store.report_delivered("r1", "mailto:t@example.com", BUILT_AT)
                assert await store.reports(pending_only=True) == []
                [done] = await store.reports()
                assert (done.delivered_to, done.delivered_at) == ("mailto:t@example.com", BUILT_AT)
                assert (done.attempts, done.last_error) == (2, None)
                left = await store.results_between(DAY, NEXT_DAY)
                assert [r.policy_domain for r in left] == ["other.example"]
                every = await store.results_between(DAY, NEXT_DAY, unreported_only=False)
                assert sorted(str(r.reported) for r in every) == ["None", "r1", "r1"]
                with pytest.raises(StoreError, match="no report"):
                    await store.report_delivered("missing", "mailto:x@example.com", BUILT_AT)

        run(body())

    def test_report_queue_refuses_text_it_could_not_give_back_unchanged(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_report(report(()))
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: store.add_report(report((), report_id="r\x002")),
                    lambda: store.add_report(report((), report_id="r2", filename=SURROGATE)),
                    lambda: store.report_failed("r1", f"550 {NUL}", BUILT_AT),
                    lambda: store.report_dropped("r1", f"550 {SURROGATE}", BUILT_AT),
                    lambda: store.report_delivered("r1", f"mailto:{NUL}", BUILT_AT),
                    lambda: store.claim_report("r\x001", now=T0, until=T0, force=True),
                ]
                for call in calls:
                    with pytest.raises(StoreError, match=r"NUL character|lone surrogate"):
                        await call()
                assert await store.reports() == [report(())]

        run(body())

    @pytest.mark.parametrize(
        ("rule", "bad", "message"),
        [
            ("a report-id is needed", report((), report_id=""), "report_id is empty"),
            ("times carry a zone", report((), start=DAY.replace(tzinfo=None)), "no time zone"),
            ("domains are in key form", report((), policy_domain="Example.com"), "A-label"),
        ],
    )
    def test_add_report_refuses_an_invalid_report(
        self, url: str, rule: str, bad: PendingReport, message: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                with pytest.raises(StoreError, match=message):
                    await store.add_report(bad)
                assert await store.reports() == [], rule

        run(body())


# --- what the Postfix policy server served --------------------------------------------------

A = served(T0)
B = served(T0 + timedelta(minutes=20), rua=("mailto:new@example.com",), mx_addresses=("192.0.2.9",))
OTHER = served(
    T0 - timedelta(days=1), domain="dane.example", policy_type=PolicyType.TLSA,
    policy_strings=("3 1 1 " + "ab" * 32,), mx_patterns=(), answer="OK dane-only",
)  # fmt: skip

# (domain, asked at) -> the record in force, or None
IN_FORCE: list[tuple[str, datetime, ServedPolicy | None]] = [
    ("example.com", T0 - timedelta(microseconds=1), None),  # before the first record
    ("example.com", T0, A),  # from its own moment on
    ("example.com", T0 + timedelta(minutes=10), A),
    ("example.com", B.at - timedelta(microseconds=1), A),
    ("example.com", B.at, B),  # the later record replaces it
    ("example.com", T0 + timedelta(days=400), B),  # however long nothing changes
    ("dane.example", T0, OTHER),  # domains are apart
    ("other.example", T0, None),
]


class TestServedLog:
    @pytest.fixture(params=backends("served log"))
    def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return fresh_url(request.param, request, tmp_path)

    def test_the_record_in_force_is_the_latest_at_or_before_the_time_and_survives_reopening(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_served([A, OTHER])
                await store.add_served([B])
                await store.add_served([])  # nothing to write is no error
            async with opened(url) as store:
                got = [await store.served_at(d, at) for d, at, _ in IN_FORCE]
            assert got == [want for _, _, want in IN_FORCE]

        run(body())

    def test_of_two_records_at_one_moment_the_later_written_is_in_force(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                await store.add_served([A, replace(A, answer="OK encrypt")])
                assert await store.served_at("example.com", T0) == replace(A, answer="OK encrypt")
                await store.add_served([replace(A, answer="OK dane")])
                assert await store.served_at("example.com", T0) == replace(A, answer="OK dane")

        run(body())

    def test_pruning_keeps_each_domains_record_in_force_at_the_cutoff(self, url: str) -> None:
        cutoff, day = T0, timedelta(days=1)
        old = served(cutoff - 50 * day, answer="OK encrypt")  # replaced before the cutoff: goes
        in_force = served(cutoff - 45 * day)  # still in force at the cutoff: stays
        later = served(cutoff + day, rua=())  # after the cutoff: stays
        lonely = served(cutoff - 300 * day, domain="quiet.example")  # never changed: stays

        async def body() -> None:
            async with opened(url) as store:
                await store.add_served([old, in_force, later, lonely])
                assert await store.prune_served(cutoff) == 1
                assert await store.prune_served(cutoff) == 0
                assert await store.served_at("example.com", cutoff - 46 * day) is None
                assert await store.served_at("example.com", cutoff - day) == in_force
                assert await store.served_at("example.com", cutoff + day) == later
                assert await store.served_at("quiet.example", cutoff) == lonely

        run(body())

    @pytest.mark.parametrize(
        ("why", "record", "message"),
        [
            ("a naive time", served(T0.replace(tzinfo=None)), "has no time zone"),
            ("an unknown policy type", served(T0, policy_type="dane"), "not an RFC 8460"),
            ("a domain not in key form", served(T0, domain="Example.COM."), "lower-case A-label"),
            ("a NUL in the answer", served(T0, answer=f"OK {NUL}"), "answer .* NUL"),
            ("a lone surrogate in an MX host", served(T0, mx_hosts=(SURROGATE,)), "surrogate"),
        ],
    )
    def test_served_log_refuses_a_batch_with_a_record_it_could_not_give_back_unchanged(
        self, url: str, why: str, record: ServedPolicy, message: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                with pytest.raises(StoreError, match=message):
                    await store.add_served([OTHER, record])
                assert await store.served_at("dane.example", T0) is None, why

        run(body())


# --- the history of `mxguard check` and its bulk-run claims ---------------------------------

LEASE = timedelta(minutes=5)
# A whole check report: tens of KiB of JSON, with non-ASCII text and a quote.
REPORT = json.dumps(
    {
        "domain": "example.com",
        "verdict": "protected",
        "mx": [{"host": f"mx{n}.example.com", "starttls": "ok", "note": "ü ' \\ \""}
               for n in range(400)],
    },
    ensure_ascii=False,
    indent=2,
)  # fmt: skip


def check(at: datetime = T0, **kw: Any) -> CheckRecord:
    base = CheckRecord(
        domain="example.com", at=at, verdict="protected", report=REPORT,
        policy_id="20260501T000000", policy_digest="ab" * 32,
    )  # fmt: skip
    return replace(base, **kw)


class TestCheckLog:
    @pytest.fixture(params=backends("check log"))
    def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return fresh_url(request.param, request, tmp_path)

    def test_check_log_has_nothing_for_a_domain_never_checked(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                assert await store.last_check("example.com") is None
                assert await store.last_check("example.com", before=T0) is None
                assert await store.run_progress("run-1") == (0, 0)
                await store.add_check(check(domain="other.example"))
                assert await store.last_check("example.com") is None

        run(body())

    def test_last_check_gives_back_exactly_what_was_added_and_survives_reopening(
        self, url: str
    ) -> None:
        plus2 = timezone(timedelta(hours=2))
        bare = check(verdict="broken", report="{}", policy_id=None, policy_digest=None)

        async def body() -> None:
            async with opened(url) as store:
                first = await store.add_check(check(T0.astimezone(plus2)))
                assert len(REPORT) > 30_000
                got = await store.last_check("example.com")
                assert got == replace(check(), id=first)
                assert got is not None and got.at.tzinfo is UTC and got.at == T0
                second = await store.add_check(replace(bare, domain="other.example"))
                assert second != first
            async with opened(url) as store:
                assert await store.last_check("example.com") == replace(check(), id=first)
                got = await store.last_check("other.example")
                assert got == replace(bare, domain="other.example", id=second)

        run(body())

    def test_last_check_is_the_newest_and_only_among_those_before_the_time_asked(
        self, url: str
    ) -> None:
        t1, t2, t3 = T0, T0 + timedelta(hours=1), T0 + timedelta(days=1)

        async def body() -> None:
            async with opened(url) as store:
                # Added out of order: the newest is by `at`, not by when it was added.
                i2 = await store.add_check(check(t2, verdict="partial"))
                i3 = await store.add_check(check(t3, verdict="unprotected"))
                i1 = await store.add_check(check(t1))
                assert await store.last_check("example.com") == check(
                    t3, verdict="unprotected", id=i3
                )
                assert await store.last_check("example.com", before=t3) == check(
                    t2, verdict="partial", id=i2
                )
                later = t3 + timedelta(microseconds=1)
                assert (await store.last_check("example.com", before=later)) == check(
                    t3, verdict="unprotected", id=i3
                )
                assert await store.last_check("example.com", before=t2) == check(t1, id=i1)
                assert await store.last_check("example.com", before=t1) is None
                # `before` in another zone is the same instant.
                plus2 = timezone(timedelta(hours=2))
                got = await store.last_check("example.com", before=t2.astimezone(plus2))
                assert got == check(t1, id=i1)

        run(body())

    def test_of_two_checks_at_one_moment_the_one_added_later_is_the_last(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                first = await store.add_check(check(verdict="partial"))
                second = await store.add_check(check(verdict="broken"))
                assert second > first
                assert await store.last_check("example.com") == check(verdict="broken", id=second)
                after = T0 + timedelta(seconds=1)
                got = await store.last_check("example.com", before=after)
                assert got is not None and got.id == second

        run(body())

    @pytest.mark.parametrize(
        ("rule", "bad", "message"),
        [
            ("the store assigns ids", check(id=7), "store assigns ids"),
            ("times carry a zone", check(T0.replace(tzinfo=None)), "at .* has no time zone"),
            ("domains are in key form", check(domain="Example.com."), "lower-case A-label"),
            ("no NUL in the report", check(report='{"x": "\x00"}'), "report .* NUL"),
            ("no lone surrogate in the verdict", check(verdict=SURROGATE), "verdict .* surrogate"),
            ("no NUL in the policy id", check(policy_id="2026\x00"), "policy_id .* NUL"),
            ("no NUL in the digest", check(policy_digest=NUL), "policy_digest .* NUL"),
            ("a run has a name", check(run=""), "run is empty"),
            ("no NUL in the run", check(run="run\x001"), "run .* NUL"),
        ],
    )
    def test_add_check_refuses_a_record_it_could_not_give_back_unchanged(
        self, url: str, rule: str, bad: CheckRecord, message: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                with pytest.raises(StoreError, match=message):
                    await store.add_check(bad)
                assert await store.last_check(bad.domain.lower().rstrip(".")) is None, rule
                assert await store.run_progress("run-1") == (0, 0)

        run(body())

    def test_check_log_refuses_arguments_it_could_not_keep(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                calls: list[tuple[Callable[[], Awaitable[object]], str]] = [
                    (lambda: store.last_check("Example.com"), "lower-case A-label"),
                    (lambda: store.last_check("example.com", T0.replace(tzinfo=None)),
                     "before .* has no time zone"),
                    (lambda: store.claim_check("", "example.com", "a", T0, LEASE), "run is empty"),
                    (lambda: store.claim_check("r\x00", "example.com", "a", T0, LEASE), "NUL"),
                    (lambda: store.claim_check("r", "EXAMPLE.com", "a", T0, LEASE), "A-label"),
                    (lambda: store.claim_check("r", "example.com", "", T0, LEASE), "node is empty"),
                    (lambda: store.claim_check("r", "example.com", SURROGATE, T0, LEASE),
                     "node .* surrogate"),
                    (lambda: store.claim_check("r", "example.com", "a", T0.replace(tzinfo=None),
                                               LEASE), "now .* has no time zone"),
                    (lambda: store.claim_check("r", "example.com", "a", T0, timedelta(0)),
                     "not positive"),
                    (lambda: store.claim_check("r", "example.com", "a", T0, -LEASE),
                     "not positive"),
                    (lambda: store.claim_check("r", "example.com", "a", FUTURE,
                                               timedelta(days=3_000_000)), "past the year 9999"),
                    (lambda: store.run_progress(""), "run is empty"),
                ]  # fmt: skip
                for call, message in calls:
                    with pytest.raises(StoreError, match=message):
                        await call()
                assert await store.run_progress("r") == (0, 0)

        run(body())

    def test_a_claim_holds_the_domain_until_its_lease_ends_unless_it_is_done(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                assert await store.claim_check("run-1", "example.com", "node-a", T0, LEASE)
                # While the lease runs nobody gets it, its own node neither.
                assert not await store.claim_check("run-1", "example.com", "node-b", T0, LEASE)
                running = T0 + LEASE - timedelta(microseconds=1)
                assert not await store.claim_check("run-1", "example.com", "node-b", running, LEASE)
                assert not await store.claim_check("run-1", "example.com", "node-a", running, LEASE)
                # Claims are per run and per domain.
                assert await store.claim_check("run-1", "example.org", "node-b", T0, LEASE)
                assert await store.claim_check("run-2", "example.com", "node-b", T0, LEASE)
                # Once the lease has ended (at T0 + LEASE itself) another node takes it, with a
                # new lease.
                expired = T0 + LEASE
                assert await store.claim_check("run-1", "example.com", "node-b", expired, LEASE)
                assert not await store.claim_check("run-1", "example.com", "node-a", expired, LEASE)
                assert not await store.claim_check(
                    "run-1", "example.com", "node-a", expired + LEASE / 2, LEASE
                )
                # Done: never claimed again, however late.
                await store.add_check(check(run="run-1"))
                later = expired + timedelta(days=365)
                assert not await store.claim_check("run-1", "example.com", "node-a", later, LEASE)
                assert not await store.claim_check("run-1", "example.com", "node-b", later, LEASE)
                # The same domain in another run is apart.
                assert await store.claim_check("run-2", "example.com", "node-a", later, LEASE)

        run(body())

    def test_a_check_added_with_a_run_and_no_claim_marks_the_domain_done(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                i = await store.add_check(check(run="run-1"))
                assert await store.last_check("example.com") == check(run="run-1", id=i)
                assert await store.run_progress("run-1") == (1, 1)
                assert not await store.claim_check("run-1", "example.com", "node-a", T0, LEASE)
                # A second check of it in the run is kept, and the domain stays done once.
                j = await store.add_check(check(T0 + timedelta(seconds=1), run="run-1"))
                assert await store.last_check("example.com") == check(
                    T0 + timedelta(seconds=1), run="run-1", id=j
                )
                assert await store.run_progress("run-1") == (1, 1)
                # A check outside any run touches no run.
                await store.add_check(check(domain="example.org"))
                assert await store.run_progress("run-1") == (1, 1)
                assert await store.claim_check("run-1", "example.org", "node-a", T0, LEASE)

        run(body())

    def test_run_progress_counts_the_domains_claimed_and_those_done(self, url: str) -> None:
        domains = [f"d{n}.example" for n in range(5)]

        async def body() -> None:
            async with opened(url) as store:
                for d in domains:
                    assert await store.claim_check("run-1", d, "node-a", T0, LEASE)
                assert await store.run_progress("run-1") == (5, 0)
                await store.add_check(check(domain=domains[0], run="run-1"))
                await store.add_check(check(domain=domains[1], run="run-1"))
                assert await store.run_progress("run-1") == (5, 2)
                # A claim taken over after its lease ended is still one domain.
                assert await store.claim_check("run-1", domains[2], "node-b", T0 + LEASE, LEASE)
                # A check added with the run but never claimed counts as claimed and done.
                await store.add_check(check(domain="late.example", run="run-1"))
                assert await store.run_progress("run-1") == (6, 3)
                await store.add_check(check(domain=domains[3], run="run-2"))
                assert await store.run_progress("run-2") == (1, 1)
                assert await store.run_progress("run-3") == (0, 0)
            async with opened(url) as store:
                assert await store.run_progress("run-1") == (6, 3)

        run(body())

    def test_of_concurrent_claims_from_two_stores_exactly_one_is_granted(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as first, opened(url) as second:
                granted = await asyncio.gather(
                    *(
                        store.claim_check("run-1", "example.com", f"node-{n}", T0, LEASE)
                        for n in range(10)
                        for store in (first, second)
                    )
                )
                assert len(granted) == 20 and granted.count(True) == 1
                assert await first.run_progress("run-1") == (1, 0)
                # And again once the lease has ended.
                expired = T0 + LEASE
                granted = await asyncio.gather(
                    *(
                        store.claim_check("run-1", "example.com", f"node-{n}", expired, LEASE)
                        for n in range(10)
                        for store in (first, second)
                    )
                )
                assert granted.count(True) == 1

        run(body())

    def test_check_log_is_shared_by_two_stores(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as first, opened(url) as second:
                assert await first.claim_check("run-1", "example.com", "node-a", T0, LEASE)
                assert not await second.claim_check("run-1", "example.com", "node-b", T0, LEASE)
                i = await first.add_check(check(run="run-1"))
                assert await second.last_check("example.com") == check(run="run-1", id=i)
                assert await second.run_progress("run-1") == (1, 1)

        run(body())


# --- TLS reports received for domain owners (RFC 8460 §4, §5) -------------------------------

# A gzip body as received: any bytes, kept exactly.
RAW = b"\x1f\x8b\x08\x00 a gzipped report \x00\xff"
STS_LINES = ("version: STSv1", "mode: enforce", "mx: *.example.com", "max_age: 86400")
VERIFIED = DkimResult(True, "reporter.example", "tlsrpt2026", "signature verified")


def inbox_report(
    report_id: str = "2026-05-01T00:00:00Z_example.com",
    *,
    start: datetime = DAY,
    domain: str | None = "example.com",
    organization: str = "Reporter Inc.",
    **kw: Any,
) -> ReceivedReport:
    """A received report with an STS policy (two failure details, one of a result type this
    mxguard does not know) and a TLSA policy, for `domain`, starting at `start`."""
    sts = ReceivedPolicy(
        PolicyType.STS, STS_LINES, domain, ("*.example.com",), 120, 3,
        (
            FailureDetail(ResultType.CERTIFICATE_EXPIRED, "192.0.2.1", "mx1.example.com",
                          "198.51.100.7", "mx1.example.com", 2, "expired 2026-04-30", None),
            FailureDetail("a-future-result-type", None, None, None, None, 1, None, "X 4.7.0"),
        ),
    )  # fmt: skip
    tlsa = ReceivedPolicy(PolicyType.TLSA, ("3 1 1 " + "ab" * 32,), domain, (), 10, 0)
    base = ReceivedReport(
        organization_name=organization, start=start,
        end=start + timedelta(days=1, seconds=-1), contact_info="tlsrpt@reporter.example",
        report_id=report_id, policies=(sts, tlsa), notes=("policies[0]: a note, ü",),
    )  # fmt: skip
    return replace(base, **kw)


def received(report: ReceivedReport | None = None, **kw: Any) -> ReceivedRecord:
    base = ReceivedRecord(
        report=report if report is not None else inbox_report(),
        raw=RAW,
        received_at=BUILT_AT,
        source=ReportSource.MAIL,
        dkim=VERIFIED,
    )
    return replace(base, **kw)


def one_policy(report: ReceivedReport, **kw: Any) -> ReceivedReport:
    """`report` with its first policy only, changed by `kw`."""
    return replace(report, policies=(replace(report.policies[0], **kw),))


def detail(result: ResultType | str, mx: str | None, count: int) -> FailureDetail:
    return FailureDetail(result, "192.0.2.1", mx, None, None, count)


class TestReportInbox:
    @pytest.fixture(params=backends("report inbox"))
    def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return fresh_url(request.param, request, tmp_path)

    def test_report_inbox_has_nothing_before_a_report_is_received(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                assert await store.received_between("example.com", DAY, NEXT_DAY) == []
                assert await store.received_domains(LONG_AGO, FUTURE) == []
                assert await store.report_totals("example.com", DAY, NEXT_DAY) == ReportTotals(
                    "example.com", DAY, NEXT_DAY, 0, 0, 0, (), (), (), ()
                )

        run(body())

    def test_add_received_gives_back_exactly_what_was_added_and_survives_reopening(
        self, url: str
    ) -> None:
        plus2 = timezone(timedelta(hours=2))
        # A policy of a type RFC 8460 lacks and without a usable domain, control characters
        # in the sender's texts (escaping them is for whoever shows them), no contact.
        odd = ReceivedPolicy("a-future-policy-type", (), None, (), 0, 7,
                             (detail("\x1b[31mred", None, 7),))  # fmt: skip
        report = inbox_report(start=DAY.astimezone(plus2), contact_info=None)
        report = replace(report, policies=(*report.policies, odd))
        record = received(report, received_at=BUILT_AT.astimezone(plus2))
        unsigned = received(
            inbox_report("r-2", organization="Other\tSender"),
            source=ReportSource.HTTPS,
            dkim=None,
            raw=b"{}",
        )

        async def body() -> None:
            async with opened(url) as store:
                assert await store.add_received(record)
                assert await store.add_received(unsigned)
                got = await store.received_between("example.com", DAY, NEXT_DAY)
                want = [
                    replace(received(replace(report, start=DAY)), id=got[0].id),
                    replace(unsigned, id=got[1].id),
                ]
                assert got == want
                assert got[0].id is not None and got[1].id is not None and got[0].id != got[1].id
                assert got[0].received_at.tzinfo is UTC and got[0].report.start.tzinfo is UTC
                assert got[0].report.policies[0].failure_details[1].result_type == (
                    "a-future-result-type"
                )
                assert got[0].dedupe_key == record.dedupe_key
            async with opened(url) as store:
                assert await store.received_between("example.com", DAY, NEXT_DAY) == want

        run(body())

    def test_a_resent_report_is_stored_once(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as store:
                assert await store.add_received(received())
                # RFC 8460 §5.5: senders retry; the same report again, however it travelled
                # and whatever its counts say now, is the same report.
                recounted = tuple(
                    replace(p, successful=p.successful + 1) for p in inbox_report().policies
                )
                for again in (
                    received(),
                    received(raw=b"other bytes", source=ReportSource.HTTPS, dkim=None),
                    received(received_at=BUILT_AT + timedelta(days=1)),
                    received(inbox_report(policies=recounted, notes=())),
                ):
                    assert not await store.add_received(again)
                totals = await store.report_totals("example.com", DAY, NEXT_DAY)
                assert (totals.reports, totals.successful, totals.failed) == (1, 130, 3)
                # Another report-id, organisation, day or set of policies is another report.
                for other in (
                    inbox_report("another-id"),
                    inbox_report(organization="Other Sender"),
                    inbox_report(end=NEXT_DAY),
                    one_policy(inbox_report()),
                ):
                    assert await store.add_received(received(other))
                assert len(await store.received_between("example.com", DAY, NEXT_DAY)) == 5

        run(body())

    def test_of_concurrent_adds_of_one_report_from_two_stores_exactly_one_stores_it(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as first, opened(url) as second:
                added = await asyncio.gather(
                    *(
                        store.add_received(received())
                        for _ in range(10)
                        for store in (first, second)
                    )
                )
                assert added.count(True) == 1
                assert len(await second.received_between("example.com", DAY, NEXT_DAY)) == 1

        run(body())

    def test_received_between_takes_a_domains_reports_by_the_start_of_their_date_range(
        self, url: str
    ) -> None:
        reports = [
            inbox_report("before", start=DAY - timedelta(microseconds=1)),
            inbox_report("first", start=DAY),
            inbox_report("other-domain", start=DAY, domain="example.org"),
            inbox_report("last", start=NEXT_DAY - timedelta(microseconds=1)),
            inbox_report("after", start=NEXT_DAY),
        ]

        async def body() -> None:
            async with opened(url) as store:
                # Added out of order: the answer is in order of the date range's start.
                for r in reversed(reports):
                    assert await store.add_received(received(r))
                got = await store.received_between("example.com", DAY, NEXT_DAY)
                assert [g.report.report_id for g in got] == ["first", "last"]
                other = await store.received_between("example.org", LONG_AGO, FUTURE)
                assert [g.report.report_id for g in other] == ["other-domain"]
                plus2 = timezone(timedelta(hours=2))
                again = await store.received_between(
                    "example.com", DAY.astimezone(plus2), NEXT_DAY.astimezone(plus2)
                )
                assert again == got
                assert await store.received_domains(DAY, NEXT_DAY) == [
                    "example.com",
                    "example.org",
                ]
                assert await store.received_domains(NEXT_DAY, FUTURE) == ["example.com"]
                assert await store.received_between("example.net", LONG_AGO, FUTURE) == []

        run(body())

    def test_report_totals_add_up_days_organisations_result_types_and_mx_hosts(
        self, url: str
    ) -> None:
        day2 = NEXT_DAY
        a = ReceivedPolicy(
            PolicyType.STS,
            STS_LINES,
            "example.com",
            ("*.example.com",),
            100,
            6,
            (
                detail(ResultType.CERTIFICATE_EXPIRED, "mx1.example.com", 4),
                detail(ResultType.STARTTLS_NOT_SUPPORTED, "mx2.example.com", 2),
            ),
        )
        b = ReceivedPolicy(
            PolicyType.STS,
            STS_LINES,
            "example.com",
            ("*.example.com",),
            50,
            3,
            (
                detail(ResultType.CERTIFICATE_EXPIRED, "mx2.example.com", 2),
                detail("a-future-result-type", None, 1),
            ),
        )
        no_policy = ReceivedPolicy(PolicyType.NO_POLICY_FOUND, (), "example.com", (), 7, 0)
        elsewhere = ReceivedPolicy(PolicyType.STS, (), "example.org", (), 1000, 1000,
                                   (detail(ResultType.CERTIFICATE_EXPIRED, "mx.example.org",
                                           1000),))  # fmt: skip
        reports = [
            inbox_report("g1", organization="Google", policies=(a, no_policy)),
            inbox_report("g2", organization="Google", start=day2, policies=(b,)),
            inbox_report("m1", organization="Microsoft", policies=(b, elsewhere)),
            inbox_report("late", organization="Late", start=day2 + timedelta(days=1),
                         policies=(a,)),
        ]  # fmt: skip

        async def body() -> None:
            async with opened(url) as store:
                for r in reports:
                    assert await store.add_received(received(r))
                end = day2 + timedelta(days=1)
                totals = await store.report_totals("example.com", DAY, end)
                assert totals == ReportTotals(
                    domain="example.com",
                    start=DAY,
                    end=end,
                    reports=3,
                    successful=207,
                    failed=12,
                    days=(
                        DayTotals(DAY.date(), 2, 157, 9),
                        DayTotals(day2.date(), 1, 50, 3),
                    ),
                    organizations=(
                        OrganizationTotals("Google", 2, 157, 9),
                        OrganizationTotals("Microsoft", 1, 50, 3),
                    ),
                    # Ties in code point order of the key.
                    result_types=(
                        Tally(ResultType.CERTIFICATE_EXPIRED, 3, 8),
                        Tally("a-future-result-type", 2, 2),
                        Tally(ResultType.STARTTLS_NOT_SUPPORTED, 1, 2),
                    ),
                    # Failures without a host name last.
                    mx_hosts=(
                        Tally("mx2.example.com", 3, 6),
                        Tally("mx1.example.com", 1, 4),
                        Tally(None, 2, 2),
                    ),
                )
                top = await store.report_totals("example.com", DAY, end, top=1)
                assert top.organizations == totals.organizations[:1]
                assert top.result_types == totals.result_types[:1]
                assert top.mx_hosts == totals.mx_hosts[:1]
                assert (top.reports, top.successful, top.failed, top.days) == (
                    3, 207, 12, totals.days,
                )  # fmt: skip
                assert totals.to_json()["mx_hosts"][2] == {
                    "mx_host": None,
                    "reports": 2,
                    "failed": 2,
                }

        run(body())

    def test_report_totals_are_exact_far_beyond_what_a_64_bit_sum_holds(self, url: str) -> None:
        # Anyone may send reports for a domain; 1,100 counts at the largest value a report may
        # hold (2**53 - 1) add up to more than 2**63, which must not break the totals.
        big = 2**53 - 1
        policy = ReceivedPolicy(
            PolicyType.STS,
            STS_LINES,
            "example.com",
            (),
            big,
            big,
            (detail(ResultType.CERTIFICATE_EXPIRED, "mx1.example.com", big),),
        )
        small = ReceivedPolicy(
            PolicyType.STS,
            STS_LINES,
            "example.com",
            (),
            1,
            1,
            (detail(ResultType.STARTTLS_NOT_SUPPORTED, "mx2.example.com", 1),),
        )

        async def body() -> None:
            async with opened(url) as store:
                for n in range(11):
                    report = inbox_report(f"big-{n}", policies=(policy,) * 100)
                    assert await store.add_received(received(report))
                assert await store.add_received(received(inbox_report("s", policies=(small,))))
                totals = await store.report_totals("example.com", DAY, NEXT_DAY)
                assert totals.successful == totals.failed == 1100 * big + 1 > 2**63
                assert totals.result_types == (
                    Tally(ResultType.CERTIFICATE_EXPIRED, 11, 1100 * big),
                    Tally(ResultType.STARTTLS_NOT_SUPPORTED, 1, 1),
                )
                assert totals.days == (DayTotals(DAY.date(), 12, 1100 * big + 1, 1100 * big + 1),)

        run(body())

    @pytest.mark.parametrize(
        ("rule", "bad", "message"),
        [
            ("the store assigns ids", received(id=7), "store assigns ids"),
            ("times carry a zone", received(received_at=T0.replace(tzinfo=None)),
             "received_at .* has no time zone"),
            ("the report's times too", received(inbox_report(start=T0.replace(tzinfo=None))),
             "start .* has no time zone"),
            ("a known source", received(source="carrier-pigeon"), "source 'carrier-pigeon'"),
            ("the raw body is bytes", received(raw="text"), "raw is str, not bytes"),
            ("a report-id", received(inbox_report("")), "report_id is empty"),
            ("domains in key form", received(one_policy(inbox_report(),
                                                        policy_domain="Example.COM.")),
             "lower-case A-label"),
            ("no NUL in the organisation", received(inbox_report(organization="Evil\x00Inc")),
             "organization_name .* NUL"),
            ("no lone surrogate in a note", received(inbox_report(notes=(SURROGATE,))),
             "notes .* surrogate"),
            ("no NUL in a policy string", received(one_policy(inbox_report(),
                                                              policy_strings=(NUL,))),
             "policy_strings .* NUL"),
            ("no NUL in a failure detail", received(one_policy(
                inbox_report(), failure_details=(detail(ResultType.CERTIFICATE_EXPIRED, NUL,
                                                        1),))),
             "receiving_mx_hostname .* NUL"),
            ("no NUL in the DKIM detail", received(dkim=DkimResult(False, None, None, NUL)),
             "detail .* NUL"),
            ("counts are not negative", received(one_policy(inbox_report(), successful=-1)),
             "successful -1 is not a session count"),
            ("counts stay below 2**53", received(one_policy(inbox_report(), failed=2**53)),
             "failed 9007199254740992 is not a session count"),
            ("counts are integers", received(one_policy(inbox_report(), failed=True)),
             "failed True is not a session count"),
            ("failure counts too", received(one_policy(
                inbox_report(), failure_details=(detail("x", None, -5),))),
             "failed_session_count -5 is not a session count"),
        ],
    )  # fmt: skip
    def test_add_received_refuses_a_record_it_could_not_give_back_unchanged(
        self, url: str, rule: str, bad: ReceivedRecord, message: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                with pytest.raises(StoreError, match=message):
                    await store.add_received(bad)
                assert await store.received_domains(LONG_AGO, FUTURE) == [], rule
                totals = await store.report_totals("example.com", LONG_AGO, FUTURE)
                assert totals.reports == 0, rule

        run(body())

    def test_report_inbox_refuses_arguments_it_could_not_answer(self, url: str) -> None:
        naive = DAY.replace(tzinfo=None)

        async def body() -> None:
            async with opened(url) as store:
                calls: list[tuple[Callable[[], Awaitable[object]], str]] = [
                    (lambda: store.received_between("Example.com", DAY, NEXT_DAY), "A-label"),
                    (lambda: store.received_between("example.com", naive, NEXT_DAY),
                     "start .* has no time zone"),
                    (lambda: store.report_totals("example.com.", DAY, NEXT_DAY), "A-label"),
                    (lambda: store.report_totals("example.com", DAY, naive),
                     "end .* has no time zone"),
                    (lambda: store.report_totals("example.com", DAY, NEXT_DAY, top=0),
                     "top 0 is not a positive integer"),
                    (lambda: store.report_totals("example.com", DAY, NEXT_DAY, top=True),
                     "top True is not a positive integer"),
                    (lambda: store.received_domains(naive, NEXT_DAY), "start .* has no time zone"),
                ]  # fmt: skip
                for call, message in calls:
                    with pytest.raises(StoreError, match=message):
                        await call()

        run(body())

    def test_report_inbox_is_shared_by_two_stores(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as first, opened(url) as second:
                assert await first.add_received(received())
                assert not await second.add_received(received())
                got = await second.received_between("example.com", DAY, NEXT_DAY)
                assert [replace(g, id=None) for g in got] == [received()]

        run(body())


# --- learned security levels (docs/learned.md) -------------------------------------------------

L = SecurityLevel


def seen(level: SecurityLevel = L.TLS, at: datetime = T0, **kw: Any) -> LevelSeen:
    base = LevelSeen("example.com", "mx1.example.com", "198.51.100.7", level, at)
    return replace(base, **kw)


def drop(at: datetime = T0, **kw: Any) -> LevelDrop:
    base = LevelDrop(at, "example.com", "mx1.example.com", "198.51.100.7", L.WEBPKI, L.PLAIN,
                     ResultType.STARTTLS_NOT_SUPPORTED)  # fmt: skip
    return replace(base, **kw)


def alarm(at: datetime = T0, **kw: Any) -> StrippingAlarm:
    base = StrippingAlarm(
        at, ("a.example", "b.example"),
        ("a.example mx.a.example [192.0.2.1]", "b.example mx.b.example [2001:db8::1]"), 900.0,
        enforce=True,
    )  # fmt: skip
    return replace(base, **kw)


def row(
    level: SecurityLevel, first: datetime, last: datetime, count: int, **kw: Any
) -> LearnedHost:
    base = LearnedHost("example.com", "mx1.example.com", "198.51.100.7", level, first, last, count)
    return replace(base, **kw)


H = timedelta(hours=1)
# (rule, sessions learned in order, stale_before, the row afterwards)
LEARN_ROWS = [
    ("first_session_makes_the_row", [seen(L.TLS)], LONG_AGO, row(L.TLS, T0, T0, 1)),
    ("same_level_counts_and_moves_last_seen", [seen(L.TLS), seen(L.TLS, T0 + H)], LONG_AGO,
     row(L.TLS, T0, T0 + H, 2)),
    ("stronger_level_replaces_and_counts_from_one", [seen(L.TLS), seen(L.WEBPKI, T0 + H)],
     LONG_AGO, row(L.WEBPKI, T0 + H, T0 + H, 1)),
    ("weaker_level_changes_nothing", [seen(L.WEBPKI), seen(L.PLAIN, T0 + H)], LONG_AGO,
     row(L.WEBPKI, T0, T0, 1)),
    ("weaker_level_over_a_decayed_row_replaces_it", [seen(L.DANE), seen(L.PLAIN, T0 + 9 * H)],
     T0 + 8 * H, row(L.PLAIN, T0 + 9 * H, T0 + 9 * H, 1)),
    ("an_earlier_session_at_the_same_level_keeps_the_later_last_seen",
     [seen(L.TLS, T0 + H), seen(L.TLS)], LONG_AGO, row(L.TLS, T0 + H, T0 + H, 2)),
]  # fmt: skip


class TestLearnedLevels:
    @pytest.fixture(params=backends("learned levels"))
    def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return fresh_url(request.param, request, tmp_path)

    @pytest.mark.parametrize(
        ("rule", "sessions", "stale", "want"), LEARN_ROWS, ids=[r[0] for r in LEARN_ROWS]
    )
    def test_learning_keeps_the_strongest_level_and_how_often_and_when_it_was_seen(
        self, url: str, rule: str, sessions: list[LevelSeen], stale: datetime, want: LearnedHost
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                for s in sessions:
                    await store.learn([s], stale_before=stale)
            async with opened(url) as store:
                assert await store.learned_hosts("example.com") == [want], rule

        run(body())

    def test_rows_are_per_domain_host_and_address_in_code_point_order_and_forgotten_per_domain(
        self, url: str
    ) -> None:
        batch = [
            seen(L.TLS, domain="a_b.example"), seen(L.TLS, domain="a-c.example"),
            seen(L.WEBPKI, ip="2001:db8::1"), seen(L.PLAIN, mx="mx2.example.com"),
        ]  # fmt: skip

        async def body() -> None:
            async with opened(url) as store:
                assert await store.learned_hosts() == []
                await store.learn(batch, stale_before=LONG_AGO)
                await store.learn([], stale_before=LONG_AGO)  # nothing to learn is no error
                got = await store.learned_hosts()
                assert [(h.domain, h.mx, h.ip) for h in got] == [
                    ("a-c.example", "mx1.example.com", "198.51.100.7"),
                    ("a_b.example", "mx1.example.com", "198.51.100.7"),
                    ("example.com", "mx1.example.com", "2001:db8::1"),
                    ("example.com", "mx2.example.com", "198.51.100.7"),
                ]
                await store.add_drops([drop(), drop(domain="a-c.example")])
                assert await store.forget_learned("example.com") == 2
                assert await store.forget_learned("example.com") == 0
                assert [h.domain for h in await store.learned_hosts()] == [
                    "a-c.example",
                    "a_b.example",
                ]
                assert [d.domain for d in await store.drops_since(LONG_AGO)] == ["a-c.example"]

        run(body())

    def test_drops_come_back_as_added_from_a_time_on_per_domain_in_time_order(
        self, url: str
    ) -> None:
        plus2 = timezone(timedelta(hours=2))
        later = drop(T0 + H, learned=L.TLS, seen=L.PLAIN, result_type=None)
        other = drop(T0 + 2 * H, domain="other.example", seen=L.TLS,
                     result_type=ResultType.CERTIFICATE_EXPIRED)  # fmt: skip

        async def body() -> None:
            async with opened(url) as store:
                await store.add_drops([later, drop(T0.astimezone(plus2)), other])
                await store.add_drops([])
                got = await store.drops_since(T0)
                assert [replace(d, id=None) for d in got] == [drop(), later, other]
                assert len({d.id for d in got}) == 3
                assert [d.domain for d in await store.drops_since(T0 + H)] == [
                    "example.com",
                    "other.example",
                ]
                mine = await store.drops_since(LONG_AGO, "example.com")
                assert [replace(d, id=None) for d in mine] == [drop(), later]
                assert got[0].stripped and got[1].stripped and not got[2].stripped

        run(body())

    def test_one_alarm_is_active_at_a_time_extended_then_cleared_and_raised_anew(
        self, url: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                assert await store.latest_alarm() is None
                assert await store.clear_alarm(T0) is None
                assert await store.extend_alarm(["c.example"], []) is None
                assert await store.raise_alarm(alarm()) is True
                assert await store.raise_alarm(alarm(T0 + H, domains=("z.example",))) is False
                got = await store.latest_alarm()
                assert got is not None and replace(got, id=None) == alarm()
                extended = await store.extend_alarm(
                    ["c.example", "a.example"], ["c.example mx.c.example [192.0.2.9]"]
                )
                assert extended is not None and extended.domains == (
                    "a.example",
                    "b.example",
                    "c.example",
                )
                assert extended.hosts[-1] == "c.example mx.c.example [192.0.2.9]"
            async with opened(url) as store:
                cleared = await store.clear_alarm(T0 + H)
                assert cleared is not None and cleared.cleared_at == T0 + H
                assert cleared.domains == ("a.example", "b.example", "c.example")
                assert not cleared.active and await store.latest_alarm() == cleared
                assert await store.raise_alarm(alarm(T0 + 2 * H, enforce=False)) is True
                latest = await store.latest_alarm()
                assert latest is not None and latest.active and not latest.enforce

        run(body())

    def test_concurrent_raises_from_two_connections_keep_exactly_one_alarm(self, url: str) -> None:
        async def body() -> None:
            async with opened(url) as a, opened(url) as b:
                results = await asyncio.gather(
                    *(s.raise_alarm(alarm(T0 + n * H)) for n, s in enumerate([a, b] * 4))
                )
                assert sorted(results) == [False] * 7 + [True]

        run(body())

    @pytest.mark.parametrize(
        ("why", "call", "message"),
        [
            ("a naive time", lambda s: s.learn([seen(at=T0.replace(tzinfo=None))],
                                               stale_before=LONG_AGO), "has no time zone"),
            ("a domain not in key form", lambda s: s.learn([seen(domain="Example.COM.")],
                                                           stale_before=LONG_AGO), "lower-case"),
            ("an MX host not in key form", lambda s: s.learn([seen(mx="MX1.example.com.")],
                                                             stale_before=LONG_AGO), "mx "),
            ("a NUL in an address", lambda s: s.add_drops([drop(ip="1.2.3.4\x00")]), "NUL"),
            ("a level that is no level", lambda s: s.add_drops([drop(seen="weak")]), "level"),
            ("a drop with an id", lambda s: s.add_drops([drop(id=7)]), "id None"),
            ("a cleared alarm", lambda s: s.raise_alarm(alarm(cleared_at=T0)), "cleared_at"),
        ],
    )  # fmt: skip
    def test_learned_levels_refuse_values_they_could_not_give_back_unchanged(
        self, url: str, why: str, call: Callable[[Store], Awaitable[object]], message: str
    ) -> None:
        async def body() -> None:
            async with opened(url) as store:
                with pytest.raises(StoreError, match=message):
                    await call(store)
                assert await store.learned_hosts() == [], why
                assert await store.drops_since(LONG_AGO) == []
                assert await store.latest_alarm() is None

        run(body())
