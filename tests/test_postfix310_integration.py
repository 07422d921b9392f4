"""Postfix 3.10 and Postfix 3.7 side by side, each driven by `mxguard serve postfix`.

Postfix 3.10 (Debian 13's, from the root of `scripts/trixie-root`, tests/postfix310_harness.py)
takes mxguard's `--tlsrpt-attributes` answers (`policy_type=sts policy_domain=…
mx_host_pattern=… { policy_string = … }`), enforces the MTA-STS MX
patterns itself (`smtp_tls_enforce_sts_mx_patterns = yes`) and reports every TLS handshake
over libtlsrpt to `mxguard tlsrpt collect --socket … --log …`, run here as the command an
operator runs: it records those events, and from Postfix 3.10's log the sessions they leave
out (plain text under MTA-STS `testing`: smtp_proto.c reports a missing or refused STARTTLS
only where TLS is required). The host's Postfix 3.7 gets the plain answers, and its log goes
through the log collector (`tlsrpt collect-postfix`'s Collector). Every case below is
delivered once by each, with the same attacks in front of the same MX hosts:

- the outcome each Postfix logs, what the receivers got and what the STRIPTLS attacker saw;
- the MX host an MTA-STS policy does not list: Postfix 3.10 never connects to it, 3.7 does
  (and then refuses its certificate, because mxguard names only the listed hosts in `match=`);
- the report built from Postfix 3.10's own events and the log supplement counts exactly the
  sessions Postfix made, per policy and result type, and equals what the log collector counts
  on 3.7, except where the two Postfix versions do different things: the unlisted MX host
  (3.7 makes one session more).

The lab is changed for the module and put back afterwards: `dane-mismatch.test` and
`sts-404.test` publish a TLS-RPT record (Postfix reports only domains that have one), and
`sts-bad-cert-mx.test` publishes one and an MTA-STS policy that lists only its backup MX host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.store import SessionResult
from mxguard.adapters.store.sqlite import SQLiteStore
from mxguard.config import load
from mxguard.engine.context import engine
from mxguard.lab.attacker import AttackSession
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import Domain, Scenario
from mxguard.lab.smtp_receiver import ReceivedMessage
from mxguard.postfix.options import options_from
from mxguard.postfix.server import PolicyServer
from mxguard.protocol import tlsrpt_report
from mxguard.protocol.tlsrpt_report import PolicyType
from mxguard.tlsrpt.collector import REPORTED_BY_POSTFIX, Collector, EnginePolicies

pytest.register_assert_rewrite("postfix_harness", "postfix310_harness")

import postfix310_harness  # noqa: E402
import postfix_harness  # noqa: E402
from postfix310_harness import Postfix310Instance, mail_version, postfix_gid  # noqa: E402
from postfix_harness import Outcome, PostfixInstance, Submission  # noqa: E402

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# No retries within the module: a deferred message is deleted right after its first attempt,
# and a retry before that must not add sessions to the count.
NO_RETRY = {"minimal_backoff_time": "300s", "maximal_backoff_time": "600s"}
UNLISTED = "sts-bad-cert-mx.test"  # its policy lists only mx2 here; mx1 (priority 10) is out


@dataclass(frozen=True)
class Case:
    name: str
    domain: str
    attack: str  # AttackMode of every MX host of the domain during the delivery


CASES = (
    Case("sts-enforce-honest", "sts-enforce.test", "pass"),
    Case("sts-enforce-stripped", "sts-enforce.test", "strip"),
    Case("sts-unlisted-mx", UNLISTED, "pass"),
    Case("sts-testing-stripped", "sts-testing.test", "strip"),
    # STARTTLS offered, then refused (454): under `testing` both go on in plain text.
    Case("sts-testing-454", "sts-testing.test", "454"),
    # No policy can be fetched and none is cached: no policy (RFC 8461 §5), NOTFOUND.
    Case("sts-fetch-error", "sts-404.test", "pass"),
    Case("dane-honest", "dane-ee.test", "pass"),
    Case("dane-mismatch", "dane-mismatch.test", "pass"),
)

# case -> (status, how the message reached the receiver: "tls", "plain" or None), both Postfix
OUTCOMES = {
    "sts-enforce-honest": ("sent", "tls"),
    "sts-enforce-stripped": ("deferred", None),
    "sts-unlisted-mx": ("sent", "tls"),
    "sts-testing-stripped": ("sent", "plain"),
    "sts-testing-454": ("sent", "plain"),
    "sts-fetch-error": ("sent", "tls"),
    "dane-honest": ("sent", "tls"),
    "dane-mismatch": ("deferred", None),
}
PROTECTED = ("sts-enforce-honest", "sts-enforce-stripped", "dane-honest", "dane-mismatch")

# case -> what Postfix 3.10 reported: (policy type, result type or None) per datagram
REPORTED_310 = {
    "sts-enforce-honest": [("sts", None)],
    "sts-enforce-stripped": [("sts", "starttls-not-supported")] * 2,
    "sts-unlisted-mx": [("sts", None)],  # mx2 only: mx1 was never contacted
    "sts-testing-stripped": [],  # TLS was optional and did not happen: nothing is reported
    "sts-testing-454": [],  # the same: a refused STARTTLS is reported only where TLS is required
    "sts-fetch-error": [("no-policy-found", None)],
    "dane-honest": [("tlsa", None)],
    # Postfix says certificate-not-trusted; recorded as mxguard names it (datagram.py).
    "dane-mismatch": [("tlsa", "validation-failure")],
}
# case -> what the log supplement recorded from Postfix 3.10's log: the sessions left out
LEFT_OUT_310 = {
    "sts-testing-stripped": [("sts", "starttls-not-supported")],
    "sts-testing-454": [("sts", "starttls-not-supported")],
}


@dataclass(frozen=True)
class Attempt:
    """One case delivered by one Postfix."""

    case: Case
    submission: Submission
    outcome: Outcome
    received: tuple[ReceivedMessage, ...]  # messages with the marker, at any MX host
    attacked: tuple[tuple[str, AttackSession], ...]  # (MX host, session) from this Postfix
    datagram_results: tuple[SessionResult, ...] = ()  # what `tlsrpt collect` recorded (3.10)
    log_results: tuple[SessionResult, ...] = ()  # what its log supplement recorded (3.10)

    def attacker_saw(self, data: bytes) -> bool:
        return any(data in s.client_bytes or data in s.server_bytes for _, s in self.attacked)

    def contacted(self) -> set[str]:
        return {host for host, _ in self.attacked}


@dataclass
class Run:
    version: str
    pf310: dict[str, Attempt]
    pf37: dict[str, Attempt]
    log310: list[str]
    collect_stats: dict[str, Any]  # the final JSON line of `mxguard tlsrpt collect`
    results310: list[SessionResult]  # everything `tlsrpt collect` stored (events and log)
    results37: list[SessionResult]  # everything the log collector stored from 3.7's log
    answers: dict[str, str]  # domain -> what the attribute-sending policy server answered
    address310: str  # where Postfix 3.10 sends from


def suite_address_310(lab: Lab, host: int) -> str:
    return f"{lab.resolver_address.rsplit('.', 2)[0]}.200.{host}"


class CollectCommand:
    """`mxguard --config LAB --store URL tlsrpt collect --socket PATH --group GID --log FILE
    --state FILE --poll 0.2 --json` as a process, on the store of Postfix 3.10's policy server
    (the log supplement reports under the policy it served)."""

    def __init__(
        self, socket_path: Path, db: Path, group: int, *, config: Path, log: Path, state: Path
    ) -> None:
        self.socket_path, self.db, self.group = socket_path, db, group
        self.config, self.log, self.state = config, log, state
        self.process: subprocess.Popen[str] | None = None
        self.stats: dict[str, Any] = {}
        self.stderr = ""
        self.returncode: int | None = None

    def __enter__(self) -> CollectCommand:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mxguard", "--config", str(self.config), "--store",
             f"sqlite:///{self.db}", "tlsrpt", "collect", "--socket", str(self.socket_path),
             "--group", str(self.group), "--log", str(self.log), "--state", str(self.state),
             "--poll", "0.2", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"tlsrpt collect did not start: {self.stderr}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, self.stderr = self.process.communicate(timeout=30)
        self.returncode = self.process.returncode
        self.process = None
        with contextlib.suppress(ValueError):
            self.stats = json.loads(out)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self) -> int:
        if not self.db.exists():
            return 0
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            try:
                return int(conn.execute("SELECT count(*) FROM session_results").fetchone()[0])
            except sqlite3.OperationalError:  # the schema is not there yet
                return 0


def all_results(db: Path) -> list[SessionResult]:
    async def read() -> list[SessionResult]:
        store = await SQLiteStore.open(str(db))
        try:
            now, far = dt.datetime.now(dt.UTC), dt.timedelta(days=30)
            results = await store.results_between(now - far, now + far, unreported_only=False)
            return sorted(results, key=lambda r: r.id or 0)
        finally:
            await store.close()

    return asyncio.run(read())


def tlsrpt_lines(outcome: Outcome) -> list[str]:
    """Postfix 3.10 logs each event it reports: `TLSRPT: status=…, domain=…, …`."""
    return [line for line in outcome.lines if "TLSRPT: status=" in line]


def deliver(
    lab: Lab, postfix: PostfixInstance, case: Case, collector: CollectCommand | None
) -> Attempt:
    hosts = [h.name for h in lab.scenario.domain(case.domain).hosts]
    lab.clear_records()
    for host in hosts:
        lab.set_attack(host, case.attack)
    before = collector.count() if collector is not None else 0
    submission, outcome = postfix.deliver(f"postmaster@{case.domain}")
    results: list[SessionResult] = []
    if collector is not None:
        # Each event Postfix logged is a datagram the collector writes within a second or so;
        # each session left out, a result of the log supplement within a poll (0.2 s).
        wanted = before + len(tlsrpt_lines(outcome)) + len(LEFT_OUT_310.get(case.name, []))
        deadline = time.monotonic() + 15
        while collector.count() < wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        results = all_results(collector.db)[before:]
    marker = submission.marker.encode()
    return Attempt(
        case=case,
        submission=submission,
        outcome=outcome,
        received=tuple(
            m for host in hosts for m in lab.receiver(host).messages if marker in m.data
        ),
        attacked=tuple(
            (host, s)
            for host in hosts
            for s in lab.attacker(host).sessions
            if s.peer.startswith(postfix.address + ":")
        ),
        datagram_results=tuple(r for r in results if from_datagram(r)),
        log_results=tuple(r for r in results if not from_datagram(r)),
    )


def from_datagram(r: SessionResult) -> bool:
    """Recorded from one of Postfix's events, not from its log (datagram.py's detail)."""
    return (r.detail or "").startswith("Postfix TLSRPT")


def changed_domains(scenario: Scenario) -> list[Domain]:
    """The module's lab changes: TLS-RPT records, and a policy without sts-bad-cert-mx's mx1."""
    out = []
    for name in ("dane-mismatch.test", "sts-404.test", UNLISTED):
        d = scenario.domain(name)
        d = dataclasses.replace(d, tlsrpt=(f"v=TLSRPTv1; rua=mailto:tlsrpt@{name}",))
        if name == UNLISTED:
            assert d.mta_sts is not None
            d = dataclasses.replace(
                d, mta_sts=dataclasses.replace(d.mta_sts, mx=(f"mx2.{UNLISTED}",))
            )
        out.append(d)
    return out


def collect_37_log(lab: Lab, log: Path, server_db: Path, work: Path) -> list[SessionResult]:
    """The log collector over 3.7's log, joined with what its policy server served."""
    domains = {c.domain for c in CASES}
    deadline = time.monotonic() + 10
    while True:  # the server's writer flushes served records every half second
        with contextlib.closing(sqlite3.connect(server_db)) as conn:
            seen = {row[0] for row in conn.execute("SELECT DISTINCT domain FROM served_policies")}
        if seen >= domains or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    db = work / "collected37.db"
    with (
        contextlib.closing(sqlite3.connect(server_db)) as src,
        contextlib.closing(sqlite3.connect(db)) as dst,
    ):
        src.backup(dst)
    settings = load(lab.config_file).with_overrides(store=f"sqlite:///{db}")

    async def run() -> None:
        async with engine(settings) as e:
            c = Collector(log, e.store, EnginePolicies(e.resolver), state_path=work / "state",
                          sending_ip=None)  # fmt: skip
            await c.collect()

    asyncio.run(run())
    return all_results(db)


@pytest.fixture(scope="module")
def run(
    session_lab: Lab, standard_scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    for reason in (postfix_harness.skip_reason(), postfix310_harness.skip_reason()):
        if reason is not None:
            pytest.skip(reason)
    if session_lab.ports.smtp != 25:
        pytest.skip("Postfix delivers to port 25: the lab must run as root")
    lab = session_lab
    root = postfix310_harness.trixie_root()
    state = tmp_path_factory.mktemp("postfix310-integration")
    settings = load(lab.config_file)
    with_attrs = settings.with_overrides(store=f"sqlite:///{state / 'policy310.db'}")
    plain = settings.with_overrides(store=f"sqlite:///{state / 'policy37.db'}")
    # Under /tmp with short names: Postfix's daemons must enter them (pytest's folders are
    # 0700), and the socket's path must fit in sun_path.
    work310 = Path(tempfile.mkdtemp(prefix="mxg-pfi310-"))
    work37 = Path(tempfile.mkdtemp(prefix="mxg-pfi37-"))
    socket_path = work310 / "tlsrpt.sock"
    log310 = work310 / "maillog"  # postfix_harness's maillog_file, there before Postfix starts
    log310.touch(mode=0o644)
    for d in changed_domains(standard_scenario):
        lab.update_domain(d)
    try:
        with (
            PolicyServer(
                with_attrs,
                listen=f"inet:{suite_address_310(lab, 12)}:0",
                options=options_from(with_attrs, tlsrpt_attributes=True),
            ) as server310,
            PolicyServer(
                plain, listen=f"inet:{postfix_harness.suite_address(lab, 12)}:0"
            ) as server37,
            CollectCommand(
                socket_path,
                state / "policy310.db",
                postfix_gid(root),
                config=lab.config_file,
                log=log310,
                state=state / "log310-state",
            ) as collector,
        ):
            h310, p310 = server310.socketmap_address
            h37, p37 = server37.socketmap_address
            with (
                Postfix310Instance(
                    root,
                    work310,
                    address=suite_address_310(lab, 11),
                    resolver=lab.resolver_address,
                    ca_file=lab.ca_file,
                    tlsrpt_socket=socket_path,
                    tls_policy_maps=f"socketmap:inet:{h310}:{p310}:postfix",
                    extra_main_cf={"smtp_tls_enforce_sts_mx_patterns": "yes", **NO_RETRY},
                ) as pf310,
                PostfixInstance(
                    work37,
                    address=postfix_harness.suite_address(lab, 11),
                    resolver=lab.resolver_address,
                    ca_file=lab.ca_file,
                    tls_policy_maps=f"socketmap:inet:{h37}:{p37}:postfix",
                    extra_main_cf=NO_RETRY,
                ) as pf37,
            ):
                attempts310: dict[str, Attempt] = {}
                attempts37: dict[str, Attempt] = {}
                try:
                    for case in CASES:
                        attempts310[case.name] = deliver(lab, pf310, case, collector)
                        attempts37[case.name] = deliver(lab, pf37, case, None)
                finally:
                    for host in lab.scenario.hosts():
                        lab.set_attack(host.name, standard_scenario.host(host.name).attack)
                    lab.clear_records()
                assert pf310.log_file == log310
                lines310 = pf310.log_lines()
                log37 = state / "maillog37"
                shutil.copyfile(pf37.log_file, log37)
                answers = {
                    c.domain: (a.socketmap().decode() if (a := server310.cached(c.domain)) else "")
                    for c in CASES
                }
                version = mail_version(root)
                # While Postfix 3.10's folder (socket, log) is still there: its last read.
                collector.stop()
            assert collector.returncode == 0, collector.stderr
            assert "warning" not in collector.stderr.lower(), collector.stderr
        results37 = collect_37_log(lab, log37, state / "policy37.db", state)
        yield Run(
            version=version,
            pf310=attempts310,
            pf37=attempts37,
            log310=lines310,
            collect_stats=collector.stats,
            results310=all_results(state / "policy310.db"),
            results37=results37,
            answers=answers,
            address310=suite_address_310(lab, 11),
        )
    finally:
        for d in changed_domains(standard_scenario):
            lab.update_domain(standard_scenario.domain(d.name))
        shutil.rmtree(work37, ignore_errors=True)


# --- what each Postfix did --------------------------------------------------------------------


def test_it_is_postfix_310_with_mxguards_attributes(run: Run) -> None:
    assert run.version.startswith("3.10.")
    assert " policy_type=sts policy_domain=sts-enforce.test " in run.answers["sts-enforce.test"]
    assert "mx_host_pattern=mx2.sts-bad-cert-mx.test" in run.answers[UNLISTED]
    assert run.answers["sts-404.test"] == "NOTFOUND "
    assert run.answers["dane-ee.test"] == "OK dane-only"  # Postfix reports DANE itself


@pytest.mark.parametrize("postfix", ["3.10", "3.7"])
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_each_postfix_delivers_only_as_the_policy_allows(run: Run, name: str, postfix: str) -> None:
    a = (run.pf310 if postfix == "3.10" else run.pf37)[name]
    status, how = OUTCOMES[name]
    detail = f"{name} on Postfix {postfix}:\n{a.outcome.text()}"
    assert a.outcome.status == status, detail
    if how is None:
        assert a.received == (), detail
    else:
        assert [m.tls for m in a.received] == [how == "tls"], detail
    if how == "tls" and name != "sts-fetch-error":
        assert a.outcome.verified, detail


@pytest.mark.parametrize("name", PROTECTED)
def test_the_attacker_sees_no_envelope_from_postfix_310(run: Run, name: str) -> None:
    a = run.pf310[name]
    assert a.attacked, f"{name}: Postfix 3.10's connection did not pass the attacker"
    assert not a.attacker_saw(b"MAIL FROM"), name
    assert not a.attacker_saw(a.submission.marker.encode()), name


def test_enforce_stripped_tries_both_mx_hosts_and_defers(run: Run) -> None:
    a = run.pf310["sts-enforce-stripped"]
    assert a.contacted() == {"mx1.sts-enforce.test", "mx2.sts-enforce.test"}
    assert all(s.stripped for _, s in a.attacked)
    assert "TLS is required, but was not offered" in a.outcome.reason


def test_testing_stripped_is_delivered_in_plain_text(run: Run) -> None:
    a = run.pf310["sts-testing-stripped"]
    assert any(s.stripped for _, s in a.attacked) and a.attacker_saw(b"MAIL FROM")
    b = run.pf310["sts-testing-454"]  # STARTTLS offered, refused: in plain text all the same
    assert b.attacker_saw(b"STARTTLS") and b.attacker_saw(b"MAIL FROM")


def test_postfix_310_never_connects_to_an_mx_host_the_policy_does_not_list(run: Run) -> None:
    # RFC 8461 §4.1: only MX hosts matching the policy's `mx` patterns may be used. Postfix
    # 3.10.5+ does that itself from mxguard's mx_host_pattern attributes.
    a = run.pf310["sts-unlisted-mx"]
    assert a.contacted() == {f"mx2.{UNLISTED}"}, a.outcome.text()
    assert a.outcome.relay.startswith(f"mx2.{UNLISTED}[")
    warning = f"MX name 'mx1.{UNLISTED}' does not match STS MX pattern for '{UNLISTED}'"
    assert any(warning in line for line in run.log310), warning
    # Postfix 3.7 has no such rule: it connects to mx1, and only mxguard's match= (the listed
    # hosts by name) keeps it from delivering there.
    b = run.pf37["sts-unlisted-mx"]
    assert b.contacted() == {f"mx1.{UNLISTED}", f"mx2.{UNLISTED}"}, b.outcome.text()
    assert b.outcome.relay.startswith(f"mx2.{UNLISTED}[")


def test_postfix_310_takes_every_answer_without_complaint(run: Run) -> None:
    # An attribute Postfix does not accept makes it treat the whole answer as invalid (and
    # log a warning); the only warning expected is the unlisted MX host's.
    warnings = [
        line
        for line in run.log310
        if "warning:" in line and "does not match STS MX pattern" not in line
    ]
    assert warnings == []


# --- what was reported ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_each_event_postfix_310_reported_is_recorded_once(run: Run, name: str) -> None:
    a = run.pf310[name]
    got = [(r.policy_type.value, r.result_text) for r in a.datagram_results]
    assert sorted(got, key=str) == sorted(REPORTED_310[name], key=str), a.outcome.text()
    assert len(tlsrpt_lines(a.outcome)) == len(got)
    assert {r.policy_domain for r in a.datagram_results} <= {a.case.domain}
    for r in a.datagram_results:
        if r.result_type is not None:
            assert r.sending_ip == run.address310 and r.receiving_ip, r
            assert r.receiving_mx in a.contacted(), r


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_the_log_supplies_exactly_the_sessions_postfix_310_left_out(run: Run, name: str) -> None:
    a = run.pf310[name]
    got = [(r.policy_type.value, r.result_text) for r in a.log_results]
    assert got == LEFT_OUT_310.get(name, []), a.outcome.text()
    # Every session Postfix made is counted once: its own event, or else the log's.
    assert len(a.datagram_results) + len(a.log_results) == len(a.attacked), name
    for r in a.log_results:
        assert r.policy_domain == a.case.domain and r.receiving_mx in a.contacted(), r
        assert r.receiving_ip == a.outcome.relay.split("[")[1].split("]")[0], r


def test_the_collector_counted_what_it_stored(run: Run) -> None:
    stats = run.collect_stats
    assert stats["events"] == stats["written"] == sum(map(from_datagram, run.results310))
    assert stats["malformed"] == {} and stats["dropped"] == 0
    assert len(run.results310) == sum(
        len(a.datagram_results) + len(a.log_results) for a in run.pf310.values()
    )
    # The log: every other session was Postfix's own event (it logged each one it reported).
    log = stats["log"]
    assert log["sessions"] == sum(len(v) for v in LEFT_OUT_310.values())
    assert log["dropped"] == {REPORTED_BY_POSTFIX: stats["events"]}
    assert sum(log["policies"].values()) == log["sessions"]  # served (or, if not yet written,
    # resolved again: the policy server writes what it served every half second)


Summary = dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], tuple[int, Counter[str]]]


def summary(results: Sequence[SessionResult]) -> Summary:
    """The reports of `results`: per (domain, policy type, policy strings, MX patterns) the
    successful sessions and the failed ones by result type."""
    out: Summary = {}
    day = results[0].at.date() if results else dt.date.today()
    for report in tlsrpt_report.aggregate(
        results, day=day, organization_name="o", contact_info="c"
    ):
        for p in report.policies:
            key = (p.policy_domain, p.policy.policy_type.value, p.policy.policy_strings,
                   p.policy.mx_patterns)  # fmt: skip
            failed: Counter[str] = Counter()
            for d in p.failure_details:
                failed[str(d.result_type)] += d.failed_session_count
            assert sum(failed.values()) == p.failed
            out[key] = (p.successful, failed)
    return out


def test_the_report_from_postfix_310s_events_equals_the_log_collectors_on_postfix_37(
    run: Run,
) -> None:
    ours = summary(run.results310)
    theirs = summary(run.results37)
    # Where the two Postfix versions really do differ (module docstring): 3.7 connects to the
    # unlisted mx1 and fails its (expired) certificate.
    expected_only_37 = {(UNLISTED, "certificate-expired"): 1}
    for key in set(ours) | set(theirs):
        domain = key[0]
        ok310, failed310 = ours.get(key, (0, Counter()))
        ok37, failed37 = theirs.get(key, (0, Counter()))
        for (d, result_type), n in expected_only_37.items():
            if d == domain and failed37[result_type] >= n:
                failed37 = failed37 - Counter({result_type: n})
        assert (ok310, failed310) == (ok37, failed37), (key, ours, theirs)
    # The same policies, as Postfix 3.10 and mxguard named them and as mxguard served 3.7.
    assert set(ours) == set(theirs)
    assert {k[0] for k in ours} == {c.domain for c in CASES}
    assert sum(ok for ok, _ in ours.values()) == 4  # enforce, unlisted, fetch error, DANE
    # enforce stripped twice, DANE mismatch; testing stripped and 454, from the log
    assert sum(sum(f.values()) for _, f in ours.values()) == 5
    testing = [k for k in ours if k[0] == "sts-testing.test"]
    assert [ours[k] for k in testing] == [(0, Counter({"starttls-not-supported": 2}))]
    tlsa = [k for k in ours if k[1] == PolicyType.TLSA.value]
    assert {k[0] for k in tlsa} == {"dane-ee.test", "dane-mismatch.test"}
