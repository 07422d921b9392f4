"""Store faults under the Postfix policy server, on real SQLite files, against the lab.

Specification rows: another process holding the write lock delays no answer (reads do not
queue behind writes, a cache write is waited for only briefly and finishes later) and the
policy fetched meanwhile is the one served; a damaged file is refused at start with what to do;
a store that breaks while serving defers MTA-STS lookups naming the store error (not an
``ExceptionGroup``), makes ``/healthz`` 503, is counted by kind and logged once, not per
lookup; a full disk fails the cache write but no answer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import StoreError
from mxguard.adapters.store.sqlite import SQLiteStore
from mxguard.config import Settings, load
from mxguard.engine.sts import StoreFaults
from mxguard.lab.lab import Lab
from mxguard.postfix.netstring import NetstringDecoder, Request, encode
from mxguard.postfix.server import PolicyServer

HOST = "127.214.0.1"  # this suite's own loopback range

STS = "sts-enforce.test"
STS_ANSWER = "OK secure match=mx1.sts-enforce.test:mx2.sts-enforce.test servername=hostname"


def settings_for(lab: Lab, db: Path) -> Settings:
    return load(lab.config_file).with_overrides(store=f"sqlite:///{db}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def server(lab: Lab, db: Path) -> Iterator[PolicyServer]:
    with PolicyServer(
        settings_for(lab, db), listen=f"inet:{HOST}:0", metrics=f"inet:{HOST}:0", budget=5.0
    ) as s:
        yield s


def ask(server: PolicyServer, key: str) -> str:
    """One socketmap lookup, as Postfix makes it."""
    with socket.create_connection(server.socketmap_address, timeout=30) as sock:
        sock.sendall(encode(b"postfix " + key.encode()))
        decoder = NetstringDecoder()
        while True:
            data = sock.recv(65536)
            assert data, "connection closed without a reply"
            for event in decoder.feed(data):
                assert isinstance(event, Request)
                return event.payload.decode()


def http_get(server: PolicyServer, path: str) -> tuple[int, str]:
    host, port = server.metrics_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sqlite_store(server: PolicyServer) -> SQLiteStore:
    store = server.engine.store
    assert isinstance(store, SQLiteStore)
    return store


def on_writer(server: PolicyServer, work: Any) -> Any:
    """Run ``work(conn)`` on the store's own writing connection (its thread)."""
    return server.call(sqlite_store(server)._with_conn(work))


def writes_done(server: PolicyServer) -> None:
    server.call(server.engine.sts.writes_done(), timeout=60)


# --- a write lock held by another process ---------------------------------------------------


@pytest.mark.lab
def test_a_held_write_lock_delays_no_answer_and_the_fetched_policy_is_served_and_cached_later(
    server: PolicyServer, db: Path
) -> None:
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        # A new MTA-STS domain (fetched; its cache write waits for the lock), a DANE domain
        # and a domain without a policy (no write at all): all answered within the budget.
        assert ask(server, STS) == STS_ANSWER
        assert ask(server, "dane-ee.test") == "OK dane-only"
        assert ask(server, "nopolicy.test") == "NOTFOUND "
        # ... while the lock was (and still is) held: nobody else can write now.
        probe = sqlite3.connect(db, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")
        probe.close()
        assert server.call(server.engine.store.get_policy(STS)) is None
    finally:
        locker.execute("COMMIT")
        locker.close()
    writes_done(server)  # the write waited for the lock and went through once it was free
    cached = server.call(server.engine.store.get_policy(STS))
    assert cached is not None and "mode: enforce" in cached.policy_text
    assert http_get(server, "/healthz") == (200, "ok\n")


# --- a damaged file ---------------------------------------------------------------------------


def damage(db: Path, page: int) -> None:
    """Overwrite one page of the (checkpointed) file with garbage."""
    size = 4096
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xa5" * size)


def damage_policies(db: Path) -> None:
    """Damage the policy table and its index (lookups by domain read the index)."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE tbl_name = 'sts_policies'"
        ).fetchall()
    assert len(pages) == 2
    for (page,) in pages:
        damage(db, int(page))


def test_a_damaged_file_is_refused_at_open_with_what_to_do(db: Path) -> None:
    asyncio.run(_make(db))
    damage_policies(db)
    with pytest.raises(StoreError) as caught:
        asyncio.run(SQLiteStore.open(str(db)))
    message = str(caught.value)
    assert f"SQLite store {db} is damaged" in message
    assert f"mv {db} {db}.damaged" in message
    assert "trust-on-first-use protection is lost" in message
    assert caught.value.kind == "corrupt"


async def _make(db: Path) -> None:
    store = await SQLiteStore.open(str(db))
    await store.close()


@pytest.mark.lab
def test_the_server_refuses_to_start_on_a_damaged_file(lab: Lab, db: Path) -> None:
    asyncio.run(_make(db))
    damage_policies(db)
    with pytest.raises(StoreError, match=r"is damaged .* move the file away"):
        PolicyServer(settings_for(lab, db), listen=f"inet:{HOST}:0").start_in_thread()


@pytest.mark.lab
def test_a_store_that_breaks_while_serving_is_named_counted_logged_once_and_unhealthy(
    server: PolicyServer, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert ask(server, "dane-ee.test") == "OK dane-only"  # the store works
    damage_policies(db)
    with sqlite3.connect(db, isolation_level=None) as other:
        # A commit by another connection: the server's connections drop their cached pages.
        other.execute("UPDATE schema_version SET version = version")
    for domain in (STS, "sts-testing.test"):
        reason = f"{domain}: store error: database disk image is malformed"
        assert ask(server, domain) == f"TEMP {reason}"
    status, body = http_get(server, "/healthz")
    assert status == 503 and "database disk image is malformed" in body, body
    _, metrics = http_get(server, "/metrics")
    assert 'mxguard_store_errors_total{kind="corrupt"} 2' in metrics.splitlines()
    lines = [r.getMessage() for r in caplog.records if "store error" in r.getMessage()]
    assert len(lines) == 1, lines  # one line for the kind, not one per lookup
    assert "database disk image is malformed" in lines[0] and "move it away" in lines[0]
    assert not [r for r in caplog.records if r.exc_info], "no traceback per lookup"


# --- a full disk ------------------------------------------------------------------------------


def fill(conn: sqlite3.Connection) -> None:
    """Let the file grow no more (PRAGMA max_page_count) and fill the policy table's pages,
    so that caching one more policy fails with SQLITE_FULL, as on a full disk."""
    conn.execute("PRAGMA synchronous=OFF")  # the filler needs no durability
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    n = 0
    for size in (1000, 100, 10, 1):
        while True:
            n += 1
            try:
                conn.execute(
                    "INSERT INTO sts_policies VALUES (?, 'x', ?, 'x', 'x')",
                    (f"f{n}.invalid", "x" * size),
                )
            except sqlite3.OperationalError as exc:
                assert "full" in str(exc)
                break
    conn.execute("PRAGMA synchronous=FULL")


@pytest.mark.lab
def test_a_full_disk_fails_the_cache_write_but_no_answer(server: PolicyServer) -> None:
    on_writer(server, fill)
    assert ask(server, STS) == STS_ANSWER  # the fetched policy applies, uncached
    assert ask(server, "dane-ee.test") == "OK dane-only"
    assert ask(server, "nopolicy.test") == "NOTFOUND "
    writes_done(server)
    assert server.call(server.engine.store.get_policy(STS)) is None
    status, body = http_get(server, "/healthz")
    assert status == 503 and "store error (full)" in body, body
    _, metrics = http_get(server, "/metrics")
    assert 'mxguard_store_errors_total{kind="full"} 1' in metrics.splitlines()


# --- logging with a rate limit ----------------------------------------------------------------


def test_store_faults_log_once_per_kind_per_interval_and_clear_on_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    faults = StoreFaults(log_interval=60.0, hold=300.0, clock=lambda: now[0])
    full = StoreError("SQLite store x: database or disk is full", kind="full",
                      detail="database or disk is full")  # fmt: skip
    caplog.set_level(logging.WARNING)
    for _ in range(5):
        faults.failed("caching the policy of a.example", "write", full)
    now[0] = 61.0
    faults.failed("caching the policy of b.example", "write", full)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].endswith("(4 more since)"), lines
    assert faults.counts == {"full": 6}
    assert faults.problem is not None and "database or disk is full" in faults.problem
    faults.succeeded("read")  # a read working says nothing about writes
    assert faults.problem is not None
    faults.succeeded("write")
    assert faults.problem is None
    faults.failed("x", "write", full)
    now[0] += 301.0  # not seen again for `hold` seconds
    assert faults.problem is None


@pytest.mark.lab
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_store_file_removed_or_replaced_while_open_is_unhealthy_not_silent(
    server: PolicyServer, db: Path, how: str
) -> None:
    assert ask(server, "sts-enforce.test").startswith("OK secure")
    assert http_get(server, "/healthz") == (200, "ok\n")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if how == "replaced":
        sqlite3.connect(db).close()  # a new, empty file at the same path
    # Answers go on (the open file still works), but what is cached now would be lost at the
    # next start: /healthz says so, naming the file and what to do.
    assert ask(server, "dane-ee.test") == "OK dane-only"
    status, body = http_get(server, "/healthz")
    assert status == 503
    assert f"the store file {db} was {how} while open" in body and "restart" in body
