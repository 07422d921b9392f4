"""`mxguard tlsrpt summary`: is a domain ready for MTA-STS enforce? (owner/summary.py)

One row per rule of docs/reports-rollout.md, "What blocks": pure cases over received reports
(what `ReportInbox.received_between` gives back), then the same through a real SQLite report
inbox (the window's edges, a resent report counted once, a report about two domains), and
`summarise` with a check written down here (the lab end to end, tests/test_rollout_lab.py,
makes a real one).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mxguard.adapters.dkim import DkimResult
from mxguard.adapters.store import ReceivedRecord, ReportSource, open_store
from mxguard.audit.model import (
    DomainCheck,
    Finding,
    MxLookupView,
    Observations,
    Protection,
    Severity,
    TxtLookup,
    Verdict,
)
from mxguard.config import Settings
from mxguard.engine.policy import DeliveryPolicy, Source, Status, StsState
from mxguard.owner import summary as sm
from mxguard.owner.summary import BlockerSource, Category, HostState
from mxguard.protocol import mtasts
from mxguard.protocol.mtasts import Mode
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_ingest import ReceivedPolicy, ReceivedReport
from mxguard.protocol.tlsrpt_report import FailureDetail, PolicyType

D = "example.com"
MX, MX2 = "mx1.example.com", "mx2.example.com"
NOW = dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.UTC)
YESTERDAY = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
STS_LINES = ("version: STSv1", "mode: testing", "mx: *.example.com", "max_age: 86400")
POLICY = mtasts.parse_policy("version: STSv1\r\nmode: enforce\r\nmx: *.example.com\r\n"
                             "max_age: 1209600\r\n")  # fmt: skip
START, END = sm.window(NOW, 1)

SNS = ResultType.STARTTLS_NOT_SUPPORTED
MISMATCH = ResultType.CERTIFICATE_HOST_MISMATCH
EXPIRED = ResultType.CERTIFICATE_EXPIRED
VF = ResultType.VALIDATION_FAILURE
WEBPKI = ResultType.STS_WEBPKI_INVALID


def detail(kind: ResultType | str, count: int, mx: str | None = MX, **kw: Any) -> FailureDetail:
    return FailureDetail(kind, "192.0.2.1", mx, "203.0.113.25", mx, count, **kw)


def policy(
    ok: int, *details: FailureDetail, kind: PolicyType | str = PolicyType.STS, domain: str = D
) -> ReceivedPolicy:
    failed = sum(d.failed_session_count for d in details)
    strings = STS_LINES if kind == PolicyType.STS else ()
    mx = ("*.example.com",) if kind == PolicyType.STS else ()
    return ReceivedPolicy(kind, strings, domain, mx, ok, failed, details)


def received(
    *policies: ReceivedPolicy,
    org: str = "Sender Inc.",
    start: dt.datetime = YESTERDAY,
    report_id: str = "r-1",
    dkim: bool = True,
) -> ReceivedRecord:
    report = ReceivedReport(org, start, start + dt.timedelta(days=1, seconds=-1),
                            "mailto:tlsrpt@sender.example", report_id, policies)  # fmt: skip
    signature = DkimResult(dkim, "sender.example", "s1", "verified" if dkim else "unsigned")
    return ReceivedRecord(report, b"{}", NOW, ReportSource.MAIL, signature)


def ev(*records: ReceivedRecord) -> sm.ReportEvidence:
    return sm.evidence(D, records, START, END)


def decided(
    *records: ReceivedRecord,
    check: Sequence[str] = (),
    hosts: dict[str, HostState] | None = None,
    policy_: mtasts.Policy | None = POLICY,
) -> sm.Decision:
    return sm.decide(ev(*records), policy_, check, hosts or {}, days=1)


# --- which result types block ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy_type", "result_type", "category"),
    [
        (PolicyType.STS, MISMATCH, Category.CERTIFICATE),
        (PolicyType.STS, EXPIRED, Category.CERTIFICATE),
        (PolicyType.STS, ResultType.CERTIFICATE_NOT_TRUSTED, Category.CERTIFICATE),
        (PolicyType.STS, VF, Category.CERTIFICATE),
        (PolicyType.NO_POLICY_FOUND, EXPIRED, Category.CERTIFICATE),  # the MX cert is bad
        (PolicyType.TLSA, EXPIRED, Category.DANE),  # judged by TLSA, not by WebPKI
        (PolicyType.TLSA, VF, Category.DANE),
        (PolicyType.STS, SNS, Category.STARTTLS),
        (PolicyType.NO_POLICY_FOUND, SNS, Category.STARTTLS),
        (PolicyType.STS, WEBPKI, Category.STS_POLICY),
        (PolicyType.STS, ResultType.STS_POLICY_FETCH_ERROR, Category.STS_POLICY),
        (PolicyType.STS, ResultType.STS_POLICY_INVALID, Category.STS_POLICY),
        (PolicyType.NO_POLICY_FOUND, ResultType.STS_POLICY_FETCH_ERROR, Category.STS_DISCOVERY),
        (PolicyType.TLSA, ResultType.TLSA_INVALID, Category.DANE),
        (PolicyType.STS, ResultType.DNSSEC_INVALID, Category.DANE),
        (PolicyType.TLSA, ResultType.DANE_REQUIRED, Category.DANE),
        (PolicyType.STS, "a-future-result-type", Category.OTHER),
        ("a-future-policy-type", EXPIRED, Category.CERTIFICATE),
    ],
)  # fmt: skip
def test_each_result_type_under_each_policy_type_has_one_category(
    policy_type: PolicyType | str, result_type: ResultType | str, category: Category
) -> None:
    assert sm.classify(policy_type, result_type) is category


def test_only_certificate_coverage_and_policy_failures_block() -> None:
    assert {c for c in Category if c.blocks} == {
        Category.CERTIFICATE, Category.MX_NOT_COVERED, Category.STS_POLICY,
    }  # fmt: skip


# --- the decision ----------------------------------------------------------------------------


def test_no_report_in_the_window_is_no_evidence_yet() -> None:
    d = decided()
    assert not d.ready
    [b] = d.blockers
    assert b.source is BlockerSource.EVIDENCE and "no evidence yet" in b.what
    assert "tlsrpt fetch" in b.fix


def test_reports_without_a_session_are_no_evidence_either() -> None:
    [b] = decided(received(policy(0))).blockers
    assert b.source is BlockerSource.EVIDENCE and "counts a session" in b.what


def test_clean_reports_and_a_clean_check_are_ready() -> None:
    d = decided(received(policy(120)), received(policy(30), org="Other", report_id="r-2"))
    assert d.ready and d.blockers == () and d.signals == () and d.warnings == ()


def test_a_certificate_failure_blocks_naming_sessions_senders_mx_and_the_fix() -> None:
    d = decided(
        received(policy(10, detail(MISMATCH, 3))),
        received(policy(5, detail(MISMATCH, 1)), org="Big Mail", report_id="r-2"),
    )
    [b] = d.blockers
    assert b.source is BlockerSource.REPORTS
    assert (b.result_type, b.sessions, b.mx_hosts) == ("certificate-host-mismatch", 4, (MX,))
    assert b.senders == ("Sender Inc.", "Big Mail")  # most sessions first
    assert "certificate-host-mismatch at mx1.example.com: 4 failed sessions" in b.what
    assert "'Sender Inc.' (3), 'Big Mail' (1)" in b.what
    assert "subjectAltName names mx1.example.com" in b.fix
    assert b.text == f"{b.what}. Fix: {b.fix}"


@pytest.mark.parametrize(
    ("kind", "fix"),
    [
        (EXPIRED, "renew the certificate"),
        (ResultType.CERTIFICATE_NOT_TRUSTED, "from a CA senders trust"),
        (VF, "mxguard check example.com"),
    ],
)
def test_each_certificate_failure_has_its_own_fix(kind: ResultType, fix: str) -> None:
    [b] = decided(received(policy(1, detail(kind, 2)))).blockers
    assert fix in b.fix


def test_starttls_missing_on_the_path_is_a_signal_of_stripping_not_a_blocker() -> None:
    d = decided(received(policy(50, detail(SNS, 2))),
                hosts={MX: HostState(starttls=True, certificate=True)})  # fmt: skip
    assert d.ready
    [signal] = d.signals
    assert "starttls-not-supported at mx1.example.com: 2 failed sessions" in signal
    assert "STRIPTLS" in signal and "Not a blocker" in signal


def test_starttls_missing_where_the_check_sees_none_either_points_at_the_checks_blocker() -> None:
    check = [f"{MX} [192.0.2.1] does not offer STARTTLS: under enforce senders refuse it"]
    d = decided(received(policy(50, detail(SNS, 2))), check=check,
                hosts={MX: HostState(starttls=False, certificate=False)})  # fmt: skip
    assert not d.ready
    [b] = d.blockers
    assert b.source is BlockerSource.CHECK and "does not offer STARTTLS" in b.what
    assert "no STARTTLS on mx1.example.com either" in d.signals[0]


def test_a_policy_failure_of_senders_holding_the_policy_blocks() -> None:
    d = decided(received(policy(10, detail(WEBPKI, 4, mx=None))))
    [b] = d.blockers
    assert b.result_type == "sts-webpki-invalid" and b.sessions == 4 and b.mx_hosts == ()
    assert "cannot refresh it" in b.what
    assert "https://mta-sts.example.com/.well-known/mta-sts.txt" in b.fix


def test_a_policy_failure_of_senders_without_the_policy_is_a_warning() -> None:
    fetch_error = detail(ResultType.STS_POLICY_FETCH_ERROR, 2, mx=None)
    d = decided(received(policy(10, fetch_error, kind=PolicyType.NO_POLICY_FOUND)))
    assert d.ready
    [w] = d.warnings
    assert "found the _mta-sts record but got no policy" in w


def test_failures_of_dane_senders_are_warnings_enforce_does_not_change_them() -> None:
    d = decided(received(policy(10, detail(VF, 2), kind=PolicyType.TLSA)))
    assert d.ready
    assert "DANE overrides MTA-STS" in d.warnings[0]


def test_any_failure_at_an_mx_host_the_policy_misses_is_a_coverage_blocker() -> None:
    narrow = mtasts.parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\n"
                                 "max_age: 1209600\r\n")  # fmt: skip
    d = decided(received(policy(10, detail(SNS, 1, mx=MX2), detail(EXPIRED, 2, mx=MX2))),
                policy_=narrow)  # fmt: skip
    [b] = d.blockers
    assert b.mx_hosts == (MX2,) and b.sessions == 3 and b.result_type is None
    assert "matches no mx pattern" in b.what
    assert "starttls-not-supported, certificate-expired" in b.what
    assert "mxguard sts publish --mx" in b.fix
    # Under the wider policy the same failures are what they are.
    kinds = {b.result_type for b in decided(received(policy(10, detail(EXPIRED, 2, mx=MX2))))
             .blockers}  # fmt: skip
    assert kinds == {"certificate-expired"}


def test_an_unknown_result_type_is_a_warning() -> None:
    d = decided(received(policy(10, detail("a-future-result-type", 1))))
    assert d.ready and "does not know" in d.warnings[0]


def test_the_checks_blockers_block_and_keep_their_words() -> None:
    d = decided(received(policy(10)), check=["MX host mx3.example.com matches no mx pattern"])
    [b] = d.blockers
    assert b.source is BlockerSource.CHECK
    assert b.what == "MX host mx3.example.com matches no mx pattern"
    assert "mxguard check example.com" in b.fix


def test_a_certificate_the_check_now_finds_valid_still_blocks_and_the_fix_says_why() -> None:
    d = decided(received(policy(10, detail(EXPIRED, 2))),
                hosts={MX: HostState(starttls=True, certificate=True)})  # fmt: skip
    [b] = d.blockers
    assert "sees a valid certificate on mx1.example.com now" in b.fix
    assert "older than the window (1 days" in b.fix


def test_the_senders_details_are_quoted_bounded() -> None:
    details = [detail(EXPIRED, 1, failure_reason_code=f"X509_V_ERR_{n}") for n in range(5)]
    [b] = decided(received(policy(1, *details))).blockers
    assert "X509_V_ERR_0" in b.what and "X509_V_ERR_2" in b.what
    assert "X509_V_ERR_3" not in b.what  # sm.MAX_DETAILS


# --- the numbers -----------------------------------------------------------------------------


def test_totals_by_sender_result_type_and_mx() -> None:
    e = ev(
        received(policy(90, detail(MISMATCH, 3), detail(SNS, 1, mx=MX2)), org="A"),
        received(policy(10, detail(MISMATCH, 2)), org="B", report_id="r-2", dkim=False),
    )
    assert (e.reports, e.successful, e.failed, e.sessions) == (2, 100, 6, 106)
    assert e.by_result_type() == [
        {"result_type": "certificate-host-mismatch", "failed": 5},
        {"result_type": "starttls-not-supported", "failed": 1},
    ]
    assert [s.to_json() for s in e.senders] == [
        {"organization": "A", "reports": 1, "successful": 90, "failed": 4, "dkim_verified": 1},
        {"organization": "B", "reports": 1, "successful": 10, "failed": 2, "dkim_verified": 0},
    ]
    assert e.by_mx() == [
        {"mx_host": MX, "failed": 5, "result_types": {"certificate-host-mismatch": 5}},
        {"mx_host": MX2, "failed": 1, "result_types": {"starttls-not-supported": 1}},
    ]


def test_only_the_policies_for_the_domain_count() -> None:
    both = received(policy(7, detail(EXPIRED, 1)), policy(100, detail(EXPIRED, 50),
                                                          domain="other.example"))  # fmt: skip
    e = ev(both, received(policy(3, domain="other.example"), report_id="r-2"))
    assert (e.reports, e.successful, e.failed) == (1, 7, 1)


@pytest.mark.parametrize(
    ("now", "days", "start", "end"),
    [
        (NOW, 1, "2026-12-02", "2026-12-04"),
        (NOW, 14, "2026-11-19", "2026-12-04"),
        (dt.datetime(2026, 12, 3, 0, 0, tzinfo=dt.UTC), 1, "2026-12-02", "2026-12-04"),
        (dt.datetime(2026, 12, 3, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))), 1,
         "2026-12-01", "2026-12-03"),  # 23:00 UTC on the 2nd
    ],
)  # fmt: skip
def test_the_window_is_whole_utc_days_before_today_and_today(
    now: dt.datetime, days: int, start: str, end: str
) -> None:
    low, high = sm.window(now, days)
    assert (low.isoformat(), high.isoformat()) == (f"{start}T00:00:00+00:00",
                                                   f"{end}T00:00:00+00:00")  # fmt: skip


@pytest.mark.parametrize("days", [0, sm.MAX_DAYS + 1])
def test_the_window_is_one_day_to_a_year(days: int) -> None:
    with pytest.raises(ValueError, match="days must be from 1"):
        sm.window(NOW, days)


# --- through a real report inbox (SQLite) ----------------------------------------------------


def with_store(tmp_path: Path, records: Sequence[ReceivedRecord], work: Any) -> Any:
    async def run() -> Any:
        store = await open_store(f"sqlite:///{tmp_path / 'owner.db'}")
        try:
            for r in records:
                await store.add_received(r)
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def test_the_inbox_gives_the_window_and_a_resent_report_counts_once(tmp_path: Path) -> None:
    before = YESTERDAY - dt.timedelta(days=1)
    records = [
        received(policy(10, detail(MISMATCH, 2))),
        received(policy(10, detail(MISMATCH, 2))),  # resent: the same report (RFC 8460 §5.5)
        received(policy(5), org="B", report_id="r-2"),
        received(policy(1, detail(EXPIRED, 9)), report_id="old", start=before),  # before it
    ]

    async def work(store: Any) -> sm.ReportEvidence:
        return await sm.gather(store, D, START, END)

    e = with_store(tmp_path, records, work)
    assert (e.reports, e.successful, e.failed) == (2, 15, 2)
    d = sm.decide(e, POLICY, [], {})
    assert [(b.result_type, b.sessions) for b in d.blockers] == [("certificate-host-mismatch", 2)]
    # The same reports, each once, read straight from the records decide the same.
    assert sm.decide(ev(records[0], records[2]), POLICY, [], {}) == d


def checked(domain: str = D, *, mode: Mode = Mode.TESTING, breaks: bool = False) -> DomainCheck:
    """A check written down: the domain's testing policy was fetched; no MX host was probed."""
    sts = StsState("id1", mode, 86400, ("*.example.com",), STS_LINES, NOW, None, False, None)
    findings = (
        (Finding("dnssec-bogus", Severity.ERROR, "the MX answer is bogus", "defers", "fix DNSSEC",
                 breaks=True),)
        if breaks else ()
    )  # fmt: skip
    observations = Observations(
        domain, NOW, DeliveryPolicy(domain, Source.MTA_STS, mode, Status.OK, mta_sts=sts),
        MxLookupView("hosts", "insecure"), (), TxtLookup(f"_mta-sts.{domain}"), None, None,
        TxtLookup(f"_smtp._tls.{domain}"),
    )  # fmt: skip
    verdict = Verdict.BROKEN if breaks else Verdict.PARTIAL
    return DomainCheck(domain, verdict, Protection.MTA_STS, "written down", observations, findings)


class FakeAuditor:
    def __init__(self, check: DomainCheck) -> None:
        self.result = check
        self.asked: list[str] = []

    def __call__(self, settings: Settings) -> FakeAuditor:
        return self

    async def check(self, domain: str) -> DomainCheck:
        self.asked.append(domain)
        return self.result


REQUIRED = {"domain", "days", "total_successful", "total_failure", "by_result_type",
            "by_sender", "by_mx", "ready_to_enforce", "blockers"}  # fmt: skip


def summarised(tmp_path: Path, records: Sequence[ReceivedRecord], check: DomainCheck,
               days: int = 1) -> tuple[sm.Summary, FakeAuditor]:  # fmt: skip
    auditor = FakeAuditor(check)

    async def work(store: Any) -> sm.Summary:
        return await sm.summarise(Settings(), store, D, days=days, now=NOW,
                                  auditor=auditor)  # type: ignore[arg-type]  # fmt: skip

    return with_store(tmp_path, records, work), auditor


def test_summarise_reads_the_inbox_checks_the_domain_and_judges_the_tested_policy(
    tmp_path: Path,
) -> None:
    s, auditor = summarised(tmp_path, [received(policy(40, detail(SNS, 2)))], checked())
    assert auditor.asked == [D]
    doc = s.to_json()
    assert set(doc) >= REQUIRED
    assert (doc["domain"], doc["days"], doc["total_successful"], doc["total_failure"]) == (
        D, 1, 40, 2)  # fmt: skip
    assert doc["ready_to_enforce"] is True and doc["blockers"] == []
    assert "STRIPTLS" in doc["signals"][0]
    # The policy judged is the tested one, in enforce mode.
    assert s.policy == mtasts.Policy("STSv1", Mode.ENFORCE, 1209600, ("*.example.com",))
    assert doc["check"] == {"verdict": "partial", "summary": "written down"}


def test_summarise_is_not_ready_while_the_check_finds_what_breaks(tmp_path: Path) -> None:
    s, _ = summarised(tmp_path, [received(policy(40))], checked(breaks=True))
    assert not s.ready_to_enforce
    [b] = s.to_json()["blockers"]
    assert b["source"] == "check" and b["what"] == "dnssec-bogus: the MX answer is bogus"


def test_summarise_without_reports_says_no_evidence_yet(tmp_path: Path) -> None:
    s, _ = summarised(tmp_path, [], checked())
    assert not s.ready_to_enforce
    [b] = s.to_json()["blockers"]
    assert b["source"] == "evidence" and b["sessions"] == 0


def test_without_a_live_policy_the_mx_hosts_are_judged_and_a_warning_says_so(
    tmp_path: Path,
) -> None:
    s, _ = summarised(tmp_path, [received(policy(40))], checked(mode=Mode.NONE))
    # No MX host in the written-down check: no policy can be made, and that blocks.
    assert s.policy is None and not s.ready_to_enforce
    assert "no testing or enforce policy" in s.decision.warnings[0]
    assert "no enforce policy can be made" in s.decision.blockers[-1].what


def test_enforce_blockers_of_publish_take_the_reports_blockers_too(tmp_path: Path) -> None:
    from mxguard.owner import publish

    e = ev(received(policy(10, detail(EXPIRED, 2))))
    texts = publish.enforce_blockers(checked(), POLICY, e)
    [text] = texts
    assert text.startswith("certificate-expired at mx1.example.com: 2 failed sessions")
    assert publish.enforce_blockers(checked(), POLICY) == []


# --- the command line ------------------------------------------------------------------------


@pytest.fixture
def cli_check(monkeypatch: pytest.MonkeyPatch) -> FakeAuditor:
    """`tlsrpt summary` with the check written down instead of made."""
    auditor = FakeAuditor(checked())
    real = sm.summarise

    async def summarise(settings: Settings, inbox: Any, domain: str, **kw: Any) -> sm.Summary:
        return await real(settings, inbox, domain, auditor=auditor, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sm, "summarise", summarise)
    return auditor


def summary_cli(tmp_path: Path, *args: str, records: Sequence[ReceivedRecord] = ()) -> Any:
    from click.testing import CliRunner

    from mxguard.cli import main

    async def nothing(store: Any) -> None:
        return None

    tmp_path.mkdir(parents=True, exist_ok=True)
    with_store(tmp_path, records, nothing)
    store = f"sqlite:///{tmp_path / 'owner.db'}"
    return CliRunner().invoke(main, ["--store", store, *args], env={"MXGUARD_JSON": ""})


def recent(*policies: ReceivedPolicy, **kw: Any) -> ReceivedRecord:
    """A report about yesterday (by the real clock, as the command counts)."""
    day = dt.datetime.combine(dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1), dt.time(),
                              tzinfo=dt.UTC)  # fmt: skip
    return received(*policies, start=day, **kw)


def test_the_command_exits_0_when_ready_and_1_when_not(
    tmp_path: Path, cli_check: FakeAuditor
) -> None:
    ready = summary_cli(tmp_path / "a", "tlsrpt", "summary", "Example.COM.", "--days", "1",
                        records=[recent(policy(30))])  # fmt: skip
    assert ready.exit_code == 0, ready.output
    assert "example.com: READY for MTA-STS enforce" in ready.output
    assert cli_check.asked == [D]  # the name normalised
    blocked = summary_cli(tmp_path / "b", "tlsrpt", "summary", D,
                          records=[recent(policy(30, detail(EXPIRED, 2)))])  # fmt: skip
    assert blocked.exit_code == 1
    assert "NOT READY" in blocked.output and "[reports] certificate-expired at" in blocked.output
    assert "fix: renew the certificate of mx1.example.com" in blocked.output


def test_the_command_honours_the_global_json_and_escapes_what_senders_wrote(
    tmp_path: Path, cli_check: FakeAuditor
) -> None:
    org = "Evil\x1b[31m Corp"
    result = summary_cli(tmp_path, "--json", "tlsrpt", "summary", D,
                         records=[recent(policy(30, detail(EXPIRED, 1)), org=org)])  # fmt: skip
    assert result.exit_code == 1
    import json

    doc = json.loads(result.stdout)
    assert set(doc) >= REQUIRED and doc["by_sender"][0]["organization"] == org
    text = summary_cli(tmp_path, "tlsrpt", "summary", D)
    assert "\x1b" not in text.output and "Evil\\x1b[31m Corp" in text.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tlsrpt", "summary", "not a domain"], "DOMAIN"),
        (["tlsrpt", "summary", D, "--days", "0"], "--days"),
        (["tlsrpt", "summary", D, "--store", ""], "--store is empty"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, cli_check: FakeAuditor, args: list[str], message: str
) -> None:
    result = summary_cli(tmp_path, *args)
    assert result.exit_code == 2 and message in result.output
