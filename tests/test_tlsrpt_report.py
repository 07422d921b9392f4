"""TLS-RPT aggregate reports (RFC 8460 §4, §5): what a report must say, and that receivers read it.

The pure rules are specified on hand-made sessions; then real lab deliveries (successes and
every failure the lab can produce) are turned into reports that must validate against the
§4.4 schema (tests/fixtures/tlsrpt-schema.json) and parse in parsedmarc with the same counts,
both as files and as e-mails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import jsonschema
import parsedmarc
import pytest

from mxguard.adapters.store import SessionResult
from mxguard.engine.context import engine
from mxguard.engine.policy import DeliveryPolicy, Mode, MxPolicy, Source, Status, StsState
from mxguard.lab.lab import Lab
from mxguard.protocol import tlsrpt_report as tr
from mxguard.protocol.dane import parse_tlsa
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import NO_POLICY_FOUND, PolicyType, ReportedPolicy
from tlsrpt_helpers import lab_settings

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "tlsrpt-schema.json").read_text())
DAY = dt.date(2026, 5, 1)
AT = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
SUBMITTER = "client.mxguard.test"


STS = ReportedPolicy(
    PolicyType.STS,
    ("version: STSv1", "mode: enforce", "mx: *.example.com", "max_age: 86400"),
    ("*.example.com",),
    ("mailto:t@example.com",),
)


def session(**kw: object) -> SessionResult:
    base = SessionResult(
        id=None, at=AT, policy_domain="example.com", policy=STS, result_type=None,
        sending_ip="192.0.2.1", receiving_mx="mx1.example.com", receiving_ip="198.51.100.1",
        receiving_helo="mx1.example.com", detail="delivered", is_report=False, reported=None,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def build(sessions: list[SessionResult]) -> list[tr.Report]:
    return tr.aggregate(sessions, day=DAY, organization_name="Org", contact_info="c@example.org")


def validate(report: tr.Report) -> None:
    jsonschema.validate(json.loads(report.to_bytes()), SCHEMA)


# --- aggregation rules ---------------------------------------------------------------------


def test_one_report_per_policy_domain_covering_the_utc_day() -> None:
    other = session(policy_domain="other.example", policy=NO_POLICY_FOUND)
    reports = build([session(), other])
    assert [r.policy_domain for r in reports] == ["example.com", "other.example"]
    doc = reports[0].to_json()
    assert doc["date-range"] == {"start-datetime": "2026-05-01T00:00:00Z",
                                 "end-datetime": "2026-05-01T23:59:59Z"}  # fmt: skip
    assert len({r.report_id for r in reports}) == 2
    for r in reports:
        validate(r)


@pytest.mark.parametrize(
    ("sessions", "successful", "failed", "groups"),
    [
        pytest.param([session(), session()], 2, 0, [], id="successes-are-counted-not-detailed"),
        pytest.param(
            [session(result_type=ResultType.STARTTLS_NOT_SUPPORTED)] * 3, 0, 3,
            [("starttls-not-supported", 3)], id="identical-failures-form-one-group",
        ),
        pytest.param(
            [session(result_type=ResultType.CERTIFICATE_EXPIRED),
             session(result_type=ResultType.CERTIFICATE_EXPIRED, receiving_ip="198.51.100.2")],
            0, 2, [("certificate-expired", 1), ("certificate-expired", 1)],
            id="a-different-receiving-ip-is-a-different-group",
        ),
        pytest.param(
            [session(), session(is_report=True),
             session(is_report=True, result_type=ResultType.VALIDATION_FAILURE)],
            1, 0, [], id="sessions-that-delivered-reports-are-left-out",
        ),
    ],
)  # fmt: skip
def test_summary_and_failure_groups(
    sessions: list[SessionResult], successful: int, failed: int, groups: list[tuple[str, int]]
) -> None:
    [report] = build(sessions)
    [p] = report.policies
    assert (p.successful, p.failed) == (successful, failed)
    assert [(d.result_type, d.failed_session_count) for d in p.failure_details] == groups
    validate(report)


def test_a_policy_change_during_the_day_gives_two_policy_entries() -> None:
    testing = replace(STS, policy_strings=("version: STSv1", "mode: testing"))
    [report] = build([session(), session(policy=testing)])
    assert len(report.policies) == 2


def test_failure_details_carry_every_field_of_the_session() -> None:
    [report] = build([session(result_type=ResultType.VALIDATION_FAILURE, detail="DANE mismatch")])
    [detail] = report.to_json()["policies"][0]["failure-details"]
    assert detail == {
        "result-type": "validation-failure", "sending-mta-ip": "192.0.2.1",
        "receiving-mx-hostname": "mx1.example.com", "receiving-mx-helo": "mx1.example.com",
        "receiving-ip": "198.51.100.1", "failed-session-count": 1,
        "additional-information": "DANE mismatch",
    }  # fmt: skip


def test_sts_policy_names_its_mx_patterns_under_both_keys_receivers_use() -> None:
    policy = build([session()])[0].to_json()["policies"][0]["policy"]
    assert policy["mx-host"] == policy["mx-host-pattern"] == ["*.example.com"]


EE = parse_tlsa("3 1 1 " + "ab" * 32)
TA = parse_tlsa("2 0 1 " + "cd" * 32)
STS_STATE = StsState("1", Mode.ENFORCE, 86400, ("*.example.com",), STS.policy_strings, None,
                     None, False, None)  # fmt: skip
RUA = ("mailto:t@example.com",)


def delivery_policy(source: Source, *mx: MxPolicy, **kw: object) -> DeliveryPolicy:
    return DeliveryPolicy("example.com", source, Mode.ENFORCE, Status.OK, mx, tlsrpt_rua=RUA,
                          **kw)  # type: ignore[arg-type]  # fmt: skip


# RFC 8460 §4.4: which policy a session made under a delivery policy is reported under.
REPORTED = [
    pytest.param(
        delivery_policy(Source.DANE, MxPolicy("mx1.example.com", 10, tlsa=(EE,)),
                        MxPolicy("mx2.example.com", 20, tlsa=(EE,), tlsa_unusable=(TA,))),
        ReportedPolicy(PolicyType.TLSA, (EE.to_text(), TA.to_text()), (), RUA),
        id="dane-names-each-tlsa-record-once",
    ),
    pytest.param(
        delivery_policy(Source.MTA_STS, mta_sts=STS_STATE), STS, id="mta-sts-names-its-lines",
    ),
    pytest.param(
        delivery_policy(Source.LIST), ReportedPolicy(PolicyType.NO_POLICY_FOUND, rua=RUA),
        id="the-static-list-is-no-published-policy",
    ),
    pytest.param(
        delivery_policy(Source.NONE), ReportedPolicy(PolicyType.NO_POLICY_FOUND, rua=RUA),
        id="none",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("policy", "reported"), REPORTED)
def test_a_delivery_policy_is_reported_as_the_policy_the_domain_published(
    policy: DeliveryPolicy, reported: ReportedPolicy
) -> None:
    assert policy.reported() == reported


@pytest.mark.parametrize("result_type", list(ResultType))
def test_mta_sts_policy_failures_are_the_three_of_section_4_3_2_2(result_type: ResultType) -> None:
    assert result_type.is_sts_policy_failure == result_type.value.startswith("sts-")


def test_file_name_follows_section_5_1() -> None:
    [report] = build([session()])
    start = int(dt.datetime(2026, 5, 1, tzinfo=dt.UTC).timestamp())
    assert tr.filename(report, SUBMITTER, "ab12") == (
        f"{SUBMITTER}!example.com!{start}!{start + 86399}!ab12.json.gz"
    )


@pytest.mark.parametrize("bad", ["", "a!b", "a b", "a/b"])
def test_file_name_refuses_parts_that_would_break_it(bad: str) -> None:
    with pytest.raises(tr.ReportError, match="file name"):
        tr.filename(build([session()])[0], bad, "u")


def test_gzip_round_trip_gives_the_same_report() -> None:
    [report] = build([session(), session(result_type=ResultType.CERTIFICATE_EXPIRED)])
    assert tr.parse_report(report.to_gzip()) == report


def test_decompression_is_bounded() -> None:
    bomb = gzip.compress(b" " * 100_000)
    with pytest.raises(tr.ReportError, match="more than 1000 bytes"):
        tr.parse_report(bomb, max_size=1000)


@pytest.mark.parametrize("missing", ["organization-name", "date-range", "contact-info",
                                     "report-id", "policies"])  # fmt: skip
def test_parsing_refuses_a_report_without_a_required_member(missing: str) -> None:
    doc = build([session()])[0].to_json()
    del doc[missing]
    with pytest.raises(tr.ReportError, match=missing):
        tr.parse_report(json.dumps(doc).encode())


def test_report_email_has_the_section_5_3_shape() -> None:
    [report] = build([session()])
    raw = tr.email_message(
        report, submitter=SUBMITTER, mail_from="tlsrpt@client.mxguard.test",
        recipients=["t@example.com"], unique="u1", date=AT, message_id="<m@x>",
    )  # fmt: skip
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "example.com"
    assert msg["TLS-Report-Submitter"] == SUBMITTER
    assert msg["TLS-Required"] == "No"
    assert msg["Subject"] == (
        f"Report Domain: example.com Submitter: {SUBMITTER} Report-ID: <{report.report_id}>"
    )
    text, attachment = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == tr.filename(report, SUBMITTER, "u1")
    assert tr.parse_report(attachment.get_content()) == report
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


# --- real lab deliveries, every failure the lab can produce ------------------------------------


@dataclass(frozen=True)
class Case:
    recipient: str
    attacks: tuple[tuple[str, str], ...]  # (host, attack mode) during the delivery
    expect: tuple[str | None, ...]  # result type of each session, in order


CASES = [
    Case("a@sts-enforce.test", (), (None,)),
    Case("a@sts-enforce.test", (("mx1.sts-enforce.test", "strip"),),
         ("starttls-not-supported", None)),
    Case("a@sts-testing.test", (("mx.sts-testing.test", "strip"),), ("starttls-not-supported",)),
    Case("a@sts-testing.test", (("mx.sts-testing.test", "intercept-self-signed"),),
         ("certificate-not-trusted",)),
    Case("a@sts-testing.test", (("mx.sts-testing.test", "intercept-wrong-name"),),
         ("certificate-host-mismatch",)),
    Case("a@sts-bad-cert-mx.test", (), ("certificate-expired", None)),
    Case("a@dane-ee.test", (), (None,)),
    Case("a@dane-mismatch.test", (), ("validation-failure",)),
    Case("a@nopolicy.test", (("mx.nopolicy.test", "strip"),), (None,)),
    Case("a@sts-404.test", (), ("sts-policy-fetch-error",)),
    Case("a@sts-untrusted.test", (), ("sts-webpki-invalid",)),
    Case("a@sts-bad-policy.test", (), ("sts-policy-invalid",)),
]  # fmt: skip


@pytest.fixture
def lab_results(lab: Lab, tmp_path: Path) -> Iterator[list[SessionResult]]:
    async def run() -> list[SessionResult]:
        async with engine(lab_settings(lab, tmp_path)) as e:
            sender = e.sender()
            for case in CASES:
                for host, mode in case.attacks:
                    lab.set_attack(host, mode)
                try:
                    await sender.deliver("a@client.mxguard.test", [case.recipient], b"Hi\r\n")
                finally:
                    for host, _ in case.attacks:
                        lab.set_attack(host, "pass")
            now = dt.datetime.now(dt.UTC)
            return await e.store.results_between(now - dt.timedelta(hours=1), now)

    yield asyncio.run(run())


@pytest.mark.lab
def test_lab_sessions_record_the_expected_result_types(lab_results: list[SessionResult]) -> None:
    by_domain: dict[str, list[str | None]] = {}
    for r in lab_results:
        by_domain.setdefault(r.policy_domain, []).append(r.result_type)
    expected: dict[str, list[str | None]] = {}
    for case in CASES:
        expected.setdefault(case.recipient.split("@")[1], []).extend(case.expect)
    assert by_domain == expected


@pytest.mark.lab
def test_lab_reports_validate_and_parsedmarc_reads_files_and_emails_with_the_same_counts(
    lab_results: list[SessionResult], tmp_path: Path
) -> None:
    today = lab_results[0].at.date()
    reports = tr.aggregate(lab_results, day=today, organization_name="mxguard tests",
                           contact_info="t@mxguard.test",
                           unique={r.policy_domain: "u" for r in lab_results})  # fmt: skip
    assert len(reports) == len({c.recipient for c in CASES})
    for report in reports:
        jsonschema.validate(json.loads(report.to_bytes()), SCHEMA)
        sessions = [r for r in lab_results if r.policy_domain == report.policy_domain]
        failed = sum(1 for r in sessions if r.result_type)
        assert (report.successful, report.failed) == (len(sessions) - failed, failed)

        path = tmp_path / tr.filename(report, SUBMITTER, "u")
        path.write_bytes(report.to_gzip())
        parsed = parsedmarc.parse_report_file(str(path), offline=True)
        assert parsed["report_type"] == "smtp_tls"
        assert counts(parsed["report"]) == (report.successful, report.failed, report.report_id)

        raw = tr.email_message(report, submitter=SUBMITTER, mail_from="r@client.mxguard.test",
                               recipients=["t@x.test"], unique="u", date=dt.datetime.now(dt.UTC),
                               message_id="<1@client.mxguard.test>")  # fmt: skip
        parsed_mail = parsedmarc.parse_report_email(raw, offline=True)
        assert parsed_mail["report_type"] == "smtp_tls"
        assert counts(parsed_mail["report"]) == counts(parsed["report"])


def counts(parsed: object) -> tuple[int, int, str]:
    assert isinstance(parsed, dict)
    policies = parsed["policies"]
    ok = sum(p["successful_session_count"] for p in policies)
    failed = sum(p["failed_session_count"] for p in policies)
    detailed = sum(
        d["failed_session_count"] for p in policies for d in p.get("failure_details", [])
    )
    assert detailed == failed
    return ok, failed, parsed["report_id"]
