"""Delivering TLS reports (RFC 8460 §5) to lab receivers, retrying, and never losing data.

A `mailto:` report must arrive at the domain's lab MX as a §5.3 e-mail sent by mxguard's own
delivery client; an `https:` report must arrive as a POST at the lab HTTPS endpoint; an
endpoint that fails keeps the report and its results until a later attempt succeeds; the
sessions that delivered reports are not counted again; a killed process loses no result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email
import email.policy
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import parsedmarc
import pytest

from mxguard.adapters.store import open_store
from mxguard.config import Settings
from mxguard.engine.context import Engine, engine
from mxguard.lab.lab import Lab
from mxguard.protocol import tlsrpt_report as tr
from mxguard.tlsrpt.reporter import reporter_for
from tlsrpt_helpers import lab_settings

pytestmark = pytest.mark.lab
T = TypeVar("T")


def with_engine(settings: Settings, work: Callable[[Engine], Awaitable[T]]) -> T:
    async def run() -> T:
        async with engine(settings) as e:
            return await work(e)

    return asyncio.run(run())


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def set_rua(lab: Lab, domain: str, rua: str) -> None:
    d = lab.scenario.domain(domain)
    lab.update_domain(dataclasses.replace(d, tlsrpt=(f"v=TLSRPTv1; rua={rua}",)))


def https_rua(lab: Lab, domain: str) -> str:
    return f"https://mta-sts.{domain}:{lab.ports.https}/report"


def test_mailto_report_arrives_at_the_lab_mx_and_its_sessions_are_not_reported_again(
    lab: Lab, tmp_path: Path
) -> None:
    s = lab_settings(lab, tmp_path)

    async def work(e: Engine) -> None:
        await e.sender().deliver("a@client.mxguard.test", ["b@sts-enforce.test"], b"Hi\r\n")
        r = reporter_for(e)
        [built] = await r.build(today())
        assert built.stored and built.report.successful == 1
        [delivery] = await r.deliver_due()
        assert delivery.delivered_to == "mailto:tlsrpt@sts-enforce.test"
        # The report's own SMTP session is recorded, marked, and left out of the next report.
        rest = await r.build(today(), store=False)
        assert [b.pending.policy_domain for b in rest] == []
        await e.sender().deliver("a@client.mxguard.test", ["c@sts-enforce.test"], b"Hi\r\n")
        [again] = await r.build(today(), store=False)
        assert (again.report.successful, again.report.failed) == (1, 0)

    with_engine(s, work)
    reports = [m for m in lab.receiver("mx1.sts-enforce.test").messages
               if m.rcpt_tos == ("tlsrpt@sts-enforce.test",)]  # fmt: skip
    assert len(reports) == 1 and reports[0].tls
    msg = email.message_from_bytes(reports[0].data, policy=email.policy.default)
    assert msg["TLS-Report-Domain"] == "sts-enforce.test"
    assert msg["TLS-Required"] == "No"
    parsed = parsedmarc.parse_report_email(reports[0].data, offline=True)
    assert parsed["report_type"] == "smtp_tls"
    assert parsed["report"]["policies"][0]["successful_session_count"] == 1


def test_https_report_arrives_as_a_post_of_the_gzip_body(lab: Lab, tmp_path: Path) -> None:
    domain = "sts-testing.test"
    set_rua(lab, domain, https_rua(lab, domain))
    s = lab_settings(lab, tmp_path)

    async def work(e: Engine) -> bytes:
        await e.sender().deliver("a@client.mxguard.test", [f"b@{domain}"], b"Hi\r\n")
        r = reporter_for(e)
        [built] = await r.build(today())
        [delivery] = await r.deliver_due()
        assert delivery.delivered_to == https_rua(lab, domain)
        [stored] = await e.store.reports(start=built.pending.start)
        assert stored.delivered_at is not None
        start, end = tr.day_range(today())
        left = await e.store.results_between(start, end, unreported_only=True)
        assert [x for x in left if x.policy_domain == domain] == []
        return built.pending.body

    body = with_engine(s, work)
    [post] = lab.policy_host(domain).posts
    assert post.path == "/report"
    assert post.header("content-type") == "application/tlsrpt+gzip"
    assert post.body == body


def test_failing_endpoint_is_retried_later_and_the_data_stays_until_it_succeeds(
    lab: Lab, tmp_path: Path
) -> None:
    domain = "sts-testing.test"
    set_rua(lab, domain, https_rua(lab, domain))
    s = lab_settings(lab, tmp_path)
    original = lab.scenario.domain(domain)

    async def first(e: Engine) -> None:
        await e.sender().deliver("a@client.mxguard.test", [f"b@{domain}"], b"Hi\r\n")
        r = reporter_for(e)
        await r.build(today())
        # The report endpoint goes away: its name no longer resolves and the host is down.
        lab.update_domain(dataclasses.replace(original, mta_sts=None))
        [failed] = await r.deliver_due()
        assert failed.delivered_to is None and failed.next_attempt_at is not None
        assert failed.next_attempt_at > dt.datetime.now(dt.UTC)
        assert await r.deliver_due() == []  # not before its time
        [pending] = await e.store.reports(pending_only=True)
        assert pending.attempts == 1 and pending.last_error
        start, end = tr.day_range(today())
        assert [x for x in await e.store.results_between(start, end) if x.policy_domain == domain]
        lab.update_domain(original)  # back again
        [ok] = await r.deliver_due(force=True)
        assert ok.delivered_to == https_rua(lab, domain)
        assert await e.store.reports(pending_only=True) == []

    with_engine(s, first)
    assert len(lab.policy_host(domain).posts) == 1


RECORDER = textwrap.dedent(
    """
    import asyncio, sys
    from mxguard.cli import main
    from mxguard.config import load
    from mxguard.engine.context import engine

    async def run():
        async with engine(load(__import__("pathlib").Path(sys.argv[1]))) as e:
            for n in range(3):
                await e.sender().deliver("a@client.mxguard.test", ["b@sts-enforce.test"], b"Hi")
            print("recorded", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(run())
    """
)


def test_killing_the_process_after_recording_loses_no_result(lab: Lab, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    config = tmp_path / "mxguard.toml"
    config.write_text(
        lab.config_file.read_text().replace(
            "[local_rules]", f'store = "sqlite://{db}"\n\n[local_rules]'
        )
        + '\n[tlsrpt]\nsubmitter = "client.mxguard.test"\ndelay_window = 0\n'
    )
    proc = subprocess.Popen([sys.executable, "-c", RECORDER, str(config)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "recorded"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    async def check() -> None:
        store = await open_store(f"sqlite://{db}")
        try:
            start, end = tr.day_range(today())
            results = await store.results_between(start, end)
        finally:
            await store.close()
        assert len(results) == 3

    asyncio.run(check())
    out = subprocess.run(
        [sys.executable, "-m", "mxguard", "--config", str(config), "tlsrpt", "report",
         "--day", today().isoformat(), "--dry-run", "--out", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    import json

    [rep] = json.loads(out.stdout)["reports"]
    assert (rep["policy_domain"], rep["successful"], rep["failed"]) == ("sts-enforce.test", 3, 0)
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".eml", ".gz"]


def test_run_reports_yesterday_survives_sigkill_and_stops_on_sigterm(
    lab: Lab, tmp_path: Path
) -> None:
    import time

    domain = "sts-testing.test"
    rua = https_rua(lab, domain)
    set_rua(lab, domain, rua)
    db = tmp_path / "state.db"
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)

    async def record() -> None:
        from mxguard.adapters.store import SessionResult

        store = await open_store(f"sqlite://{db}")
        try:
            await store.add_results(
                [
                    SessionResult(
                        id=None,
                        at=yesterday,
                        policy_domain=domain,
                        policy_type="sts",
                        policy_strings=("version: STSv1", "mode: testing"),
                        mx_patterns=(f"*.{domain}",),
                        result_type=rt,
                        sending_ip="127.0.0.1",
                        receiving_mx=f"mx.{domain}",
                        receiving_ip="127.0.0.9",
                        receiving_helo=f"mx.{domain}",
                        detail=None,
                        rua=(rua,),
                        is_report=False,
                        reported=None,
                    )
                    for rt in (None, None, "starttls-not-supported")
                ]
            )
        finally:
            await store.close()  # fmt: skip

    asyncio.run(record())

    def start(delay: int) -> subprocess.Popen[str]:
        config = tmp_path / f"mxguard-{delay}.toml"
        config.write_text(
            lab.config_file.read_text().replace(
                "[local_rules]", f'store = "sqlite://{db}"\n\n[local_rules]'
            )
            + f'\n[tlsrpt]\nsubmitter = "client.mxguard.test"\ndelay_window = {delay}\n'
        )
        return subprocess.Popen(
            [sys.executable, "-m", "mxguard", "--config", str(config), "tlsrpt", "run",
             "--poll", "0.2"], stderr=subprocess.PIPE, text=True)  # fmt: skip

    async def reports() -> list[object]:
        store = await open_store(f"sqlite://{db}")
        try:
            return list(await store.reports())
        finally:
            await store.close()

    def wait_for(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.1)

    # First run: builds yesterday's report, whose random delay (up to a day) has not passed;
    # it is killed without warning.
    proc = start(86400)
    wait_for(lambda: len(asyncio.run(reports())) == 1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert lab.policy_host(domain).posts == []
    # Second run: the report is still pending in the store; make it due now, and it is sent.
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tlsrpt_reports SET next_attempt_at = '2000-01-01T00:00:00.000000Z'")
    proc = start(0)
    wait_for(lambda: len(lab.policy_host(domain).posts) == 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    report = tr.parse_report(lab.policy_host(domain).posts[0].body)
    assert (report.successful, report.failed) == (2, 1)
