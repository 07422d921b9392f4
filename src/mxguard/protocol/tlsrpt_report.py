"""TLS-RPT aggregate reports: build, serialise and parse them (RFC 8460 §4, §5).

A sending MTA tells each policy domain, once per UTC day, how many SMTP sessions to it
succeeded and which failed, and why. This module turns recorded session outcomes into that
report and into the two things that travel: the gzipped JSON file (§5.1, with the §5 file
name) and the report e-mail (§5.3). It also parses reports back (bounded), so that what we
send can be checked against what we meant. Pure: no I/O, no clock (pass the day, the ids and
the date of the mail), no randomness (pass the unique parts).

Decisions:

- One report per policy domain and UTC day; `date-range` is 00:00:00Z to 23:59:59Z (§4.1).
- One `policies[]` entry per distinct applied policy (type, strings, mx patterns) seen that
  day, so a policy that changed during the day shows as two entries (§4.4).
- Sessions that delivered a TLS report are left out (§5.3: avoids reports about reports).
- `failure-details` are grouped by result type, sending IP, receiving MX host name, receiving
  IP and HELO name; `additional-information` is the most common detail text of the group.
- The MX patterns are sent under `mx-host` as a list (what the §4.5 example and the large
  senders use) and again under `mx-host-pattern` (the name the §4.4 prose uses); receivers
  read one or the other, and ignore keys they do not know.
"""

from __future__ import annotations

import datetime as dt
import enum
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mxguard.protocol.results import ResultType

MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"  # RFC 8460 §6.4
MEDIA_TYPE_JSON = "application/tlsrpt+json"  # RFC 8460 §6.4
MAX_REPORT_SIZE = 16 * 1024 * 1024  # decompressed; a report bigger than this is refused
MAX_DETAIL = 1000  # characters of `additional-information`


class ReportError(ValueError):
    """A report violates RFC 8460 §4 (or is too big to read); the message says which rule."""


class PolicyType(enum.StrEnum):
    """RFC 8460 §4.4 `policy-type`: the kind of policy a sender applied. The value is the wire
    spelling; the RFC allows exactly these three."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


def parse_policy_type(value: str) -> PolicyType:
    """`value` as a PolicyType; ReportError naming the allowed values when it is none."""
    try:
        return PolicyType(value)
    except ValueError:
        raise ReportError(
            f"policy-type {value!r} is not one of {tuple(t.value for t in PolicyType)} "
            "(RFC 8460 §4.4)"
        ) from None


@dataclass(frozen=True, slots=True)
class ReportedPolicy:
    """A policy as a TLS-RPT report names it (RFC 8460 §4.4 `policy`: `policy-type`,
    `policy-string`, `mx-host`), and where the domain wanted reports then (its `rua`, §3).

    The one shape of "the policy a session was made under": the sender records it with each
    session (`SessionResult.policy`), the Postfix policy server with what it served
    (`ServedPolicy.policy`), and a report's `policies[]` entries are built from it (without
    the `rua`, which a report does not name). The engine makes it from a delivery policy in
    one place, `DeliveryPolicy.reported()`.
    """

    policy_type: PolicyType
    policy_strings: tuple[str, ...] = ()  # STS policy lines, or one TLSA RR each
    mx_patterns: tuple[str, ...] = ()  # the STS policy's mx patterns
    rua: tuple[str, ...] = ()  # the domain's TLS-RPT rua (RFC 8460 §3); () in a report


NO_POLICY_FOUND = ReportedPolicy(PolicyType.NO_POLICY_FOUND)


class SessionLike(Protocol):
    """What a recorded session must offer (mxguard.adapters.store.SessionResult does)."""

    @property
    def policy_domain(self) -> str: ...
    @property
    def policy(self) -> ReportedPolicy: ...
    @property
    def result_type(self) -> ResultType | None: ...
    @property
    def other_result_type(self) -> str | None: ...
    @property
    def sending_ip(self) -> str | None: ...
    @property
    def receiving_mx(self) -> str | None: ...
    @property
    def receiving_ip(self) -> str | None: ...
    @property
    def receiving_helo(self) -> str | None: ...
    @property
    def detail(self) -> str | None: ...
    @property
    def is_report(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class FailureDetail:
    """RFC 8460 §4.4 `failure-details[]`: one group of failed sessions."""

    # A result type this mxguard does not know (RFC 8460 made them an IANA registry, which may
    # grow) stays the text it came as: in a parsed report, or read back from a newer store.
    result_type: ResultType | str
    sending_mta_ip: str | None
    receiving_mx_hostname: str | None
    receiving_ip: str | None
    receiving_mx_helo: str | None
    failed_session_count: int
    additional_information: str | None = None
    failure_reason_code: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """One `policies[]` entry: a policy (RFC 8460 §4.4 `policy`: its `policy-domain` and the
    policy itself, without a `rua`) and the sessions made under it."""

    policy_domain: str
    policy: ReportedPolicy
    successful: int  # total-successful-session-count
    failed: int  # total-failure-session-count
    failure_details: tuple[FailureDetail, ...] = ()


@dataclass(frozen=True, slots=True)
class Report:
    """An RFC 8460 §4 aggregate report for one policy domain and one UTC day."""

    organization_name: str
    start: dt.datetime  # 00:00:00Z of the day
    end: dt.datetime  # 23:59:59Z of the day
    contact_info: str
    report_id: str
    policies: tuple[PolicyResult, ...]

    @property
    def policy_domain(self) -> str:
        return self.policies[0].policy_domain if self.policies else ""

    @property
    def successful(self) -> int:
        return sum(p.successful for p in self.policies)

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.policies)

    def to_json(self) -> dict[str, Any]:
        return {
            "organization-name": self.organization_name,
            "date-range": {
                "start-datetime": _rfc3339(self.start),
                "end-datetime": _rfc3339(self.end),
            },
            "contact-info": self.contact_info,
            "report-id": self.report_id,
            "policies": [_policy_json(p) for p in self.policies],
        }

    def to_bytes(self) -> bytes:
        """The report as UTF-8 JSON (RFC 8460 §4.4: I-JSON, RFC 7493)."""
        return json.dumps(self.to_json(), ensure_ascii=False, indent=1).encode("utf-8")

    def to_gzip(self) -> bytes:
        """The gzipped report (§5.1); mtime 0 so the same report gives the same bytes."""
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
            f.write(self.to_bytes())
        return buffer.getvalue()


def day_range(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[00:00:00Z, next day 00:00:00Z) of a UTC day: the sessions a report covers (§4.1)."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def report_id_for(day: dt.date, domain: str, unique: str) -> str:
    """A report-id that says what it covers and cannot collide (§4.4: unique per report)."""
    return f"{day.isoformat()}T00:00:00Z_{domain}_{unique}"


def aggregate(
    sessions: Iterable[SessionLike],
    *,
    day: dt.date,
    organization_name: str,
    contact_info: str,
    unique: dict[str, str] | None = None,
) -> list[Report]:
    """One report per policy domain among `sessions`, for the UTC `day` (RFC 8460 §4).

    `unique` maps a policy domain to the unique part of its report-id (default: "0"); report
    sessions (`is_report`) are not counted (§5.3). Domains are in name order.
    """
    by_domain: dict[str, dict[ReportedPolicy, list[SessionLike]]] = {}
    for s in sessions:
        if s.is_report:
            continue  # RFC 8460 §5.3: the sessions that delivered reports are not reported
        by_domain.setdefault(s.policy_domain, {}).setdefault(_applied(s), []).append(s)
    start, after = day_range(day)
    end = after - dt.timedelta(seconds=1)
    reports = []
    for domain in sorted(by_domain):
        policies = tuple(_policy_result(domain, p, ss) for p, ss in by_domain[domain].items())
        reports.append(
            Report(
                organization_name=organization_name,
                start=start,
                end=end,
                contact_info=contact_info,
                report_id=report_id_for(day, domain, (unique or {}).get(domain, "0")),
                policies=policies,
            )
        )
    return reports


def _applied(s: SessionLike) -> ReportedPolicy:
    """The `policy` entry a session counts under (RFC 8460 §4.4): one per distinct type, strings
    and (for MTA-STS) mx patterns; where reports go is not part of it."""
    try:
        kind = parse_policy_type(s.policy.policy_type)
    except ReportError as exc:
        raise ReportError(f"session for {s.policy_domain}: {exc}") from None
    patterns = s.policy.mx_patterns if kind is PolicyType.STS else ()
    return ReportedPolicy(kind, tuple(s.policy.policy_strings), tuple(patterns))


def _policy_result(
    domain: str, policy: ReportedPolicy, sessions: Sequence[SessionLike]
) -> PolicyResult:
    groups: dict[tuple[str, str | None, str | None, str | None, str | None], list[str]] = {}
    successful = 0
    for s in sessions:
        result = s.result_type or s.other_result_type
        if result is None:
            successful += 1
            continue
        key = (result, s.sending_ip, s.receiving_mx, s.receiving_ip, s.receiving_helo)
        groups.setdefault(key, []).append(s.detail or "")
    details = []
    for (rtype, sip, mx, rip, helo), texts in sorted(groups.items(), key=lambda kv: _sort(kv[0])):
        common = Counter(t for t in texts if t).most_common(1)
        details.append(
            FailureDetail(
                result_type=rtype,
                sending_mta_ip=sip,
                receiving_mx_hostname=mx,
                receiving_ip=rip,
                receiving_mx_helo=helo,
                failed_session_count=len(texts),
                additional_information=common[0][0][:MAX_DETAIL] if common else None,
            )
        )
    return PolicyResult(
        domain, policy, successful, sum(d.failed_session_count for d in details), tuple(details)
    )


def _sort(key: tuple[str | None, ...]) -> tuple[str, ...]:
    return tuple(k or "" for k in key)


def _rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _policy_json(p: PolicyResult) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "policy-type": p.policy.policy_type.value,
        "policy-string": list(p.policy.policy_strings),
        "policy-domain": p.policy_domain,
    }
    if p.policy.mx_patterns:
        policy["mx-host"] = list(p.policy.mx_patterns)
        policy["mx-host-pattern"] = list(p.policy.mx_patterns)
    out: dict[str, Any] = {
        "policy": policy,
        "summary": {
            "total-successful-session-count": p.successful,
            "total-failure-session-count": p.failed,
        },
    }
    if p.failure_details:
        out["failure-details"] = [_detail_json(d) for d in p.failure_details]
    return out


def _detail_json(d: FailureDetail) -> dict[str, Any]:
    out: dict[str, Any] = {"result-type": str(d.result_type)}
    # Optional members are left out rather than sent empty: receivers differ on "" vs null.
    for key, value in (
        ("sending-mta-ip", d.sending_mta_ip),
        ("receiving-mx-hostname", d.receiving_mx_hostname),
        ("receiving-mx-helo", d.receiving_mx_helo),
        ("receiving-ip", d.receiving_ip),
    ):
        if value:
            out[key] = value
    out["failed-session-count"] = d.failed_session_count
    if d.additional_information:
        out["additional-information"] = d.additional_information
    if d.failure_reason_code:
        out["failure-reason-code"] = d.failure_reason_code
    return out


# --- §5: file name and e-mail ------------------------------------------------------------


def filename(report: Report, submitter: str, unique: str, *, gzipped: bool = True) -> str:
    """`<submitter>!<policy-domain>!<begin>!<end>!<unique>.json[.gz]` (RFC 8460 §5.1)."""
    for name, value in (("submitter", submitter), ("unique", unique)):
        if not value or "!" in value or "/" in value or any(c.isspace() for c in value):
            raise ReportError(
                f"{name} {value!r} cannot be part of an RFC 8460 §5.1 file name: it must be "
                "non-empty, without '!', '/' or spaces"
            )
    begin, end = int(report.start.timestamp()), int(report.end.timestamp())
    suffix = ".json.gz" if gzipped else ".json"
    return f"{submitter}!{report.policy_domain}!{begin}!{end}!{unique}{suffix}"


def subject(report: Report, submitter: str) -> str:
    """The §5.3 Subject: `Report Domain: <d> Submitter: <s> Report-ID: <<id>>`."""
    return (
        f"Report Domain: {report.policy_domain} Submitter: {submitter} "
        f"Report-ID: <{report.report_id}>"
    )


def email_message(
    report: Report,
    *,
    submitter: str,
    mail_from: str,
    recipients: Sequence[str],
    unique: str,
    date: dt.datetime,
    message_id: str,
) -> bytes:
    """The report e-mail of RFC 8460 §5.3: `multipart/report; report-type="tlsrpt"` with a
    text part for people and the gzipped report, plus `TLS-Required: No` (RFC 8689 §5: a
    report about TLS problems must still get through when TLS is the problem)."""
    # Imported here: the store and every command import this module for its types, and only
    # the reporter builds mail (the email package costs a start-up several milliseconds).
    import email.utils
    from email.mime.application import MIMEApplication
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText
    from email.policy import SMTP

    msg = MIMEMultipart("report")
    msg.set_param("report-type", "tlsrpt")
    msg["From"] = f"<{mail_from}>"
    msg["To"] = ", ".join(f"<{r}>" for r in recipients) or "undisclosed-recipients:;"
    msg["Date"] = email.utils.format_datetime(date.astimezone(dt.UTC))
    msg["Message-ID"] = message_id
    msg["Subject"] = subject(report, submitter)
    msg["TLS-Report-Domain"] = report.policy_domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to reports
    msg.attach(MIMEText(human_text(report, submitter), "plain", "utf-8"))
    name = filename(report, submitter, unique)
    part = MIMEApplication(report.to_gzip(), "tlsrpt+gzip", name=name)
    part.add_header("Content-Disposition", "attachment", filename=name)
    msg.attach(part)
    return msg.as_bytes(policy=SMTP)


def human_text(report: Report, submitter: str) -> str:
    """The human-readable part of the report e-mail."""
    lines = [
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for "
        f"{report.policy_domain}, covering {_rfc3339(report.start)} to {_rfc3339(report.end)}.",
        "",
        f"Report-ID: {report.report_id}",
        f"Successful sessions: {report.successful}",
        f"Failed sessions: {report.failed}",
    ]
    for p in report.policies:
        for d in p.failure_details:
            lines.append(
                f"  {d.failed_session_count} x {d.result_type} at "
                f"{d.receiving_mx_hostname or '?'} ({d.receiving_ip or '?'})"
            )
    lines += ["", "The machine-readable report is attached (application/tlsrpt+gzip)."]
    return "\n".join(lines) + "\n"


# --- parsing -------------------------------------------------------------------------------


def decompress(data: bytes, max_size: int = MAX_REPORT_SIZE) -> bytes:
    """`data` gunzipped if it is gzip, capped at `max_size` bytes (a gzip bomb stops here)."""
    if not data.startswith(b"\x1f\x8b"):
        if len(data) > max_size:
            raise ReportError(f"report is {len(data)} bytes; the limit is {max_size}")
        return data
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise ReportError(f"report is not valid gzip: {exc}") from None
    if len(out) > max_size:
        raise ReportError(f"report decompresses to more than {max_size} bytes")
    return out


def parse_report(data: bytes, max_size: int = MAX_REPORT_SIZE) -> Report:
    """Parse a report (JSON or gzipped JSON) and check the members §4.4 requires."""
    try:
        doc = json.loads(decompress(data, max_size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"report is not UTF-8 JSON: {exc}") from None
    try:
        return _report_from_json(doc)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ReportError):
            raise
        raise ReportError(f"report does not follow RFC 8460 §4.4: {exc!r}") from None


def _report_from_json(doc: Any) -> Report:
    if not isinstance(doc, dict):
        raise ReportError("report is not a JSON object")
    for key in ("organization-name", "date-range", "contact-info", "report-id", "policies"):
        if key not in doc:
            raise ReportError(f"report has no {key!r}; RFC 8460 §4.4 requires it")
    rng = doc["date-range"]
    policies = []
    for p in doc["policies"]:
        pol = p["policy"]
        kind = parse_policy_type(pol["policy-type"])
        mx = pol.get("mx-host", pol.get("mx-host-pattern", []))
        details = tuple(
            FailureDetail(
                result_type=_result_type(str(d["result-type"])),
                sending_mta_ip=d.get("sending-mta-ip"),
                receiving_mx_hostname=d.get("receiving-mx-hostname"),
                receiving_ip=d.get("receiving-ip"),
                receiving_mx_helo=d.get("receiving-mx-helo"),
                failed_session_count=_count(d["failed-session-count"]),
                additional_information=d.get("additional-information"),
                failure_reason_code=d.get("failure-reason-code"),
            )
            for d in p.get("failure-details", [])
        )
        policies.append(
            PolicyResult(
                str(pol["policy-domain"]),
                ReportedPolicy(
                    kind,
                    tuple(pol.get("policy-string", [])),
                    (mx,) if isinstance(mx, str) else tuple(mx),
                ),
                _count(p["summary"]["total-successful-session-count"]),
                _count(p["summary"]["total-failure-session-count"]),
                details,
            )
        )
    return Report(
        organization_name=str(doc["organization-name"]),
        start=_parse_time(rng["start-datetime"]),
        end=_parse_time(rng["end-datetime"]),
        contact_info=str(doc["contact-info"]),
        report_id=str(doc["report-id"]),
        policies=tuple(policies),
    )


def _result_type(text: str) -> ResultType | str:
    """A parsed `result-type`: a ResultType, or the text of one registered after RFC 8460."""
    try:
        return ResultType(text)
    except ValueError:
        return text


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"session count {value!r} is not a non-negative integer")
    return value


def _parse_time(text: Any) -> dt.datetime:
    value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ReportError(f"date-time {text!r} has no time zone (RFC 3339 requires one)")
    return value.astimezone(dt.UTC)
