"""The state store, what only one backend does, on real SQLite files and real PostgreSQL and
Redis servers: Redis's key expiry (the one backend that applies RFC 8461 §5 expiry itself)
and key prefixes, PostgreSQL's reconnection after the server dropped a connection, SQLite's
durability, sharing between processes and schema versions; and the URL contract of `--store`.
What every backend does alike, role by role, is in test_store_conformance.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mxguard.adapters.store import (
    CachedPolicy,
    PendingReport,
    SessionResult,
    Store,
    StoreError,
    default_store_url,
    open_store,
)
from mxguard.adapters.store.sqlite import SCHEMA_VERSION
from mxguard.protocol import tlsrpt_report
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy

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


STS = ReportedPolicy(
    PolicyType.STS,
    ("version: STSv1", "mode: enforce", "mx: *.example.com"),
    ("*.example.com",),
    ("mailto:tlsrpt@example.com", "https://report.example.com/v1"),
)


def result(at: datetime = T0, **kw: Any) -> SessionResult:
    """A session result; `policy_type`, `policy_strings`, `mx_patterns` and `rua` change its
    policy."""
    fields_of_policy = ("policy_type", "policy_strings", "mx_patterns", "rua")
    policy = {k: kw.pop(k) for k in fields_of_policy if k in kw}
    fields: dict[str, Any] = {
        "id": None,
        "at": at,
        "policy_domain": "example.com",
        "policy": replace(STS, **policy),
        "result_type": ResultType.CERTIFICATE_EXPIRED,
        "sending_ip": "192.0.2.1",
        "receiving_mx": "mx1.example.com",
        "receiving_ip": "198.51.100.7",
        "receiving_helo": "mx1.example.com",
        "detail": "certificate expired on 2026-04-30",
        "is_report": False,
        "reported": None,
    }
    fields.update(kw)
    return SessionResult(**fields)


def report(ids: tuple[int, ...]) -> PendingReport:
    return PendingReport(
        report_id="r1",
        policy_domain="example.com",
        start=T0.replace(hour=0, minute=0, second=0, microsecond=0),
        filename="f.json.gz",
        body=b"\x1f\x8b",
        rua=("mailto:t@example.com",),
        result_ids=ids,
        created_at=T0 + DAY,
        next_attempt_at=T0 + DAY,
    )


# --- Redis: the key expires at expires_at (the one backend that applies expiry) --------------


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


# --- PostgreSQL: a connection the server dropped --------------------------------------------


def _terminate_other_sessions(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def test_postgres_database_created_as_sql_ascii_still_gives_text(postgres_server: Any) -> None:
    # initdb --locale=C without -E makes SQL_ASCII databases; psycopg then returns bytes for
    # text unless the client encoding says UTF8, and every cached policy broke the lookup.
    import psycopg

    name = f"ascii_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )

    async def body() -> None:
        async with opened(postgres_server.url(name)) as store:
            await store.put_policy(policy())
            cached = await store.get_policy("example.com")
            assert cached == policy() and isinstance(cached.policy_text, str)

    asyncio.run(body())


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
            # Storing a report is safe to run twice (a stored report is found): retried once.
            ids = tuple(r.id for r in await store.results_between(T0, T0 + DAY) if r.id)
            assert _terminate_other_sessions(url) == 1
            assert await store.add_report(report(ids))
            assert [(r.report_id, r.result_ids) for r in await store.reports()] == [("r1", ids)]

    run(body())


# --- SQLite specifics: durability, several processes, schema versions ------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from datetime import UTC, datetime, timedelta
    from mxguard.adapters.store import CachedPolicy, SessionResult, open_store
    from mxguard.protocol.tlsrpt_report import NO_POLICY_FOUND

    async def main(url, n):
        at = datetime(2026, 5, 1, 12, tzinfo=UTC)
        store = await open_store(url)
        await store.put_policy(CachedPolicy(f"p{n}.example", "id1", "version: STSv1\\n", at,
                                            at + timedelta(days=1)))
        await store.add_results([SessionResult(None, at, f"p{n}.example", NO_POLICY_FOUND, None,
                                 None, None, None, None, None, False, None)])
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


async def _count_commits(store: Any) -> list[str]:
    """The COMMITs the store's writer connection runs from now on (SQLite's trace callback,
    installed in the writer thread, which owns the connection)."""
    commits: list[str] = []

    def install() -> None:
        store._conn.set_trace_callback(
            lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
        )

    await store._executor.run(install)
    return commits


def test_sqlite_concurrent_policy_puts_share_commits_and_all_land(tmp_path: Path) -> None:
    # A burst of cold lookups caches a policy each; with synchronous=FULL every commit is an
    # fsync, so puts that arrive while one commits share the next one.
    url = f"sqlite://{tmp_path / 'state.db'}"
    n = 200

    async def body() -> None:
        async with opened(url) as store:
            commits = await _count_commits(store)
            policies = [
                CachedPolicy(f"p{i}.example", f"id{i}", POLICY_TEXT, T0, FUTURE) for i in range(n)
            ]
            await asyncio.gather(*(store.put_policy(p) for p in policies))
            assert 1 <= len(commits) < n / 4, len(commits)
            assert sorted(await store.policies(), key=lambda p: p.domain) == sorted(
                policies, key=lambda p: p.domain
            )

    run(body())
    # Durable: another connection, after the store closed, sees every one.
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM sts_policies").fetchone() == (n,)


def test_sqlite_one_failing_put_in_a_shared_commit_fails_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    url = f"sqlite://{path}"
    run(_open_and_close(url))
    with sqlite3.connect(path) as conn:  # the database refuses one domain's row
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON sts_policies "
            "WHEN NEW.domain = 'bad.example' BEGIN SELECT RAISE(ABORT, 'refused row'); END"
        )

    async def body() -> None:
        async with opened(url) as store:
            names = [f"ok{i}.example" for i in range(10)] + ["bad.example"]
            got = await asyncio.gather(
                *(store.put_policy(CachedPolicy(d, "id1", POLICY_TEXT, T0, FUTURE)) for d in names),
                return_exceptions=True,
            )
            assert all(g is None for g in got[:-1]), got
            assert isinstance(got[-1], StoreError) and "refused row" in str(got[-1])
            assert sorted(p.domain for p in await store.policies()) == sorted(names[:-1])

    run(body())


def test_sqlite_put_right_before_close_is_committed(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'state.db'}"

    async def body() -> None:
        store = await open_store(url)
        puts = [
            asyncio.ensure_future(
                store.put_policy(CachedPolicy(f"p{i}.example", "id1", POLICY_TEXT, T0, FUTURE))
            )
            for i in range(20)
        ]
        await asyncio.sleep(0)  # the puts are queued, not yet committed
        await store.close()
        await asyncio.gather(*puts)

    run(body())
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM sts_policies").fetchone() == (20,)


def _reader_calls(store: Any) -> list[object]:
    """Every call handed to the store's reader thread from now on."""
    calls: list[object] = []
    run_on_reader = store._reader.run

    def counting(work: Any) -> Any:
        calls.append(work)
        return run_on_reader(work)

    store._reader.run = counting
    return calls


def test_sqlite_point_reads_of_a_lookup_run_at_once_on_the_loop_thread(tmp_path: Path) -> None:
    # One domain's cached policy, learned levels, drops and served policy and the latest
    # alarm: answered on the loop's own connection, with no hand-off to the reader thread.
    url = f"sqlite://{tmp_path / 'state.db'}"

    async def body() -> None:
        async with opened(url) as store:
            policy = CachedPolicy("p.example", "id1", POLICY_TEXT, T0, FUTURE)
            await store.put_policy(policy)
            calls = _reader_calls(store)
            assert await store.get_policy("p.example") == policy
            assert await store.get_policy("absent.example") is None
            assert await store.learned_hosts("p.example") == []
            assert await store.drops_since(T0, "p.example") == []
            assert await store.served_at("p.example", T0) is None
            assert await store.latest_alarm() is None
            assert calls == []
            # Reads of every domain's rows are not point reads: the reader thread has them.
            assert await store.policies() == [policy]
            assert await store.learned_hosts() == []
            assert len(calls) == 2

    run(body())


class _Busy:
    """A connection on which SQLite answers "database is locked" (SQLITE_BUSY), as a reader
    does while another process recovers the WAL; everything else is the real connection's."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, *args: Any) -> Any:
        exc = sqlite3.OperationalError("database is locked")
        exc.sqlite_errorcode = 5  # type: ignore[attr-defined]
        raise exc

    def close(self) -> None:
        self.conn.close()


def test_sqlite_point_read_that_would_wait_goes_to_the_reader_thread(tmp_path: Path) -> None:
    # SQLite would have to wait: the read goes to the reader thread (which waits up to
    # READ_BUSY_TIMEOUT), and gives the answer, not the busy error.
    url = f"sqlite://{tmp_path / 'state.db'}"
    policy = CachedPolicy("p.example", "id1", POLICY_TEXT, T0, FUTURE)

    async def body() -> None:
        async with opened(url) as store:
            await store.put_policy(policy)
            calls = _reader_calls(store)
            store._here = _Busy(store._here)  # type: ignore[attr-defined]
            assert await store.get_policy("p.example") == policy
            assert len(calls) == 1

    run(body())


def test_sqlite_point_read_error_is_a_store_error_with_its_kind(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    url = f"sqlite://{path}"

    async def body() -> None:
        async with opened(url) as store:
            with sqlite3.connect(path) as conn:
                conn.execute("DROP TABLE sts_policies")
            calls = _reader_calls(store)
            with pytest.raises(StoreError, match="no such table: sts_policies") as caught:
                await store.get_policy("p.example")
            assert caught.value.kind == "other"
            assert calls == []  # an error that is no wait is not asked again elsewhere

    run(body())


def test_sqlite_point_read_from_another_threads_loop_goes_to_the_reader(tmp_path: Path) -> None:
    # The loop's connection belongs to the thread that opened the store; a caller on another
    # thread (a store shared by a server's thread and a test's) gets the reader thread.
    import threading

    url = f"sqlite://{tmp_path / 'state.db'}"
    policy = CachedPolicy("p.example", "id1", POLICY_TEXT, T0, FUTURE)
    got: list[object] = []

    async def body() -> None:
        async with opened(url) as store:
            await store.put_policy(policy)
            calls = _reader_calls(store)
            elsewhere = threading.Thread(
                target=lambda: got.append(asyncio.run(store.get_policy("p.example")))
            )
            elsewhere.start()
            await asyncio.get_running_loop().run_in_executor(None, elsewhere.join)
            assert got == [policy]
            assert len(calls) == 1

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


# --- rows this mxguard did not write ---------------------------------------------------------


def _insert_result(url: str, policy_type: str, result_type: str) -> None:
    """A session result row written by hand (or by another mxguard), behind the store's back."""
    columns = "at, policy_domain, policy_type, policy_strings, mx_patterns, result_type, rua, "
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            conn.execute(
                f"INSERT INTO session_results ({columns}is_report) VALUES "
                "('2026-05-01T12:30:15.123456Z', 'example.com', ?, '[]', '[]', ?, "
                "'[\"mailto:t@example.com\"]', 0)",
                (policy_type, result_type),
            )
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO session_results ({columns}is_report) VALUES "
            "(%s, 'example.com', %s, '{}', '{}', %s, '{mailto:t@example.com}', false)",
            (T0, policy_type, result_type),
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())


def test_a_stored_result_type_this_mxguard_does_not_know_is_kept_and_reported(
    sql_url: str,
) -> None:
    # RFC 8460 made result types an IANA registry: a newer mxguard may have written a new one.
    async def body() -> None:
        async with opened(sql_url):
            pass  # creates the schema
        _insert_result(sql_url, "sts", "x-new-result-type")
        async with opened(sql_url) as store:
            [r] = await store.results_between(T0 - DAY, T0 + DAY)
        assert (r.result_type, r.other_result_type) == (None, "x-new-result-type")
        [report] = tlsrpt_report.aggregate([r], day=T0.date(), organization_name="o",
                                           contact_info="c@example.org")  # fmt: skip
        [entry] = report.to_json()["policies"]
        assert entry["summary"]["total-failure-session-count"] == 1
        assert entry["failure-details"][0]["result-type"] == "x-new-result-type"

    run(body())


def test_a_stored_policy_type_rfc_8460_does_not_allow_is_a_store_error(sql_url: str) -> None:
    # No mxguard writes one (add_results refuses it): such a row was edited by hand.
    async def body() -> None:
        async with opened(sql_url):
            pass
        _insert_result(sql_url, "dane", "certificate-expired")
        async with opened(sql_url) as store:
            with pytest.raises(StoreError, match=r"policy type 'dane'.*correct or delete"):
                await store.results_between(T0 - DAY, T0 + DAY)

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
