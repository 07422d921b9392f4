"""Receiving TLS reports (RFC 8460 §4, §5) for domain owners: the tolerant, bounded reader
(mxguard.protocol.tlsrpt_ingest), DKIM on report e-mails (mxguard.adapters.dkim) and
`mxguard tlsrpt ingest`.

The fixtures in tests/fixtures/received/ are shaped like what real senders send (see the
README there); each reads with the counts its sender reported, here and in parsedmarc (an
independent reader), and every hostile input is refused or cut short as the module docstring
says, with nothing stored when it is refused. DKIM is checked against a real DNS peer: the
lab's authoritative server on 127.84.0.1, serving the key of a report signed here.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import gzip
import json
import socket
import threading
import zlib
from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import dkim
import dns.zone
import parsedmarc
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mxguard.adapters.dkim import DkimResult, verify_dkim
from mxguard.adapters.dns import DnsResolver
from mxguard.adapters.store import open_store
from mxguard.cli import main
from mxguard.lab.dns_server import AuthServer
from mxguard.protocol import tlsrpt_ingest as ingest
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_ingest import ReceivedReport, ReportRejected
from mxguard.protocol.tlsrpt_report import (
    FailureDetail,
    PolicyResult,
    PolicyType,
    Report,
    ReportedPolicy,
    email_message,
)

pytest_plugins = ["servers"]

FIXTURES = Path(__file__).parent / "fixtures" / "received"
DAY = dt.datetime(2026, 4, 30, tzinfo=dt.UTC)
END = dt.datetime(2026, 4, 30, 23, 59, 59, tzinfo=dt.UTC)
STS_LINES = ["version: STSv1", "mode: enforce", "mx: mx1.example.com", "max_age: 86400"]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def read(body: bytes, name: str | None = None, **kw: Any) -> ReceivedReport:
    """decode, then parse, as every front end does."""
    text = ingest.decode(body, content_type=None, filename=name)
    return ingest.parse(text, domain_hint=ingest.filename_domain(name), **kw)


def minimal(**kw: Any) -> dict[str, Any]:
    """A small valid report as a JSON document; `kw` replaces top-level members."""
    doc: dict[str, Any] = {
        "organization-name": "Sender Inc.",
        "date-range": {"start-datetime": "2026-04-30T00:00:00Z",
                       "end-datetime": "2026-04-30T23:59:59Z"},
        "contact-info": "tlsrpt@sender.example",
        "report-id": "r-1",
        "policies": [{
            "policy": {"policy-type": "sts", "policy-string": STS_LINES,
                       "policy-domain": "example.com", "mx-host": ["mx1.example.com"]},
            "summary": {"total-successful-session-count": 10,
                        "total-failure-session-count": 2},
            "failure-details": [{"result-type": "certificate-expired",
                                 "receiving-mx-hostname": "mx1.example.com",
                                 "failed-session-count": 2}],
        }],
    }  # fmt: skip
    doc.update(kw)
    return doc


def with_policy(**kw: Any) -> dict[str, Any]:
    """`minimal()` with members of its one `policies[]` entry replaced (None removes one)."""
    doc = minimal()
    entry = doc["policies"][0]
    entry.update(kw)
    for key in [k for k, v in entry.items() if v is None]:
        del entry[key]
    return doc


def with_inner(**kw: Any) -> dict[str, Any]:
    """`minimal()` with members of its `policy` object replaced (None removes one)."""
    doc = minimal()
    inner = doc["policies"][0]["policy"]
    inner.update(kw)
    for key in [k for k, v in inner.items() if v is None]:
        del inner[key]
    return doc


def with_detail(**kw: Any) -> dict[str, Any]:
    """`minimal()` with members of its one failure detail replaced (None removes one)."""
    doc = minimal()
    d = doc["policies"][0]["failure-details"][0]
    d.update(kw)
    for key in [k for k, v in d.items() if v is None]:
        del d[key]
    return doc


def as_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def has_note(report: ReceivedReport, words: str) -> bool:
    return any(words in n for n in report.notes)


# --- real senders' reports -------------------------------------------------------------------

# (file, organisation, report-id, policy domains, successful, failed, MX patterns of the
# first policy, per-policy (successful, failed), notes expected)
SENDERS = [
    ("google.json", "Google Inc.", "2026-04-30T00:00:00Z_example.com", ("example.com",), 1834,
     12, ("mx1.example.com",), [(1834, 12)], ()),
    ("microsoft.json", "Microsoft Corporation", "134221248000000000+example.com",
     ("example.com",), 402, 7, ("*.example.com",), [(402, 7)], ("additional-info-uri",)),
    ("postfix-libtlsrpt.json", "Mail Relay GmbH", "2026-04-30T00:00:00Z_idx1_example.com",
     ("example.com",), 53, 4, (), [(51, 0), (0, 4), (2, 0)], ()),
    ("rfc-example-like.json", "Example Mail Provider", "9f6c1b2e-4d3a-4c5b-8e7f-0a1b2c3d4e5f",
     ("mail.example.com",), 0, 118, ("*.mail.example.com",), [(0, 118)], ()),
    ("sorted-members.json", "Webmail Example",
     "3c9e7a41-5b2d-4f08-9e6a-7d1c2b4a8f60@webmail.example", ("example.com",), 9, 2, (),
     [(0, 2), (9, 0)], ("failure-details count 3 failed sessions, more than its "
                        "total-failure-session-count 2",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "org", "report_id", "domains", "ok", "bad", "mx", "per_policy", "notes"),
    SENDERS,
    ids=[s[0] for s in SENDERS],
)
@pytest.mark.parametrize("gzipped", [False, True], ids=["json", "gzip"])
def test_each_senders_report_reads_with_the_counts_it_reported(
    name: str,
    org: str,
    report_id: str,
    domains: tuple[str, ...],
    ok: int,
    bad: int,
    mx: tuple[str, ...],
    per_policy: list[tuple[int, int]],
    notes: tuple[str, ...],
    gzipped: bool,
) -> None:
    body = fixture(name)
    report = read(gzip.compress(body) if gzipped else body, name + (".gz" if gzipped else ""))
    assert (report.organization_name, report.report_id) == (org, report_id)
    assert report.policy_domains == domains
    assert (report.successful, report.failed) == (ok, bad)
    assert [(p.successful, p.failed) for p in report.policies] == per_policy
    assert report.policies[0].mx_hosts == mx or report.policies[1].mx_hosts == mx
    assert report.start.tzinfo is dt.UTC
    # Only the tolerances each sender needs: a clean report carries no notes.
    assert len(report.notes) == len(notes)
    for words in notes:
        assert has_note(report, words)


def test_what_each_sender_spells_its_own_way_reads_as_the_rfc_means_it() -> None:
    google = read(fixture("google.json"))
    # `mx-host` as a string (the §4.4 schema's name and type) is the one pattern.
    assert google.policies[0].mx_hosts == ("mx1.example.com",)
    ms = read(fixture("microsoft.json"))
    first, second = ms.policies[0].failure_details
    # `additional-info-uri` is `additional-information`; the MX name is normalised, so one
    # host is one host in the totals; a missing or empty sending-mta-ip is None.
    assert first.additional_information == "https://tlsrpt.example.net/why/host-mismatch"
    assert first.receiving_mx_hostname == "mx1.example.com"
    assert first.sending_mta_ip is None and second.sending_mta_ip is None
    assert second.failure_reason_code == "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY"
    postfix = read(fixture("postfix-libtlsrpt.json"))
    tlsa, sts, none = postfix.policies
    assert (tlsa.policy_type, sts.policy_type, none.policy_type) == (
        PolicyType.TLSA, PolicyType.STS, PolicyType.NO_POLICY_FOUND,
    )  # fmt: skip
    assert tlsa.failure_details == () and sts.mx_hosts == ("mx1.example.com",)
    assert sts.failure_details[0].receiving_mx_helo == "mx1.example.com"
    assert sts.failure_details[0].result_type is ResultType.CERTIFICATE_NOT_TRUSTED
    rfc = read(fixture("rfc-example-like.json"))
    # A date range given with an offset is the same instant in UTC.
    assert rfc.start == dt.datetime(2026, 4, 29, 22, tzinfo=dt.UTC)
    assert rfc.end == dt.datetime(2026, 4, 30, 22, tzinfo=dt.UTC)
    sorted_members = read(fixture("sorted-members.json"))
    fetch, none = sorted_members.policies
    # Members in any order; an STS policy with no policy-string or mx-host has neither; the
    # summary's total stands even when the details add up to more (said in a note).
    assert (fetch.policy_type, fetch.policy_strings, fetch.mx_hosts) == (PolicyType.STS, (), ())
    assert [(d.result_type, d.failed_session_count) for d in fetch.failure_details] == [
        (ResultType.STS_POLICY_FETCH_ERROR, 2), (ResultType.STS_POLICY_FETCH_ERROR, 1),
    ]  # fmt: skip
    assert fetch.failure_details[0].failure_reason_code == "https status 503 from policy host"
    # A policy without a failure-details member has none.
    assert none.policy_type is PolicyType.NO_POLICY_FOUND and none.failure_details == ()
    assert sorted_members.end == dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize("name", [s[0] for s in SENDERS])
def test_parsedmarc_reads_each_fixture_with_the_same_counts(name: str) -> None:
    """The fixtures are realistic: parsedmarc, which many domain owners run, reads them with
    the same counts. It keeps less: see the comments for what it drops that mxguard keeps."""
    ours = read(fixture(name))
    theirs = parsedmarc.parse_smtp_tls_report_json(fixture(name))
    assert theirs["organization_name"] == ours.organization_name
    assert theirs["report_id"] == ours.report_id
    assert len(theirs["policies"]) == len(ours.policies)
    for mine, other in zip(ours.policies, theirs["policies"], strict=True):
        assert other["policy_domain"] == mine.policy_domain
        assert other["policy_type"] == mine.policy_type
        assert (other["successful_session_count"], other["failed_session_count"]) == (
            mine.successful, mine.failed,
        )  # fmt: skip
        details = other.get("failure_details", [])
        assert [d["failed_session_count"] for d in details] == [
            d.failed_session_count for d in mine.failure_details
        ]
        assert [d["result_type"] for d in details] == [
            str(d.result_type) for d in mine.failure_details
        ]
        # parsedmarc reads MX patterns only from `mx-host-pattern` and only as a list: the
        # `mx-host` of the §4.4 schema (Google's string, libtlsrpt's list) is dropped.
        if "mx_host_patterns" not in other:
            assert mine.mx_hosts == () or name in ("google.json", "postfix-libtlsrpt.json")
    # parsedmarc keeps the date range as the text sent (offsets and all); mxguard has UTC.
    assert theirs["begin_date"] == json.loads(fixture(name))["date-range"]["start-datetime"]


def test_parsedmarc_drops_what_mxguard_keeps() -> None:
    """Where parsedmarc (11.x) loses information a dashboard needs, for the record."""
    google = parsedmarc.parse_smtp_tls_report_json(fixture("google.json"))
    assert "mx_host_patterns" not in google["policies"][0]  # mx-host as a string: dropped
    postfix = parsedmarc.parse_smtp_tls_report_json(fixture("postfix-libtlsrpt.json"))
    assert "mx_host_patterns" not in postfix["policies"][1]  # mx-host as a list: dropped
    one_string = as_bytes(with_inner(**{"policy-string": "version: STSv1"}))
    assert "policy_strings" not in parsedmarc.parse_smtp_tls_report_json(one_string)["policies"][0]
    assert read(one_string).policies[0].policy_strings == ("version: STSv1",)
    # And it checks nothing about counts: a negative one passes, mxguard refuses it.
    negative = as_bytes(with_policy(summary={"total-successful-session-count": -5,
                                             "total-failure-session-count": 0}))  # fmt: skip
    assert (
        parsedmarc.parse_smtp_tls_report_json(negative)["policies"][0]["successful_session_count"]
        == -5
    )
    with pytest.raises(ReportRejected):
        read(negative)


def mxguard_report() -> Report:
    """A report as mxguard itself builds it (tlsrpt_report.py)."""
    sts = ReportedPolicy(PolicyType.STS, tuple(STS_LINES), ("mx1.example.com", "*.example.com"))
    failures = (
        FailureDetail(ResultType.STARTTLS_NOT_SUPPORTED, "192.0.2.1", "mx1.example.com",
                      "203.0.113.24", "mx1.example.com", 4, "no STARTTLS in the EHLO reply"),
        FailureDetail("a-future-result-type", "192.0.2.1", "mx2.example.com", None, None, 1),
    )  # fmt: skip
    return Report(
        organization_name="mxguard at sender.example",
        start=DAY,
        end=END,
        contact_info="mailto:postmaster@sender.example",
        report_id="2026-04-30T00:00:00Z_example.com_0",
        policies=(
            PolicyResult("example.com", sts, 96, 5, failures),
            PolicyResult("example.com", ReportedPolicy(PolicyType.NO_POLICY_FOUND), 3, 0),
        ),
    )


def test_mxguards_own_report_reads_back_whole_as_file_and_as_email() -> None:
    sent = mxguard_report()
    got = read(sent.to_gzip(), "sender.example!example.com!1777507200!1777593599!0.json.gz")
    # `mx-host` and `mx-host-pattern` agree: the one note is the unknown result type.
    [note] = got.notes
    assert "'a-future-result-type' is not one of RFC 8460 §4.3's; kept as sent" in note
    assert (got.organization_name, got.report_id, got.start, got.end) == (
        sent.organization_name, sent.report_id, sent.start, sent.end,
    )  # fmt: skip
    assert (got.successful, got.failed) == (99, 5)
    sts = got.policies[0]
    assert sts.mx_hosts == ("mx1.example.com", "*.example.com")
    assert sts.policy_strings == tuple(STS_LINES)
    assert sts.failure_details == sent.policies[0].failure_details
    raw = email_message(
        sent, submitter="sender.example", mail_from="tlsrpt@sender.example",
        recipients=["tlsrpt@example.com"], unique="0", date=DAY + dt.timedelta(days=1),
        message_id="<r0@sender.example>",
    )  # fmt: skip
    [(name, body, ctype)] = ingest.reports_from_email(raw)
    assert ctype == "application/tlsrpt+gzip" and name.endswith("!0.json.gz")
    assert read(body, name) == got


# --- decoding: gzip and JSON, bounded --------------------------------------------------------


def repeated_zeros(mebibytes: int) -> bytes:
    """A gzip stream of `mebibytes` MiB of zeros, built in O(1) compression work: every
    fully flushed 1 MiB block compresses to the same bytes, so it is repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    head = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return head + block * (mebibytes - 1) + c.flush()  # the trailer's CRC is wrong; never read


def test_decode_gives_the_json_of_a_gzipped_or_plain_report_whatever_it_is_called() -> None:
    body = fixture("google.json")
    assert ingest.decode(body, content_type=None, filename=None) == body
    assert ingest.decode(gzip.compress(body), content_type=None, filename=None) == body
    # Labels are not believed: what the bytes are decides.
    assert ingest.decode(body, content_type="application/tlsrpt+gzip", filename="r.gz") == body
    zipped = gzip.compress(body)
    assert ingest.decode(zipped, content_type="application/tlsrpt+json", filename="r.json") == body
    bom = b"\xef\xbb\xbf \n" + body
    assert ingest.decode(bom, content_type=None, filename=None) == bom
    assert has_note(ingest.parse(bom), "byte order mark")


def test_decode_reads_up_to_four_gzip_members_and_zero_padding() -> None:
    body = fixture("microsoft.json")
    parts = [body[:100], body[100:600], body[600:]]
    joined = b"".join(gzip.compress(p) for p in parts) + bytes(512)
    assert ingest.decode(joined, content_type=None, filename=None) == body
    five = b"".join(gzip.compress(b" ") for _ in range(4)) + gzip.compress(body)
    with pytest.raises(ReportRejected, match="more than 4 gzip members"):
        ingest.decode(five, content_type=None, filename=None)


@pytest.mark.parametrize(
    ("what", "body", "message"),
    [
        ("a gzip bomb: 1 GiB of zeros, stopped at 4 MiB", repeated_zeros(1024),
         "decompresses to more than 4,194,304 bytes"),
        ("a gzip bomb of 10 GiB: refused by its size alone", repeated_zeros(10 * 1024),
         r"is 10,6\d\d,\d\d\d bytes; reports are accepted up to 4,194,304"),
        ("a 10 MB JSON body", b'{"x": "' + b"a" * 10_000_000 + b'"}',
         "is 10,000,009 bytes"),
        ("truncated gzip", gzip.compress(fixture("google.json"))[:-20], "is truncated"),
        ("gzip with a bad CRC", gzip.compress(fixture("google.json"))[:-8] + b"\0\0\0\0"
         + gzip.compress(fixture("google.json"))[-4:], "CRC does not match"),
        ("garbage after a member", gzip.compress(fixture("google.json")) + b"junk",
         "4 bytes after gzip member 1 are not gzip"),
        ("a zip file", b"PK\x03\x04" + bytes(100),
         r"neither gzip nor a JSON object \(it starts with b.PK"),
        ("HTML", b"<html><body>hello</body></html>", "neither gzip nor a JSON object"),
        ("a JSON array", b"[1, 2]", "neither gzip nor a JSON object"),
        ("nothing", b"", "is empty"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 70 else "",
)  # fmt: skip
def test_decode_refuses_what_is_no_report_or_too_big_saying_what_was_wrong(
    what: str, body: bytes, message: str
) -> None:
    with pytest.raises(ReportRejected, match=message):
        ingest.decode(body, content_type="application/tlsrpt+gzip", filename=None)


def test_decode_limits_are_parameters() -> None:
    body = gzip.compress(fixture("google.json"))
    with pytest.raises(ReportRejected, match="decompresses to more than 500 bytes"):
        ingest.decode(body, content_type=None, filename=None, max_size=500)
    two = gzip.compress(b"{") + gzip.compress(b"}")
    with pytest.raises(ReportRejected, match="more than 1 gzip members"):
        ingest.decode(two, content_type=None, filename="r.json.gz", max_members=1)


# --- parsing: refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "doc", "message"),
    [
        ("a report is an object", [minimal()], "is a JSON array, not an object"),
        ("organization-name is required", minimal(**{"organization-name": None}),
         "organization-name"),
        ("organization-name is text", minimal(**{"organization-name": ["x"]}),
         "an array as organization-name"),
        ("report-id is required", minimal(**{"report-id": None}), "report-id"),
        ("report-id is not empty", minimal(**{"report-id": "  "}), "report-id is empty"),
        ("date-range is an object", minimal(**{"date-range": "2026-04-30"}),
         "as date-range"),
        ("times are RFC 3339", minimal(**{"date-range": {"start-datetime": "yesterday",
                                                          "end-datetime": "today"}}),
         "'yesterday' is not an RFC 3339 date-time"),
        ("times are text", minimal(**{"date-range": {"start-datetime": 1777507200,
                                                      "end-datetime": 1777593599}}),
         "start-datetime is the number"),
        ("the range does not end before it starts",
         minimal(**{"date-range": {"start-datetime": "2026-05-01T00:00:00Z",
                                   "end-datetime": "2026-04-30T00:00:00Z"}}),
         "ends .* before it starts"),
        ("policies is a list", minimal(policies={"policy": {}}), "an object as policies"),
        ("each policies entry is an object", minimal(policies=["sts"]),
         r"policies\[0\] is the string"),
        ("an entry has its policy", with_policy(policy=None), r"policies\[0\] has null"),
        ("a policy has its type", with_inner(**{"policy-type": None}),
         "has no policy-type"),
        ("summary is an object", with_policy(summary=[10, 2]), "an array as summary"),
        ("counts are integers, not text",
         with_policy(summary={"total-successful-session-count": "10",
                              "total-failure-session-count": 2}),
         "total-successful-session-count is the string '10'"),
        ("counts are integers, not fractions",
         with_policy(summary={"total-successful-session-count": 1.5,
                              "total-failure-session-count": 2}),
         "is the number '1.5'"),
        ("counts are not booleans",
         with_policy(summary={"total-successful-session-count": True,
                              "total-failure-session-count": 2}),
         "is the boolean 'true'"),
        ("counts are not negative",
         with_policy(summary={"total-successful-session-count": 10,
                              "total-failure-session-count": -2}),
         "total-failure-session-count is the number '-2'"),
        ("counts stay below 2**53",
         with_policy(summary={"total-successful-session-count": 2**53,
                              "total-failure-session-count": 2}),
         "9007199254740992"),
        ("failure-details is a list", with_policy(**{"failure-details": {"result-type": "x"}}),
         "an object as failure-details"),
        ("a failure detail is an object", with_policy(**{"failure-details": [7]}),
         r"failure-details\[0\] is the number"),
        ("a failure has a result type", with_detail(**{"result-type": None}),
         "has no result-type"),
        ("a result type is text", with_detail(**{"result-type": 5}),
         "the number '5' as result-type"),
        ("a failure has a count", with_detail(**{"failed-session-count": None}),
         "has no failed-session-count"),
        ("a failure count is not negative", with_detail(**{"failed-session-count": -1}),
         "failed-session-count is the number '-1'"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 70 else "",
)  # fmt: skip
def test_parse_refuses_a_report_whose_required_members_are_wrong(
    rule: str, doc: Any, message: str
) -> None:
    with pytest.raises(ReportRejected, match=message):
        ingest.parse(as_bytes(doc))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"organization-name": "x",', "not JSON: Expecting"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"organization-name": ' + b"9" * 5000 + b"}", "not usable JSON"),
    ],
    ids=["cut short", "nested 100,000 deep", "a 5,000-digit number"],
)
def test_parse_refuses_what_is_not_usable_json(text: bytes, message: str) -> None:
    with pytest.raises(ReportRejected, match=message):
        ingest.parse(text)


# --- parsing: tolerated, cut short -------------------------------------------------------------


def test_a_megabyte_organisation_name_is_cut_to_200_characters() -> None:
    report = ingest.parse(as_bytes(minimal(**{"organization-name": "A" * 1_000_000})))
    assert report.organization_name == "A" * 200
    assert has_note(report, "organization-name has 1,000,000 characters; the first 200")


def test_other_strings_are_cut_to_1000_characters() -> None:
    report = ingest.parse(as_bytes(with_detail(**{"additional-information": "x" * 5000})))
    assert report.policies[0].failure_details[0].additional_information == "x" * 1000
    assert has_note(report, "additional-information has 5,000 characters")


def test_a_hundred_thousand_failure_details_are_too_big_or_cut_to_a_thousand() -> None:
    entry = '{"result-type":"starttls-not-supported","failed-session-count":1}'
    doc = minimal()
    text = json.dumps(doc).replace(
        json.dumps(doc["policies"][0]["failure-details"]),
        "[" + ",".join([entry] * 100_000) + "]",
    )
    # At the default limit the body is refused before it is parsed ...
    with pytest.raises(ReportRejected, match="reports are accepted up to 4,194,304 bytes"):
        ingest.decode(text.encode(), content_type=None, filename=None)
    # ... and with a larger one the first thousand are kept, the rest counted in a note.
    report = ingest.parse(text, max_size=16 * 1024 * 1024)
    assert len(report.policies[0].failure_details) == ingest.MAX_FAILURE_DETAILS
    assert has_note(report, "99,000 failure-details beyond the first 1,000")
    assert has_note(report, "99,000 failed sessions")
    assert report.failed == 2  # the summary still says what it said


def test_the_failure_detail_limit_is_per_report_across_policies() -> None:
    detail = {"result-type": "certificate-expired", "failed-session-count": 1}
    entry = minimal()["policies"][0]
    entries = [{**entry, "failure-details": [detail] * 600} for _ in range(3)]
    report = ingest.parse(as_bytes(minimal(policies=entries)))
    assert [len(p.failure_details) for p in report.policies] == [600, 400, 0]
    assert has_note(report, "800 failure-details beyond the first 1,000")


def test_more_than_a_hundred_policies_are_cut_to_a_hundred_with_their_sessions_counted() -> None:
    entry = minimal()["policies"][0]
    report = ingest.parse(as_bytes(minimal(policies=[entry] * 150)))
    assert len(report.policies) == 100
    assert has_note(report, "50 policies beyond the first 100 were dropped, with 500 successful")


def test_long_lists_in_a_policy_keep_their_first_hundred_entries() -> None:
    lines = [f"mx: mx{n}.example.com" for n in range(500)]
    report = ingest.parse(as_bytes(with_inner(**{"policy-string": lines, "mx-host": lines})))
    assert report.policies[0].policy_strings == tuple(lines[:100])
    assert len(report.policies[0].mx_hosts) == 100
    assert has_note(report, "policy-string has 500 entries; the first 100 are kept")


@pytest.mark.parametrize(
    ("tolerance", "doc", "check", "note"),
    [
        ("a missing summary counts 0 and 0", with_policy(summary=None),
         lambda r: (r.successful, r.failed) == (0, 0), "has no summary"),
        ("a missing count is 0", with_policy(summary={"total-failure-session-count": 2}),
         lambda r: (r.successful, r.failed) == (0, 2), "summary has no total-successful"),
        ("policy-string as one string", with_inner(**{"policy-string": "3 1 1 aa"}),
         lambda r: r.policies[0].policy_strings == ("3 1 1 aa",), "kept as one entry"),
        ("mx-host-pattern, the prose's name, as a string",
         with_inner(**{"mx-host": None, "mx-host-pattern": "*.Example.COM"}),
         lambda r: r.policies[0].mx_hosts == ("*.example.com",), None),
        ("mx-host and mx-host-pattern that differ: both",
         with_inner(**{"mx-host": "a.example.com", "mx-host-pattern": ["b.example.com"]}),
         lambda r: r.policies[0].mx_hosts == ("a.example.com", "b.example.com"),
         "mx-host and mx-host-pattern differ"),
        ("a missing policy-domain", with_inner(**{"policy-domain": None}),
         lambda r: r.policies[0].policy_domain is None, "has no policy-domain"),
        ("a policy-domain that is no domain", with_inner(**{"policy-domain": "<b>x</b>"}),
         lambda r: r.policies[0].policy_domain is None, "policy-domain is not a domain name"),
        ("a policy-domain in any case, with a dot, or as U-labels",
         with_inner(**{"policy-domain": "Bücher.Example."}),
         lambda r: r.policies[0].policy_domain == "xn--bcher-kva.example", None),
        ("an unknown policy-type, kept", with_inner(**{"policy-type": "sts-v2"}),
         lambda r: r.policies[0].policy_type == "sts-v2", "policy-type 'sts-v2' is none of"),
        ("an unknown result-type, kept", with_detail(**{"result-type": "quantum-decoherence"}),
         lambda r: r.policies[0].failure_details[0].result_type == "quantum-decoherence",
         "kept as sent"),
        ("contact-info null", minimal(**{"contact-info": None}),
         lambda r: r.contact_info is None, None),
        ("contact-info missing", {k: v for k, v in minimal().items() if k != "contact-info"},
         lambda r: r.contact_info is None, "contact-info is missing"),
        ("an optional member of the wrong type is dropped",
         with_detail(**{"receiving-ip": 3405803801}),
         lambda r: r.policies[0].failure_details[0].receiving_ip is None,
         "receiving-ip is the number '3405803801', not a string; dropped"),
        ("a report-id given as a number", minimal(**{"report-id": 12345}),
         lambda r: r.report_id == "12345", "report-id is a number"),
        ("a time without a zone is UTC",
         minimal(**{"date-range": {"start-datetime": "2026-04-30T00:00:00",
                                   "end-datetime": "2026-04-30T23:59:59Z"}}),
         lambda r: r.start == DAY, "has no time zone; read as UTC"),
        ("lower-case t and z (RFC 3339 §5.6)",
         minimal(**{"date-range": {"start-datetime": "2026-04-30t00:00:00z",
                                   "end-datetime": "2026-04-30t23:59:59.5z"}}),
         lambda r: r.end == END.replace(microsecond=500_000), None),
        ("NUL replaced", minimal(**{"organization-name": "Evil\x00Inc"}),
         lambda r: r.organization_name == "Evil\ufffdInc", "NUL characters"),
        ("lone surrogates replaced", minimal(**{"organization-name": "Evil\ud800Inc"}),
         lambda r: r.organization_name == "Evil\ufffdInc", "lone surrogates"),
        ("control characters kept as sent (escaping is the display's job)",
         minimal(**{"organization-name": "\x1b[31mred\x1b[0m\r\n"}),
         lambda r: r.organization_name == "\x1b[31mred\x1b[0m\r\n", None),
        ("no policies at all", minimal(policies=[]),
         lambda r: r.policies == (), "lists no policies"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 80 else "",
)  # fmt: skip
def test_parse_tolerates_what_senders_get_wrong_and_says_so(
    tolerance: str, doc: Any, check: Any, note: str | None
) -> None:
    report = ingest.parse(as_bytes(doc))
    assert check(report), tolerance
    if note is None:
        assert report.notes == (), tolerance
    else:
        assert has_note(report, note), report.notes


def test_duplicate_members_and_bytes_that_are_not_utf8_are_tolerated_with_notes() -> None:
    text = as_bytes(minimal()).replace(b'"report-id": "r-1"', b'"report-id": "a", "report-id": "b"')
    report = ingest.parse(text)
    assert report.report_id == "b" and has_note(report, "'report-id' appears more than once")
    latin1 = as_bytes(minimal(**{"organization-name": "ORG"})).replace(b"ORG", b"Soci\xe9t\xe9")
    report = ingest.parse(latin1)
    assert report.organization_name == "Soci\ufffdt\ufffd"
    assert has_note(report, "not valid UTF-8 (first at byte")


def test_the_policy_domain_of_the_file_name_stands_in_for_a_missing_one() -> None:
    doc = as_bytes(with_inner(**{"policy-domain": None}))
    report = read(doc, "google.com!example.com!1777507200!1777593599!001.json")
    assert report.policies[0].policy_domain == "example.com"
    assert has_note(report, "taken from the report's file name")
    assert ingest.filename_domain("no-bangs-here.json") is None
    assert ingest.filename_domain("a!not a domain!1!2.json") is None


def test_notes_say_each_kind_of_tolerance_once_and_count_the_repeats() -> None:
    entry = minimal()["policies"][0]
    odd = [{**entry, "policy": {**entry["policy"], "policy-type": f"type-{n}"}}
           for n in range(80)]  # fmt: skip
    report = ingest.parse(as_bytes(minimal(policies=odd)))
    assert len(report.notes) == 1
    assert "'type-0'" in report.notes[0] and "(and 79 more like it)" in report.notes[0]


# --- identity --------------------------------------------------------------------------------


def test_a_resent_report_has_the_same_key_and_another_report_another() -> None:
    first = ingest.parse(as_bytes(minimal()))
    key = ingest.dedupe_key(first)
    doc = minimal()
    doc["policies"][0]["summary"]["total-successful-session-count"] = 11
    doc["contact-info"] = "someone-else@sender.example"
    assert ingest.dedupe_key(ingest.parse(as_bytes(doc))) == key  # counts, contact: same
    two = minimal(policies=[*minimal()["policies"], *minimal()["policies"]])
    assert ingest.dedupe_key(ingest.parse(as_bytes(two))) == key  # the same set of policies
    for other in (
        minimal(**{"report-id": "r-2"}),
        minimal(**{"organization-name": "Other Inc."}),
        minimal(**{"date-range": {"start-datetime": "2026-05-01T00:00:00Z",
                                  "end-datetime": "2026-05-01T23:59:59Z"}}),
        with_inner(**{"policy-string": ["version: STSv1", "mode: testing"]}),
        with_inner(**{"policy-domain": "example.org"}),
    ):  # fmt: skip
        assert ingest.dedupe_key(ingest.parse(as_bytes(other))) != key
    assert len(key) == 64 and int(key, 16) >= 0


# --- e-mail ----------------------------------------------------------------------------------


def report_email(
    attachments: list[tuple[bytes, str, str | None]], *, subject: str = "Report Domain: x"
) -> bytes:
    """An e-mail with a text part and `attachments` as (body, content type, file name)."""
    msg = EmailMessage()
    msg["From"] = "tlsrpt@reporter.test"
    msg["To"] = "tlsrpt@example.com"
    msg["Subject"] = subject
    msg["Date"] = "Fri, 01 May 2026 01:00:00 +0000"
    msg["Message-ID"] = "<r1@reporter.test>"
    msg.set_content("This is an aggregate TLS report.\n")
    for body, ctype, name in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(body, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=SMTP)


def test_reports_are_found_in_an_email_by_media_type_or_by_file_name() -> None:
    body = gzip.compress(fixture("google.json"))
    raw = report_email([
        (body, "application/tlsrpt+gzip", "google.com!example.com!1!2!a.json.gz"),
        (fixture("microsoft.json"), "application/octet-stream", "report.json"),
        (body, "application/gzip", "..\\..\\etc/passwd\x07.json.gz"),
        (b"not a report", "application/pdf", "invoice.pdf"),
    ])  # fmt: skip
    found = ingest.reports_from_email(raw)
    assert [(name, ctype) for name, _, ctype in found] == [
        ("google.com!example.com!1!2!a.json.gz", "application/tlsrpt+gzip"),
        ("report.json", "application/octet-stream"),
        ("passwd.json.gz", "application/gzip"),  # the last path component, printable
    ]
    assert found[0][1] == body and found[1][1] == fixture("microsoft.json")


def test_a_forwarded_report_email_is_looked_into() -> None:
    inner = report_email([(gzip.compress(fixture("google.json")), "application/tlsrpt+gzip",
                           "r.json.gz")])  # fmt: skip
    outer = EmailMessage()
    outer["Subject"] = "Fwd: a TLS report"
    outer.set_content("see attached")
    outer.add_attachment(email.message_from_bytes(inner, policy=email.policy.default))
    [(name, body, _)] = ingest.reports_from_email(outer.as_bytes())
    assert name == "r.json.gz" and read(body).organization_name == "Google Inc."


def test_an_email_without_a_report_has_none_and_hostile_ones_are_refused() -> None:
    assert ingest.reports_from_email(report_email([])) == []
    many = report_email([(b"x", "text/plain", f"f{n}.txt") for n in range(60)])
    with pytest.raises(ReportRejected, match="more than 50 MIME parts"):
        ingest.reports_from_email(many)
    with pytest.raises(ReportRejected, match="e-mail is 16,777,217 bytes"):
        ingest.reports_from_email(b"x" * (16 * 1024 * 1024 + 1))
    deep = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + (
        b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 5000
    )
    with pytest.raises(ReportRejected):
        ingest.reports_from_email(deep)


# --- DKIM, against a real DNS peer -----------------------------------------------------------

DNS_ADDRESS = "127.84.0.1"
SELECTOR = "tlsrpt2026"
SIGNER = "reporter.test"


class KeyServer:
    """The lab's authoritative DNS server, on its own thread and event loop, serving
    `reporter.test` with the DKIM key of a key pair made here."""

    def __init__(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        record = f"v=DKIM1; k=rsa; s=tlsrpt; p={base64.b64encode(spki).decode()}"
        strings = " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))
        zone = dns.zone.from_text(
            f"@ 300 IN SOA ns.{SIGNER}. hostmaster.{SIGNER}. 1 3600 600 86400 300\n"
            f"@ 300 IN NS ns.{SIGNER}.\n"
            f"ns 300 IN A {DNS_ADDRESS}\n"
            f"{SELECTOR}._domainkey 300 IN TXT {strings}\n"
            f'nokey._domainkey 300 IN TXT "v=spf1 -all"\n',
            origin=SIGNER,
            relativize=False,
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((DNS_ADDRESS, 0))
            self.port = s.getsockname()[1]
        self.server = AuthServer({SIGNER: zone}, DNS_ADDRESS, self.port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> KeyServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def resolver(self) -> DnsResolver:
        return DnsResolver([(DNS_ADDRESS, self.port)], timeout=3)

    def sign(self, raw: bytes, selector: str = SELECTOR) -> bytes:
        header = dkim.sign(
            raw, selector.encode(), SIGNER.encode(), self.private_pem,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"], tlsrpt=True,
        )  # fmt: skip
        return bytes(header) + raw


@pytest.fixture(scope="module")
def key_server() -> Iterator[KeyServer]:
    with KeyServer() as server:
        yield server


def signed_report_email(server: KeyServer, selector: str = SELECTOR) -> bytes:
    raw = report_email(
        [
            (
                gzip.compress(fixture("google.json")),
                "application/tlsrpt+gzip",
                "google.com!example.com!1777507200!1777593599!a.json.gz",
            )
        ]
    )
    return server.sign(raw, selector)  # fmt: skip


def test_dkim_verifies_a_signed_report_with_the_key_from_dns(key_server: KeyServer) -> None:
    raw = signed_report_email(key_server)
    verified = DkimResult(
        True, SIGNER, SELECTOR, f"signature verified with {SELECTOR}._domainkey.{SIGNER}"
    )
    assert asyncio.run(verify_dkim(raw, key_server.resolver())) == verified
    # As a pipe transport may hand it over: with an mbox From_ line in front.
    mbox = b"From tlsrpt@reporter.test Fri May  1 01:00:00 2026\n" + raw
    assert asyncio.run(verify_dkim(mbox, key_server.resolver())) == verified


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ("the body changed after signing", "signature does not verify: body hash mismatch"),
        ("a signed header changed", "signature does not verify"),
        ("no key at the selector", "no DKIM key at missing._domainkey.reporter.test"),
        ("a TXT record that is no key", "no DKIM key at nokey._domainkey.reporter.test"),
    ],
)
def test_dkim_fails_a_report_that_does_not_verify_and_says_why(
    key_server: KeyServer, change: str, detail: str
) -> None:
    if change == "no key at the selector":
        raw = signed_report_email(key_server, "missing")
    elif change == "a TXT record that is no key":
        raw = signed_report_email(key_server, "nokey")
    else:
        raw = signed_report_email(key_server)
        if change == "the body changed after signing":
            raw = raw.replace(b"aggregate TLS report", b"aggregate TLS rep0rt")
        else:
            raw = raw.replace(b"Subject: Report Domain: x", b"Subject: Report Domain: y")
    result = asyncio.run(verify_dkim(raw, key_server.resolver()))
    assert not result.ok and result.domain == SIGNER
    assert result.detail.startswith(detail), result.detail


def test_dkim_says_unsigned_for_a_report_without_a_signature(key_server: KeyServer) -> None:
    resolver = key_server.resolver()
    result = asyncio.run(verify_dkim(report_email([]), resolver))
    assert result == DkimResult(False, None, None, "unsigned")
    assert resolver.queries == 0


def test_dkim_of_a_key_lookup_that_gets_no_answer_is_a_failure_that_says_so() -> None:
    # Nobody answers on this address: the lookup times out, verification fails, no raise.
    resolver = DnsResolver([("127.84.0.2", 9)], timeout=0.3)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    raw = report_email([])
    raw = bytes(dkim.sign(raw, b"s", b"reporter.test", pem, include_headers=[b"from"])) + raw
    result = asyncio.run(verify_dkim(raw, resolver))
    assert not result.ok and "could not be looked up" in result.detail


# --- mxguard tlsrpt ingest -------------------------------------------------------------------


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'state.db'}"


def ingest_cli(
    store_url: str, *args: str, stdin: bytes | None = None, resolver: str | None = None
) -> Any:
    head = ["--store", store_url] + (["--resolver", resolver] if resolver else [])
    return CliRunner().invoke(main, [*head, "tlsrpt", "ingest", *args], input=stdin)


def stored(store_url: str, domain: str = "example.com") -> list[Any]:
    async def look() -> list[Any]:
        store = await open_store(store_url)
        try:
            return await store.received_between(
                domain,
                dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
                dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
            )
        finally:
            await store.close()  # fmt: skip

    return asyncio.run(look())


@pytest.mark.parametrize("name", [s[0] for s in SENDERS])
def test_ingest_stores_each_senders_report_once(name: str, store_url: str, tmp_path: Path) -> None:
    path = tmp_path / (name + ".gz")
    path.write_bytes(gzip.compress(fixture(name)))
    first = ingest_cli(store_url, "--json", str(path))
    assert first.exit_code == 0, first.output
    doc = json.loads(first.output)
    want = next(s for s in SENDERS if s[0] == name)
    [item] = doc["reports"]
    assert (item["status"], item["organization_name"], item["report_id"]) == (
        "stored", want[1], want[2],
    )  # fmt: skip
    assert (item["successful"], item["failed"]) == (want[4], want[5])
    assert (doc["kind"], doc["stored"], doc["refused"], doc["dkim"]) == ("report", 1, 0, None)
    again = ingest_cli(store_url, "--json", str(path))
    assert again.exit_code == 0 and json.loads(again.output)["duplicates"] == 1
    [record] = stored(store_url, want[3][0])
    assert record.raw == path.read_bytes() and record.source == "file"
    assert (record.report.successful, record.report.failed) == (want[4], want[5])


def test_ingest_reads_a_report_email_on_standard_input_like_a_pipe_transport(
    store_url: str,
) -> None:
    raw = report_email([
        (gzip.compress(fixture("google.json")), "application/tlsrpt+gzip", "g.json.gz"),
        (fixture("microsoft.json"), "application/json", "m.json"),
    ])  # fmt: skip
    result = ingest_cli(store_url, "-", stdin=raw, resolver=f"{DNS_ADDRESS}:9")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("stored: report 2026-04-30T00:00:00Z_example.com from Google")
    assert "1834 successful, 12 failed sessions" in lines[0]
    assert "  DKIM: not verified (unsigned)" in lines
    assert any(line.startswith("stored: report 134221248000000000+example.com") for line in lines)
    records = stored(store_url)
    assert [r.source for r in records] == ["mail", "mail"]
    assert all(r.dkim == DkimResult(False, None, None, "unsigned") for r in records)
    # The same e-mail again (the MTA retried): counted once.
    again = ingest_cli(store_url, "-", stdin=raw, resolver=f"{DNS_ADDRESS}:9")
    assert again.exit_code == 0 and again.output.count("duplicate (already stored)") == 2

    async def totals() -> Any:
        store = await open_store(store_url)
        try:
            return await store.report_totals("example.com", DAY, DAY + dt.timedelta(days=1))
        finally:
            await store.close()

    t = asyncio.run(totals())
    assert (t.reports, t.successful, t.failed) == (2, 1834 + 402, 12 + 7)


def test_ingest_keeps_what_the_dkim_signature_said(store_url: str, key_server: KeyServer) -> None:
    raw = signed_report_email(key_server)
    result = ingest_cli(store_url, "--json", "-", stdin=raw,
                        resolver=f"{DNS_ADDRESS}:{key_server.port}")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["kind"] == "mail" and doc["dkim"]["ok"] is True
    assert doc["dkim"]["domain"] == SIGNER
    [record] = stored(store_url)
    assert record.dkim is not None and record.dkim.ok and record.dkim.selector == SELECTOR
    tampered = ingest_cli(store_url, "-", stdin=raw.replace(b"aggregate TLS", b"aggregate tls"),
                          resolver=f"{DNS_ADDRESS}:{key_server.port}")  # fmt: skip
    # Still accepted (RFC 8460 §5.3: a receiver MAY refuse it); a duplicate here.
    assert tampered.exit_code == 0
    assert "DKIM: not verified (signature does not verify: body hash mismatch" in tampered.output


@pytest.mark.parametrize(
    ("what", "body", "message"),
    [
        ("a gzip bomb", repeated_zeros(1024), "decompresses to more than 4,194,304 bytes"),
        ("truncated gzip", gzip.compress(fixture("google.json"))[:-30], "is truncated"),
        ("a negative count", as_bytes(with_detail(**{"failed-session-count": -3})),
         "failed-session-count is the number '-3'"),
        ("a 10 MB body", b"{" + b" " * 10_000_000 + b"}", "is 10,000,002 bytes"),
        ("an e-mail without a report", report_email([]), "no TLS report in this e-mail"),
        ("plain text", b"hello\n", "no TLS report in this e-mail"),
    ],
)  # fmt: skip
def test_ingest_refuses_bad_input_with_exit_1_and_stores_nothing(
    what: str, body: bytes, message: str, store_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "input"
    path.write_bytes(body)
    result = ingest_cli(store_url, str(path), resolver=f"{DNS_ADDRESS}:9")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("refused: ") and message in result.output, result.output
    assert stored(store_url) == []


def test_ingest_of_an_email_with_a_good_and_a_bad_report_stores_the_good_one_and_exits_1(
    store_url: str,
) -> None:
    raw = report_email([
        (fixture("google.json"), "application/tlsrpt+json", "good.json"),
        (b"{not json", "application/tlsrpt+json", "bad.json"),
    ])  # fmt: skip
    result = ingest_cli(store_url, "--json", "-", stdin=raw, resolver=f"{DNS_ADDRESS}:9")
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert [(r["filename"], r["status"]) for r in doc["reports"]] == [
        ("good.json", "stored"), ("bad.json", "refused"),
    ]  # fmt: skip
    assert doc["reports"][1]["error"].startswith("report is not JSON")
    assert len(stored(store_url)) == 1


def test_ingest_escapes_the_senders_control_characters_in_its_human_output(
    store_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(as_bytes(minimal(**{"organization-name": "\x1b[2J\x1b[31mEvil"})))
    result = ingest_cli(store_url, str(path))
    assert result.exit_code == 0
    assert "\x1b" not in result.output and "\\x1b[2J\\x1b[31mEvil" in result.output
    [record] = stored(store_url)
    assert record.report.organization_name == "\x1b[2J\x1b[31mEvil"  # kept as sent


def test_ingest_usage_errors_exit_2(store_url: str, tmp_path: Path) -> None:
    missing = ingest_cli(store_url, str(tmp_path / "nope.json"))
    assert missing.exit_code == 2 and "No such file" in missing.output
    path = tmp_path / "r.json"
    path.write_bytes(fixture("google.json"))
    bad_store = CliRunner().invoke(
        main, ["tlsrpt", "ingest", "--store", "sqlite://relative", str(path)]
    )
    assert bad_store.exit_code == 2 and "absolute file path" in bad_store.output
    unreachable = CliRunner().invoke(
        main, ["tlsrpt", "ingest", "--store", "redis://127.84.0.3:1/0", str(path)]
    )
    assert unreachable.exit_code == 2


def test_ingest_into_a_store_that_keeps_no_reports_is_a_usage_error_not_a_retry(
    redis_server: Any, tmp_path: Path
) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(fixture("google.json"))
    url = str(redis_server.url(prefix="ingest:"))
    result = CliRunner().invoke(main, ["tlsrpt", "ingest", "--store", url, str(path)])
    assert result.exit_code == 2, result.output
    assert "cannot keep TLS reports received for domain owners" in result.output


def test_ingest_takes_its_own_store_option_over_the_global_one(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(fixture("google.json"))
    mine, other = f"sqlite://{tmp_path / 'mine.db'}", f"sqlite://{tmp_path / 'other.db'}"
    result = CliRunner().invoke(
        main, ["--store", other, "tlsrpt", "ingest", "--store", mine, str(path)]
    )
    assert result.exit_code == 0, result.output
    assert len(stored(mine)) == 1


def test_a_report_kept_by_ingest_gives_back_the_report_that_was_read(
    store_url: str, tmp_path: Path
) -> None:
    body = mxguard_report().to_gzip()
    path = tmp_path / "sender.example!example.com!1777507200!1777593599!0.json.gz"
    path.write_bytes(body)
    assert ingest_cli(store_url, str(path)).exit_code == 0
    [record] = stored(store_url)
    assert record.report == read(body, path.name)
    assert record.dedupe_key == ingest.dedupe_key(read(body))
    assert replace(record, id=None).raw == body


@pytest.mark.parametrize("way", ["flag", "environment"])
def test_ingest_honours_the_global_json_setting(way: str, store_url: str, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(fixture("google.json"))
    head = ["--json"] if way == "flag" else []
    env = {"MXGUARD_JSON": "1"} if way == "environment" else {}
    result = CliRunner().invoke(
        main, [*head, "--store", store_url, "tlsrpt", "ingest", str(path)], env=env
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reports"][0]["status"] == "stored"


def test_ingest_exits_75_when_the_store_fails_while_writing(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database that goes away between opening and writing: the MTA should keep the
    # message and try again (EX_TEMPFAIL), not bounce it.
    from mxguard.adapters.store import StoreError
    from mxguard.adapters.store.sqlite import SQLiteStore

    async def fails(self: SQLiteStore, record: Any) -> bool:
        raise StoreError("SQLite store: disk I/O error", kind="ioerr")

    monkeypatch.setattr(SQLiteStore, "add_received", fails)
    path = tmp_path / "r.json"
    path.write_bytes(fixture("google.json"))
    result = ingest_cli(store_url, str(path))
    assert result.exit_code == 75
    assert "disk I/O error; nothing more was stored, try again" in result.output
