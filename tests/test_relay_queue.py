"""The relay queue in SQLite, the DSN builder and the retry schedule, without a network.

- The queue file runs in WAL mode with synchronous=FULL; the schema carries its own version
  and a newer one is refused with what to do; a memory database is refused (it would lose
  accepted mail); the main store's tables are left alone.
- Claims hand each recipient to one node until its lease ends; finish() records outcomes,
  queues the bounce in the same transaction and deletes a finished message.
- A DSN is a multipart/report that Python's email parser reads as RFC 3464 says.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import random
import sqlite3
from pathlib import Path

import pytest

from mxguard.adapters.store import StoreError, open_store
from mxguard.relay.dsn import Failed, build_bounce, status_of
from mxguard.relay.listener import _tls_required_no, hash_password, load_auth_file
from mxguard.relay.queue import BOUNCED, DELIVERED, QUEUED, Decision, NewMessage, open_queue
from mxguard.relay.worker import RetryPolicy


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_durability_settings_and_own_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def work() -> None:
        store = await open_store(f"sqlite://{path}")  # the main store shares the file
        q = await open_queue(f"sqlite://{path}")
        await q.add(NewMessage("a@x.test", ("b@y.test",), b"hi\r\n"), 1.0)
        await q.close()
        await store.close()

    run(work())
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {
        "relay_messages",
        "relay_recipients",
        "relay_schema_version",
        "schema_version",
    } <= tables
    assert conn.execute("SELECT version FROM relay_schema_version").fetchall() == [(1,)]
    conn.execute("UPDATE relay_schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this mxguard"):
        run(open_queue(f"sqlite://{path}"))


def test_a_queue_in_memory_or_redis_is_refused() -> None:
    with pytest.raises(StoreError, match="would lose accepted mail"):
        run(open_queue("sqlite:///:memory:"))
    with pytest.raises(StoreError, match="sqlite:///PATH"):
        run(open_queue("redis://localhost/0"))


def test_claim_lease_finish_and_bounce(tmp_path: Path) -> None:
    async def work() -> None:
        q = await open_queue(f"sqlite://{tmp_path / 'q.db'}")
        try:
            rcpts = ("a@one.test", "b@one.test", "c@two.test", "a@one.test")
            mid = await q.add(NewMessage("s@x.test", rcpts, b"data\r\n", requiretls=True), 100.0)
            assert await q.claim("n1", 99.0, 30) is None  # not due yet
            w1 = await q.claim("n1", 100.0, 30)
            assert w1 is not None and w1.message_id == mid and w1.requiretls
            assert sorted(w1.recipients) == ["a@one.test", "b@one.test"]  # one domain, once each
            w2 = await q.claim("n2", 100.0, 30, busy=["two.test"])
            assert w2 is None  # one.test is leased, two.test is busy here
            w2 = await q.claim("n2", 100.0, 30)
            assert w2 is not None and w2.recipients == ("c@two.test",)
            # n1 dies; after its lease another node gets its work.
            assert await q.claim("n3", 129.0, 30) is None
            w3 = await q.claim("n3", 131.0, 30)
            assert w3 is not None and sorted(w3.recipients) == sorted(w1.recipients)
            bounce = NewMessage("", ("s@x.test",), b"dsn\r\n")
            await q.finish(w3, [Decision("a@one.test", DELIVERED),
                                Decision("b@one.test", BOUNCED, error="550 no")],
                           bounce, 131.0)  # fmt: skip
            await q.finish(w2, [Decision("c@two.test", QUEUED, 200.0, "451 later")], None, 131.0)
            entries = await q.entries()
            assert [(e.recipient, e.attempts, e.next_attempt_at, e.last_error) for e in entries
                    if e.message_id == mid] == [("c@two.test", 1, 200.0, "451 later")]  # fmt: skip
            [b] = [e for e in entries if e.message_id != mid]
            assert b.mail_from == "" and b.recipient == "s@x.test" and not b.requiretls
            assert await q.next_due() == 131.0
            w4 = await q.claim("n1", 200.0, 30)
            w5 = await q.claim("n1", 200.0, 30)
            assert w4 is not None and w5 is not None
            assert await q.release("n1") == 2
            for w in (w4, w5):
                await q.finish(w, [Decision(r, DELIVERED) for r in w.recipients], None, 201.0)
            assert await q.entries() == []
        finally:
            await q.close()

    run(work())


def test_retry_delay_doubles_with_jitter_up_to_the_maximum() -> None:
    policy = RetryPolicy(first=10, maximum=60, lifetime=3600)
    rng = random.Random(1)
    delays = [policy.delay(n, rng) for n in (1, 2, 3, 4, 5)]
    for d, base in zip(delays, (10, 20, 40, 60, 60), strict=True):
        assert 0.75 * base <= d <= 1.25 * base
    assert len({round(policy.delay(1, rng), 6) for _ in range(20)}) > 1


def test_status_of_an_smtp_reply() -> None:
    assert status_of("550 5.1.1 no such user", "5.0.0") == "5.1.1"
    assert status_of("451 4.2.1 busy", "4.4.7") == "4.2.1"
    assert status_of("550 4.1.1 inconsistent", "5.0.0") == "5.1.1"
    assert status_of("554 go away", "4.4.7") == "5.0.0"
    assert status_of(None, "4.4.7") == "4.4.7"


def test_a_dsn_is_a_delivery_status_report() -> None:
    original = b"Subject: hello\r\nMessage-ID: <m@x.test>\r\n\r\nsecret body\r\n"
    data = build_bounce(
        reporting_mta="relay.x.test",
        original_sender="s@x.test",
        failed=[Failed("b@y.test", "5.1.1", "550 5.1.1 no such user", "mx.y.test", True)],
        original=original,
        arrival=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        now=dt.datetime(2026, 12, 2, tzinfo=dt.UTC),
        message_id="abc",
    )
    msg = email.message_from_bytes(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    text, status, headers = msg.get_payload()  # type: ignore[misc]
    assert text.get_content_type() == "text/plain"
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.x.test"
    assert per_recipient["Final-Recipient"] == "rfc822; b@y.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.y.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: hello" in data and b"secret body" not in data
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_tls_required_header_and_auth_file(tmp_path: Path) -> None:
    assert _tls_required_no(b"Subject: x\r\nTLS-Required: No")
    assert _tls_required_no(b"tls-required:\r\n  no\r\nX: y")
    assert not _tls_required_no(b"Subject: TLS-Required: No")
    assert not _tls_required_no(b"TLS-Required: Yes")
    users = tmp_path / "users"
    users.write_text(f"# comment\napp:{hash_password('pw')}\n")
    assert set(load_auth_file(users)) == {"app"}
    users.write_text("app:pw\n")
    with pytest.raises(ValueError, match="line 1: expected USER:scrypt"):
        load_auth_file(users)


def test_relay_serve_refuses_bad_options_with_what_to_fix(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mxguard.cli import main

    store = ["--store", f"sqlite:///{tmp_path / 'q.db'}", "relay", "serve"]
    cases = [
        (["--listen", "localhost"], "expected IP:PORT"),
        (["--listen", "mail.example:25"], "is not an IP address"),
        (["--auth-file", str(tmp_path / "users")], "AUTH is only offered over TLS"),
        (["--tls-cert", str(tmp_path / "c.pem")], "give both --tls-cert and --tls-key"),
        (["--lifetime", "soon"], "is not a duration"),
        (["--trust", "not-a-net"], "expected a network"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(main, [*store, *args])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output, (args, result.output)
    result = CliRunner().invoke(main, ["--store", "sqlite:///:memory:", "relay", "queue"])
    assert result.exit_code == 2 and "would lose accepted mail" in result.output
    result = CliRunner().invoke(main, ["--store", f"sqlite:///{tmp_path / 'q.db'}", "relay",
                                       "queue", "--json"])  # fmt: skip
    assert result.exit_code == 0 and '"count": 0' in result.output
