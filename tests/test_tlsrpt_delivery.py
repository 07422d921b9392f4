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
import random
import signal
import ssl
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import parsedmarc
import pytest
from click.testing import CliRunner

from mxguard.adapters.dns import DnsOutcome
from mxguard.adapters.store import SessionResult, Store, open_store
from mxguard.cli import main
from mxguard.config import Settings
from mxguard.engine.context import Engine, engine
from mxguard.lab.lab import Lab
from mxguard.lab.pki import LabPKI
from mxguard.protocol import tlsrpt_report as tr
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy
from mxguard.tlsrpt.reporter import (
    HttpsPoster,
    PostOutcome,
    Reporter,
    ReporterConfig,
    reporter_for,
)
from tlsrpt_helpers import lab_settings

pytest_plugins = ["servers"]
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
def test_run_reports_yesterday_survives_sigkill_and_stops_on_sigterm(
    lab: Lab, tmp_path: Path
) -> None:

    domain = "sts-testing.test"
    rua = https_rua(lab, domain)
    set_rua(lab, domain, rua)
    db = tmp_path / "state.db"
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)

    async def record() -> None:
        store = await open_store(f"sqlite://{db}")
        try:
            await store.add_results(
                [
                    SessionResult(
                        id=None,
                        at=yesterday,
                        policy_domain=domain,
                        policy=ReportedPolicy(
                            PolicyType.STS,
                            ("version: STSv1", "mode: testing"),
                            (f"*.{domain}",),
                            (rua,),
                        ),
                        result_type=rt,
                        sending_ip="127.0.0.1",
                        receiving_mx=f"mx.{domain}",
                        receiving_ip="127.0.0.9",
                        receiving_helo=f"mx.{domain}",
                        detail=None,
                        is_report=False,
                        reported=None,
                    )
                    for rt in (None, None, ResultType.STARTTLS_NOT_SUPPORTED)
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
             "--poll", "0.2", "--grace", "0"], stderr=subprocess.PIPE, text=True)  # fmt: skip

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


# --- scheduling and delivery rules, on a store with fake endpoints (no lab) -------------------

D = dt.date(2026, 5, 1)
MIDNIGHT = dt.datetime(2026, 5, 2, tzinfo=dt.UTC)  # the end of D
RUA = ("https://r.example.test/tlsrpt",)


def result(
    at: dt.datetime,
    rt: ResultType | None = None,
    domain: str = "example.com",
    rua: tuple[str, ...] = RUA,
) -> SessionResult:
    return SessionResult(
        id=None, at=at, policy_domain=domain, policy=ReportedPolicy(PolicyType.NO_POLICY_FOUND,
        rua=rua), result_type=rt, sending_ip="192.0.2.1", receiving_mx=f"mx.{domain}",
        receiving_ip="198.51.100.1", receiving_helo=None, detail=None, is_report=False,
        reported=None,
    )  # fmt: skip


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@dataclasses.dataclass
class FakePoster:
    """An https: rua that answers `outcome` after `delay` seconds and records every POST."""

    outcome: PostOutcome = dataclasses.field(default_factory=lambda: PostOutcome(True, "200"))
    delay: float = 0.0
    posts: list[bytes] = dataclasses.field(default_factory=list)
    active: int = 0
    most_active: int = 0

    async def post(self, uri: str, body: bytes) -> PostOutcome:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        self.posts.append(body)
        return self.outcome


@dataclasses.dataclass
class FakeMail:
    status: str  # what mxguard's Sender would say: delivered | deferred | failed

    async def deliver(self, mail_from: str, recipients: Sequence[str], data: bytes) -> object:
        return types.SimpleNamespace(status=self.status)


def reporter(
    store: Store, clock: Clock, poster: FakePoster | None = None, **config: Any
) -> Reporter:
    cfg = ReporterConfig("o", "c@sender.example", "mx.sender.example", "r@sender.example",
                         delay_window=0, **config)  # fmt: skip
    return Reporter(store, cfg, mail=FakeMail("delivered"), poster=poster or FakePoster(),
                    clock=clock, rng=random.Random(1))  # fmt: skip


def on_store(work: Callable[[Store], Awaitable[T]], url: str | None = None) -> T:
    async def run() -> T:
        store = await open_store(url or "sqlite:///:memory:")
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def test_a_day_is_built_only_after_the_grace_period() -> None:
    async def work(store: Store) -> None:
        await store.add_results([result(MIDNIGHT - dt.timedelta(hours=1))])
        clock = Clock(MIDNIGHT + dt.timedelta(seconds=5))
        r = reporter(store, clock, grace=3600)
        assert await r.build_due() == []
        clock.now = MIDNIGHT + dt.timedelta(hours=1, seconds=1)
        [built] = await r.build_due()
        assert built.stored and built.pending.start == MIDNIGHT - dt.timedelta(days=1)

    on_store(work)


def test_results_recorded_late_go_into_a_further_report_with_its_own_report_id() -> None:
    async def work(store: Store) -> None:
        clock = Clock(MIDNIGHT + dt.timedelta(hours=2))
        poster = FakePoster()
        r = reporter(store, clock, poster)
        await store.add_results([result(MIDNIGHT - dt.timedelta(hours=14))])
        [first] = await r.build_due()
        assert [d.delivered_to for d in await r.deliver_due()] == [RUA[0]]
        # The collector was behind: a session of 23:59:58 is recorded only now.
        await store.add_results(
            [result(MIDNIGHT - dt.timedelta(seconds=2), ResultType.STARTTLS_NOT_SUPPORTED)]
        )
        clock.now += dt.timedelta(minutes=1)
        [second] = await r.build_due()
        assert second.pending.start == first.pending.start
        assert second.pending.report_id != first.pending.report_id
        assert (second.report.successful, second.report.failed) == (0, 1)
        await r.deliver_due()
        assert [tr.parse_report(b).report_id for b in poster.posts] == [
            first.pending.report_id,
            second.pending.report_id,
        ]
        start, end = tr.day_range(D)
        assert await store.results_between(start, end, unreported_only=True) == []
        assert await r.build_due() == []

    on_store(work)


def test_downtime_over_midnight_skips_no_day_within_the_backfill_window() -> None:
    async def work(store: Store) -> None:
        days = [D - dt.timedelta(days=n) for n in (40, 3, 1, 0)]
        await store.add_results([result(tr.day_range(d)[0] + dt.timedelta(hours=9)) for d in days])
        # Down from D-3 until D+1 03:00: run() catches up with every complete day.
        clock = Clock(MIDNIGHT + dt.timedelta(hours=3))
        r = reporter(store, clock, backfill_days=31)
        stop = asyncio.Event()

        async def stopper() -> None:
            await asyncio.sleep(0.3)
            stop.set()

        await asyncio.gather(r.run(stop, poll=0.05), stopper())
        reported = sorted(p.start.date() for p in await store.reports())
        assert reported == [D - dt.timedelta(days=3), D - dt.timedelta(days=1), D]

    on_store(work)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_reporters_on_one_store_send_each_report_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = str(request.getfixturevalue("postgres_server").create_database())

    async def work() -> None:
        a, b = await open_store(url), await open_store(url)
        try:
            clock = Clock(MIDNIGHT + dt.timedelta(hours=6))
            poster = FakePoster(delay=0.2)
            ra, rb = reporter(a, clock, poster), reporter(b, clock, poster)
            await a.add_results([result(MIDNIGHT - dt.timedelta(hours=5)) for _ in range(3)])
            built = await asyncio.gather(ra.build_due(), rb.build_due())
            # Both may build; only one gets the results (the other's report is refused).
            assert [x.stored for x in built[0] + built[1]].count(True) == 1
            deliveries = await asyncio.gather(ra.deliver_due(), rb.deliver_due())
            assert len(poster.posts) == 1
            assert sum(len(d) for d in deliveries) == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(work())


PERMANENCE = [
    # (rule, rua, mail status, https outcome, dropped)
    ("http_4xx_is_permanent", RUA, "delivered", PostOutcome(False, "404", True), True),
    ("http_429_is_retried", RUA, "delivered", PostOutcome(False, "429"), False),
    ("smtp_5xx_is_permanent", ("mailto:t@example.com",), "failed", PostOutcome(True, ""), True),
    ("smtp_4xx_is_retried", ("mailto:t@example.com",), "deferred", PostOutcome(True, ""), False),
    ("a_bad_address_is_permanent", ("mailto:a%0D%0ABcc:%20x@evil.example%0D%0A@example.com",),
     "delivered", PostOutcome(True, ""), True),
    ("an_unknown_scheme_is_permanent", ("ftp://r.example/x",), "delivered",
     PostOutcome(True, ""), True),
    ("one_temporary_failure_among_permanent_ones_keeps_it",
     ("mailto:t@example.com", *RUA), "failed", PostOutcome(False, "503"), False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rua", "mail", "outcome", "dropped"),
    [r[1:] for r in PERMANENCE],
    ids=[r[0] for r in PERMANENCE],
)
def test_a_report_every_rua_refuses_for_good_is_dropped_others_are_retried(
    rua: tuple[str, ...], mail: str, outcome: PostOutcome, dropped: bool
) -> None:
    async def work(store: Store) -> None:
        clock = Clock(MIDNIGHT + dt.timedelta(hours=2))
        r = reporter(store, clock, FakePoster(outcome))
        r.mail = FakeMail(mail)
        await store.add_results([result(MIDNIGHT - dt.timedelta(hours=1), rua=rua)])
        await r.build_due()
        [d] = await r.deliver_due()
        assert d.delivered_to is None
        assert d.dropped is dropped and (d.next_attempt_at is None) is dropped
        assert len(await store.reports(pending_only=True)) == (0 if dropped else 1)

    on_store(work)


def test_a_report_undeliverable_for_the_give_up_time_is_dropped() -> None:
    async def work(store: Store) -> None:
        clock = Clock(MIDNIGHT + dt.timedelta(hours=2))
        r = reporter(store, clock, FakePoster(PostOutcome(False, "503")), give_up_after=7 * 86400)
        await store.add_results([result(MIDNIGHT - dt.timedelta(hours=1))])
        await r.build_due()
        clock.now += dt.timedelta(days=7) - dt.timedelta(seconds=1)
        [retry] = await r.deliver_due(force=True)
        assert not retry.dropped
        clock.now += dt.timedelta(seconds=1)
        [last] = await r.deliver_due(force=True)
        assert last.dropped
        [p] = await store.reports()
        assert p.dropped_at == clock.now and "undeliverable for 7.0 days" in str(p.last_error)

    on_store(work)


def test_due_reports_are_delivered_concurrently_up_to_the_limit() -> None:
    async def work(store: Store) -> None:
        clock = Clock(MIDNIGHT + dt.timedelta(hours=2))
        poster = FakePoster(delay=0.2)
        r = reporter(store, clock, poster, concurrency=3)
        at = MIDNIGHT - dt.timedelta(hours=1)
        await store.add_results([result(at, domain=f"d{n}.example") for n in range(7)])
        await r.build_due()
        assert len(await r.deliver_due()) == 7
        assert poster.most_active == 3  # concurrent, and never more than the limit

    on_store(work)


def test_report_refuses_a_day_that_is_not_over(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC).date()
    store = ["--store", f"sqlite:///{tmp_path / 'state.db'}"]
    for day in (now, now + dt.timedelta(days=1)):
        out = CliRunner().invoke(main, [*store, "tlsrpt", "report", "--day", day.isoformat()])
        assert out.exit_code == 2 and "is not over yet" in out.output, out.output
    out = CliRunner().invoke(main, [*store, "tlsrpt", "report", "--day", now.isoformat(),
                                    "--dry-run", "--out", str(tmp_path / "out")])  # fmt: skip
    assert out.exit_code == 0, out.output


# --- the HTTPS poster against a real TLS endpoint ---------------------------------------------


class Endpoint:
    """An HTTPS report endpoint on loopback that answers `status` and then a body that never
    ends (it writes until the client hangs up)."""

    def __init__(self, tmp_path: Path, status: int) -> None:
        self.pki = LabPKI(tmp_path / "pki")
        self.identity = self.pki.issue("reports.example.test")
        self.status = status
        self.sent = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))  # fmt: skip
            await reader.readexactly(length)
            writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 1000000000\r\n\r\n".encode())
            while True:
                writer.write(b"x" * 65536)
                self.sent += 65536
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


class FixedDns:
    servers = ("fixed",)

    def __init__(self, address: str) -> None:
        self.address = address

    async def query(self, name: str, rdtype: str) -> Any:
        if rdtype != "A":
            return types.SimpleNamespace(outcome=DnsOutcome.NODATA, records=(), failed=False)
        record = types.SimpleNamespace(address=self.address)
        return types.SimpleNamespace(outcome=DnsOutcome.OK, records=(record,), failed=False)


@pytest.mark.parametrize(
    ("status", "ok", "permanent"),
    [(200, True, False), (202, True, False), (404, False, True), (413, False, True),
     (408, False, False), (429, False, False), (503, False, False)],
)  # fmt: skip
def test_https_poster_reads_a_few_kib_of_the_answer_then_hangs_up(
    tmp_path: Path, status: int, ok: bool, permanent: bool
) -> None:
    endpoint = Endpoint(tmp_path, status)
    host = f"{os.environ.get('MXGUARD_TEST_LAB_NET', '127.228')}.9.1"

    async def work() -> PostOutcome:
        server = await asyncio.start_server(
            endpoint.handle, host, 0, ssl=endpoint.identity.server_context()
        )
        port = server.sockets[0].getsockname()[1]
        poster = HttpsPoster(FixedDns(host), endpoint.pki.ca_file, timeout=5)  # type: ignore[arg-type]
        try:
            return await poster.post(f"https://reports.example.test:{port}/r", b"\x1f\x8bbody")
        finally:
            server.close()

    outcome = asyncio.run(work())
    assert (outcome.ok, outcome.permanent) == (ok, permanent), outcome.detail
    assert endpoint.sent < 64 * 1024 * 1024  # it stopped reading: it did not take the 1 GB
