"""Received TLS-RPT aggregate reports: one tolerant, bounded reader (RFC 8460 §4, §5).

mxguard sends reports (tlsrpt_report.py); this module reads the reports other senders send
to a domain owner's `rua`. Anyone can POST to an https `rua` or mail a `mailto` one, so every
byte is hostile until proven otherwise, and every string in a report is chosen by whoever
sent it. Pure: no I/O, no clock.

The way in, for each report:

1. `reports_from_email(raw)`: the report attachments of a whole e-mail (§5.3), or skip this
   step for a body POSTed over HTTPS (§5.4) or a file;
2. `decode(body, ...)`: gzip (§5.2) or plain JSON to JSON text, decompressed in bounded steps;
3. `parse(json_text)`: a `ReceivedReport` of frozen dataclasses, with `notes` saying every
   tolerance applied and every value cut short;
4. `dedupe_key(report)`: the identity under which a resent report is stored once.

Anything that is refused raises `ReportRejected`, whose message says what was wrong.

Decisions (docs/rfc-notes.md, "Receiving reports", has the reasons):

- Bounds. The decompressed JSON is at most 4 MiB (`MAX_JSON_SIZE`, a parameter), and gzip
  input at most 4 members; a larger body, a gzip bomb, a truncated stream or a bad CRC is
  refused. That bound also bounds the work of parsing, so lists are cut short rather than
  refused: the first 100 `policies` and the first 1,000 `failure-details` of a report (all
  policies together) are kept, and a note counts what was dropped and the sessions it held.
  Each `policy-string` and `mx-host` list keeps its first 100 entries. A string keeps its first
  1,000 characters (`organization-name` 200). Notes are bounded too (50 kinds of note, each
  counted, not repeated).
- Session counts are JSON integers from 0 to 2**53 - 1 (the integers every JSON reader
  represents exactly, RFC 7493 §2.2); any other count refuses the report: counts are what the
  report is for.
- Required members of the wrong JSON type (`organization-name`, `date-range`, `report-id`,
  `policies`, `policy`, `policy-type`, `summary`, `failure-details`, `result-type`,
  `failed-session-count`) refuse the report. Optional members of the wrong type are dropped
  with a note; missing optional members are simply absent.
- Accepted as the RFC's own: the MX patterns under `mx-host` (the name in the §4.4 schema)
  or `mx-host-pattern` (the name in the prose), each a string or a list (both kept when they
  differ, with a note); times with any UTC offset, or a lower-case `t` and `z`.
- Tolerated, with a note: `policy-string` as one string; `additional-info-uri` for
  `additional-information`; a missing `summary` or count (0); a missing or unusable
  `policy-domain` (taken from the §5.1 file name when the caller passes it); `contact-info`
  missing; a `report-id` given as a number; a time without a zone (UTC); an unknown
  `policy-type` or `result-type` (kept as the text sent: result types are an IANA registry
  that grows, RFC 8460 §6); duplicate JSON members (the last counts); a UTF-8 BOM, or bytes
  that are not UTF-8 (replaced).
- Text is kept as sent, control characters included, except NUL and lone surrogates (no
  store can keep them: replaced by U+FFFD, with a note). Host names and the policy domain are
  normalised (lower case, A-labels, no trailing dot) when they are names, so that one MX host
  is counted under one name. Escaping for display is the job of whatever shows the text (a
  terminal, HTML, CSV): nothing here is safe to print raw.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from mxguard.protocol import names
from mxguard.protocol.results import ResultType

if TYPE_CHECKING:
    from email.message import Message

from mxguard.protocol.tlsrpt_report import (
    MEDIA_TYPE_GZIP,
    MEDIA_TYPE_JSON,
    FailureDetail,
    PolicyType,
)

MAX_JSON_SIZE = 4 * 1024 * 1024  # bytes of JSON text, after decompression
MAX_GZIP_MEMBERS = 4  # concatenated gzip members (RFC 1952 §2.2) in one body
MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # bytes of a whole report e-mail
MAX_MESSAGE_PARTS = 50  # MIME parts of a report e-mail, nested ones included
MAX_TEXT = 1000  # characters kept of each string
MAX_ORGANIZATION = 200  # characters kept of `organization-name`
MAX_POLICIES = 100  # `policies` entries kept per report
MAX_FAILURE_DETAILS = 1000  # `failure-details` entries kept per report, all policies together
MAX_LIST_ITEMS = 100  # entries kept of each `policy-string` and `mx-host` list
MAX_COUNT = 2**53 - 1  # the largest session count accepted (RFC 7493 §2.2)
MAX_NOTES = 50  # distinct kinds of note kept
MAX_FILENAME = 255  # characters kept of an attachment's file name

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_GZIP_TYPES = frozenset({MEDIA_TYPE_GZIP, "application/gzip", "application/x-gzip"})
_REPORT_TYPES = frozenset({MEDIA_TYPE_GZIP, MEDIA_TYPE_JSON})
_REPORT_SUFFIXES = (".json.gz", ".json", ".gz")


class ReportRejected(ValueError):
    """A received report (or the e-mail or body carrying it) is refused; `reason` says what was
    wrong, for the sender's log or the operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ReceivedPolicy:
    """One `policies[]` entry of a received report (RFC 8460 §4.4): the policy the sender
    applied and the sessions it made under it."""

    policy_type: PolicyType | str  # a PolicyType, or the text of a type RFC 8460 lacks
    policy_strings: tuple[str, ...]  # `policy-string`: STS policy lines, or TLSA records
    policy_domain: str | None  # lower-case A-label; None when the report named none usable
    mx_hosts: tuple[str, ...]  # `mx-host` / `mx-host-pattern`: the STS policy's MX patterns
    successful: int  # total-successful-session-count
    failed: int  # total-failure-session-count
    failure_details: tuple[FailureDetail, ...] = ()


@dataclass(frozen=True, slots=True)
class ReceivedReport:
    """A received aggregate report (RFC 8460 §4.4), as far as it could be read. Every string in
    it is what the sender chose to send (bounded, not escaped); `notes` says what was
    tolerated or cut short on the way."""

    organization_name: str
    start: dt.datetime  # `date-range` `start-datetime`, UTC
    end: dt.datetime  # `end-datetime`, UTC
    contact_info: str | None
    report_id: str
    policies: tuple[ReceivedPolicy, ...]
    notes: tuple[str, ...] = ()

    @property
    def policy_domains(self) -> tuple[str, ...]:
        """The policy domains the report is about, in order of first appearance."""
        return tuple(dict.fromkeys(p.policy_domain for p in self.policies if p.policy_domain))

    @property
    def successful(self) -> int:
        return sum(p.successful for p in self.policies)

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.policies)

    def to_json(self) -> dict[str, Any]:
        return {
            "organization_name": self.organization_name,
            "start": _rfc3339(self.start),
            "end": _rfc3339(self.end),
            "contact_info": self.contact_info,
            "report_id": self.report_id,
            "policies": [_policy_json(p) for p in self.policies],
            "notes": list(self.notes),
        }


# --- decoding: gzip or JSON ------------------------------------------------------------------


def looks_like_report(body: bytes) -> bool:
    """Whether `body` is a report body (gzip, or JSON text starting with `{`) rather than, say,
    an e-mail; decides by content, as `decode` does."""
    if body.startswith(_GZIP_MAGIC):
        return True
    return body.removeprefix(_BOM).lstrip(b" \t\r\n").startswith(b"{")


def decode(
    body: bytes,
    *,
    content_type: str | None,
    filename: str | None,
    max_size: int = MAX_JSON_SIZE,
    max_members: int = MAX_GZIP_MEMBERS,
) -> bytes:
    """The JSON text of a report body: gunzipped (RFC 8460 §5.2), or as it is when it is JSON.

    What the body is decides, not what it is called: senders label gzip as JSON and the
    reverse, so `content_type` and `filename` only make the error messages precise. At most
    `max_size` bytes come out and at most `max_members` gzip members are read; the input is
    decompressed in bounded steps, so a gzip bomb stops at the limit."""
    what = _described(content_type, filename)
    if len(body) > max_size:
        raise ReportRejected(
            f"{what} is {len(body):,} bytes; reports are accepted up to {max_size:,} bytes"
        )
    if body.startswith(_GZIP_MAGIC):
        return _gunzip(body, what, max_size, max_members)
    if looks_like_report(body):
        return body
    if not body:
        raise ReportRejected(f"{what} is empty")
    declared = "gzip" if _is_gzip_label(content_type, filename) else "JSON"
    raise ReportRejected(
        f"{what} is neither gzip nor a JSON object (it starts with {body[:8]!r}); a TLS "
        f"report is a gzipped JSON object or a JSON object (RFC 8460 §4.4, §5.2), and this "
        f"one is labelled {declared}"
    )


def _gunzip(body: bytes, what: str, max_size: int, max_members: int) -> bytes:
    out = bytearray()
    rest = body
    members = 0
    while rest:
        if not rest.startswith(_GZIP_MAGIC):
            if not rest.strip(b"\x00"):
                break  # zero padding after the last member, as gzip(1) allows
            raise ReportRejected(
                f"{what}: {len(rest):,} bytes after gzip member {members} are not gzip"
            )
        if members == max_members:
            raise ReportRejected(
                f"{what} has more than {max_members} gzip members; a report is one member"
            )
        members += 1
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        chunk = rest
        try:
            while not inflater.eof:
                piece = inflater.decompress(chunk, max_size - len(out) + 1)
                chunk = inflater.unconsumed_tail
                out += piece
                if len(out) > max_size:
                    raise ReportRejected(
                        f"{what} decompresses to more than {max_size:,} bytes (a gzip bomb, "
                        "or a report too big to accept); nothing of it is kept"
                    )
                if not piece and not chunk:
                    raise ReportRejected(
                        f"{what} is truncated: gzip member {members} ends before its end "
                        f"(after {len(out):,} bytes of JSON)"
                    )
        except zlib.error as exc:
            problem = _ZLIB_PROBLEMS.get(str(exc).rsplit(": ", 1)[-1], str(exc))
            raise ReportRejected(f"{what} is not valid gzip: {problem}") from None
        rest = inflater.unused_data
    return bytes(out)


# zlib's words for a damaged gzip trailer (RFC 1952 §2.3.1), in words for people.
_ZLIB_PROBLEMS = {
    "incorrect data check": "its CRC does not match its data (the report is damaged)",
    "incorrect length check": "its length field does not match its data (the report is damaged)",
}


def _described(content_type: str | None, filename: str | None) -> str:
    if filename:
        return f"report {_shown(filename)}"
    if content_type:
        return f"report body ({_shown(content_type)})"
    return "report body"


def _is_gzip_label(content_type: str | None, filename: str | None) -> bool:
    return (content_type or "").lower() in _GZIP_TYPES or (filename or "").lower().endswith(".gz")


# --- parsing ---------------------------------------------------------------------------------


class _Notes:
    """Notes by kind: the first text of each kind is kept, repeats are counted."""

    def __init__(self) -> None:
        self._kinds: dict[str, list[Any]] = {}
        self._more = 0

    def add(self, kind: str, text: str) -> None:
        seen = self._kinds.get(kind)
        if seen is not None:
            seen[1] += 1
        elif len(self._kinds) < MAX_NOTES:
            self._kinds[kind] = [text, 1]
        else:
            self._more += 1

    def result(self) -> tuple[str, ...]:
        out = [
            text if n == 1 else f"{text} (and {n - 1:,} more like it)"
            for text, n in self._kinds.values()
        ]
        if self._more:
            out.append(f"{self._more:,} further notes left out")
        return tuple(out)


@dataclass
class _Reader:
    """The state of one parse: notes, how many failure details are still allowed, the hint."""

    notes: _Notes = field(default_factory=_Notes)
    details_left: int = MAX_FAILURE_DETAILS
    details_dropped: int = 0
    details_dropped_sessions: int = 0
    domain_hint: str | None = None


def parse(
    json_text: str | bytes, *, max_size: int = MAX_JSON_SIZE, domain_hint: str | None = None
) -> ReceivedReport:
    """Read a received report (RFC 8460 §4.4), tolerantly and within bounds (module docstring).

    `domain_hint`: the policy domain the report was delivered for (the second field of its
    §5.1 file name, `filename_domain`), used for a policy that names none. ReportRejected when
    the text is not JSON, too big, or not a report."""
    reader = _Reader()
    if domain_hint:
        try:
            reader.domain_hint = names.normalise_host(domain_hint)
        except names.HostNameError:
            reader.domain_hint = None
    if len(json_text) > max_size:
        raise ReportRejected(
            f"report is {len(json_text):,} long; reports are accepted up to {max_size:,} bytes"
        )
    text = _text_of(json_text, reader.notes)
    doc = _load(text, reader.notes)
    if not isinstance(doc, dict):
        raise ReportRejected(
            f"report is a JSON {_kind(doc)}, not an object (RFC 8460 §4.4); is it a TLS report?"
        )
    return _report(doc, reader)


def _text_of(json_text: str | bytes, notes: _Notes) -> str:
    if isinstance(json_text, str):
        return json_text
    data = json_text
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
        notes.add("bom", "the report starts with a UTF-8 byte order mark; ignored")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        notes.add(
            "utf-8",
            f"the report is not valid UTF-8 (first at byte {exc.start:,}); undecodable bytes "
            "were replaced by U+FFFD (RFC 8460 §4.4 asks for I-JSON, which is UTF-8)",
        )
        return data.decode("utf-8", errors="replace")


def _load(text: str, notes: _Notes) -> Any:
    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                notes.add(
                    "duplicate",
                    f"JSON member {_shown(key)} appears more than once in an object; the last "
                    "one counts (RFC 7493 §2.3 forbids duplicates)",
                )
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=members)
    except json.JSONDecodeError as exc:
        raise ReportRejected(
            f"report is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:
        raise ReportRejected("report is not usable JSON: it is nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ReportRejected(f"report is not usable JSON: {exc}") from None


def _report(doc: dict[str, Any], r: _Reader) -> ReceivedReport:
    org = _required_text(doc, "organization-name", "report", r, MAX_ORGANIZATION)
    if not org:
        r.notes.add("organization", "organization-name is empty")
    given = doc.get("report-id")
    if isinstance(given, int) and not isinstance(given, bool):
        r.notes.add("report-id", "report-id is a number, not a string; kept as its digits")
        doc = {**doc, "report-id": str(given)}
    report_id = _required_text(doc, "report-id", "report", r, MAX_TEXT)
    if not report_id.strip():
        raise ReportRejected("report-id is empty; RFC 8460 §4.4 makes it the report's identity")
    start, end = _date_range(doc.get("date-range"), r)
    contact: str | None = None
    if "contact-info" not in doc:
        r.notes.add("contact-info", "contact-info is missing (RFC 8460 §4.4 requires it)")
    else:
        contact = _optional_text(doc, "contact-info", "report", r)
    raw_policies = doc.get("policies")
    if not isinstance(raw_policies, list):
        raise ReportRejected(
            f"report has {_what(raw_policies)} as policies; RFC 8460 §4.4 requires a list"
        )
    if not raw_policies:
        r.notes.add("no-policies", "the report lists no policies")
    policies = []
    for i, entry in enumerate(raw_policies[:MAX_POLICIES]):
        policies.append(_policy(entry, f"policies[{i}]", r))
    if len(raw_policies) > MAX_POLICIES:
        dropped = raw_policies[MAX_POLICIES:]
        ok, bad = _sessions_of(dropped)
        r.notes.add(
            "policies",
            f"{len(dropped):,} policies beyond the first {MAX_POLICIES} were dropped, with "
            f"{ok:,} successful and {bad:,} failed sessions",
        )
    if r.details_dropped:
        r.notes.add(
            "failure-details",
            f"{r.details_dropped:,} failure-details beyond the first {MAX_FAILURE_DETAILS:,} "
            f"of the report were dropped ({r.details_dropped_sessions:,} failed sessions; the "
            "summaries still count them)",
        )
    return ReceivedReport(
        organization_name=org,
        start=start,
        end=end,
        contact_info=contact,
        report_id=report_id,
        policies=tuple(policies),
        notes=r.notes.result(),
    )


def _date_range(value: Any, r: _Reader) -> tuple[dt.datetime, dt.datetime]:
    if not isinstance(value, dict):
        raise ReportRejected(
            f"report has {_what(value)} as date-range; RFC 8460 §4.4 requires an object with "
            "start-datetime and end-datetime"
        )
    start = _datetime(value.get("start-datetime"), "start-datetime", r)
    end = _datetime(value.get("end-datetime"), "end-datetime", r)
    if end < start:
        raise ReportRejected(
            f"date-range ends ({_rfc3339(end)}) before it starts ({_rfc3339(start)})"
        )
    return start, end


def _datetime(value: Any, name: str, r: _Reader) -> dt.datetime:
    if not isinstance(value, str):
        raise ReportRejected(
            f"date-range {name} is {_what(value)}; RFC 8460 §4.4 requires an RFC 3339 "
            "date-time such as 2026-05-01T00:00:00Z"
        )
    # RFC 3339 §5.6 allows a lower-case "t" and "z".
    text = value.strip().upper()
    try:
        if len(text) > 40:
            raise ValueError
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReportRejected(
            f"date-range {name} {_shown(value)} is not an RFC 3339 date-time such as "
            "2026-05-01T00:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        r.notes.add("zone", f"date-range {name} {_shown(value)} has no time zone; read as UTC")
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        raise ReportRejected(
            f"date-range {name} {_shown(value)} is outside the years 1 to 9999 in UTC"
        ) from None


def _policy(entry: Any, path: str, r: _Reader) -> ReceivedPolicy:
    if not isinstance(entry, dict):
        raise ReportRejected(f"{path} is {_what(entry)}; RFC 8460 §4.4 requires an object")
    pol = entry.get("policy")
    if not isinstance(pol, dict):
        raise ReportRejected(f"{path} has {_what(pol)} as policy; RFC 8460 §4.4 requires an object")
    ptype_text = _required_text(pol, "policy-type", f"{path}.policy", r, MAX_TEXT)
    ptype: PolicyType | str
    try:
        ptype = PolicyType(ptype_text)
    except ValueError:
        ptype = ptype_text
        r.notes.add(
            "policy-type",
            f"{path}.policy policy-type {_shown(ptype_text)} is none of "
            f"{', '.join(t.value for t in PolicyType)} (RFC 8460 §4.4); kept as sent",
        )
    strings = _text_list(pol, "policy-string", f"{path}.policy", r, host=False)
    mx = _mx_hosts(pol, f"{path}.policy", r)
    domain = _policy_domain(pol, f"{path}.policy", r)
    successful, failed = _summary(entry, path, r)
    details = _failure_details(entry, path, r)
    listed = sum(d.failed_session_count for d in details)
    if listed > failed:
        r.notes.add(
            "failure-sum",
            f"{path}: its failure-details count {listed:,} failed sessions, more than its "
            f"total-failure-session-count {failed:,}",
        )
    return ReceivedPolicy(ptype, strings, domain, mx, successful, failed, details)


def _policy_domain(pol: dict[str, Any], path: str, r: _Reader) -> str | None:
    value = pol.get("policy-domain")
    given = _optional_text(pol, "policy-domain", path, r)
    domain = None
    if given is not None:
        try:
            domain = names.normalise_host(given.strip())
        except names.HostNameError as exc:
            r.notes.add("policy-domain", f"{path} policy-domain is not a domain name: {exc}")
    elif value is None or value == "":
        r.notes.add(
            "policy-domain-missing", f"{path} has no policy-domain (RFC 8460 §4.4 requires it)"
        )
    if domain is None and r.domain_hint is not None:
        r.notes.add(
            "domain-hint",
            f"{path}: policy domain {r.domain_hint} taken from the report's file name "
            "(RFC 8460 §5.1)",
        )
        domain = r.domain_hint
    return domain


def _mx_hosts(pol: dict[str, Any], path: str, r: _Reader) -> tuple[str, ...]:
    # RFC 8460 §4.4 names the member `mx-host` in its JSON schema and `mx-host-pattern` in
    # its prose; senders use both, mxguard's own reports carry both.
    found: dict[str, None] = {}
    lists = []
    for key in ("mx-host", "mx-host-pattern"):
        if key in pol:
            lists.append(_text_list(pol, key, path, r, host=True))
    for items in lists:
        found.update(dict.fromkeys(items))
    if len(lists) == 2 and lists[0] != lists[1]:
        r.notes.add(
            "mx-host-differ",
            f"{path}: mx-host and mx-host-pattern differ; both kept (RFC 8460 §4.4 has one "
            "member, named both ways)",
        )
    return tuple(found)[:MAX_LIST_ITEMS]


def _text_list(
    pol: dict[str, Any], key: str, path: str, r: _Reader, *, host: bool
) -> tuple[str, ...]:
    value = pol.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        if key == "policy-string":
            r.notes.add(
                "string-list",
                f"{path} {key} is a string, not a list (RFC 8460 §4.4); kept as one entry",
            )
        value = [value] if value else []
    if not isinstance(value, list):
        r.notes.add("type", f"{path} {key} is {_what(value)}, not a list of strings; dropped")
        return ()
    if len(value) > MAX_LIST_ITEMS:
        r.notes.add(
            "list-items",
            f"{path} {key} has {len(value):,} entries; the first {MAX_LIST_ITEMS} are kept",
        )
    out = []
    for i, item in enumerate(value[:MAX_LIST_ITEMS]):
        where = f"{path} {key}[{i}]"
        if not isinstance(item, str):
            r.notes.add("type", f"{where} is {_what(item)}, not a string; dropped")
            continue
        text = _bounded(item, where, r, MAX_TEXT)
        out.append(_host(text) if host else text)
    return tuple(out)


def _summary(entry: dict[str, Any], path: str, r: _Reader) -> tuple[int, int]:
    if "summary" not in entry:
        r.notes.add(
            "summary", f"{path} has no summary (RFC 8460 §4.4 requires it); counted as 0 and 0"
        )
        return 0, 0
    summary = entry["summary"]
    if not isinstance(summary, dict):
        raise ReportRejected(
            f"{path} has {_what(summary)} as summary; RFC 8460 §4.4 requires an object"
        )
    counts = []
    for key in ("total-successful-session-count", "total-failure-session-count"):
        if key not in summary:
            r.notes.add("summary-count", f"{path} summary has no {key}; counted as 0")
            counts.append(0)
        else:
            counts.append(_count(summary[key], f"{path} summary {key}"))
    return counts[0], counts[1]


def _failure_details(entry: dict[str, Any], path: str, r: _Reader) -> tuple[FailureDetail, ...]:
    raw = entry.get("failure-details")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ReportRejected(
            f"{path} has {_what(raw)} as failure-details; RFC 8460 §4.4 requires a list"
        )
    kept = raw[: r.details_left]
    if len(raw) > len(kept):
        dropped = raw[len(kept) :]
        r.details_dropped += len(dropped)
        r.details_dropped_sessions += sum(
            d["failed-session-count"]
            for d in dropped
            if isinstance(d, dict) and _is_count(d.get("failed-session-count"))
        )
    r.details_left -= len(kept)
    return tuple(_failure(d, f"{path}.failure-details[{i}]", r) for i, d in enumerate(kept))


def _failure(d: Any, path: str, r: _Reader) -> FailureDetail:
    if not isinstance(d, dict):
        raise ReportRejected(f"{path} is {_what(d)}; RFC 8460 §4.4 requires an object")
    text = _required_text(d, "result-type", path, r, MAX_TEXT)
    result: ResultType | str
    try:
        result = ResultType(text)
    except ValueError:
        result = text
        r.notes.add(
            "result-type",
            f"{path} result-type {_shown(text)} is not one of RFC 8460 §4.3's; kept as sent",
        )
    if "failed-session-count" not in d:
        raise ReportRejected(f"{path} has no failed-session-count (RFC 8460 §4.4 requires it)")
    info = _optional_text(d, "additional-information", path, r)
    if info is None and "additional-info-uri" in d:
        info = _optional_text(d, "additional-info-uri", path, r)
        if info is not None:
            r.notes.add(
                "additional-info-uri",
                f"{path} says additional-info-uri; read as additional-information "
                "(the RFC 8460 §4.4 member)",
            )
    mx = _optional_text(d, "receiving-mx-hostname", path, r)
    helo = _optional_text(d, "receiving-mx-helo", path, r)
    return FailureDetail(
        result_type=result,
        sending_mta_ip=_optional_text(d, "sending-mta-ip", path, r),
        receiving_mx_hostname=None if mx is None else _host(mx),
        receiving_ip=_optional_text(d, "receiving-ip", path, r),
        receiving_mx_helo=None if helo is None else _host(helo),
        failed_session_count=_count(d["failed-session-count"], f"{path} failed-session-count"),
        additional_information=info,
        failure_reason_code=_optional_text(d, "failure-reason-code", path, r),
    )


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _count(value: Any, where: str) -> int:
    if not _is_count(value):
        raise ReportRejected(
            f"{where} is {_what(value)}; a session count is a JSON integer from 0 to "
            f"{MAX_COUNT:,} (RFC 8460 §4.4, RFC 7493 §2.2)"
        )
    return int(value)


def _required_text(obj: dict[str, Any], key: str, path: str, r: _Reader, limit: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        missing = key not in obj
        raise ReportRejected(
            f"{path} has no {key}"
            if missing
            else f"{path} has {_what(value)} as {key}; RFC 8460 §4.4 requires a string"
        )
    return _bounded(value, f"{path} {key}", r, limit)


def _optional_text(obj: dict[str, Any], key: str, path: str, r: _Reader) -> str | None:
    value = obj.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        r.notes.add("type", f"{path} {key} is {_what(value)}, not a string; dropped")
        return None
    return _bounded(value, f"{path} {key}", r, MAX_TEXT)


def _bounded(value: str, where: str, r: _Reader, limit: int) -> str:
    """`value` cut to `limit` characters, NUL and lone surrogates replaced, with notes."""
    if len(value) > limit:
        r.notes.add(
            f"long:{limit}",
            f"{where} has {len(value):,} characters; the first {limit:,} are kept",
        )
        value = value[:limit]
    if "\x00" in value:
        r.notes.add("nul", f"{where} contains NUL characters; replaced by U+FFFD")
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        r.notes.add("surrogate", f"{where} contains lone surrogates; replaced by U+FFFD")
        value = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value


def _host(text: str) -> str:
    """A host name or MX pattern in the form mxguard compares names (lower-case A-labels, no
    trailing dot); anything that is not one stays as sent."""
    try:
        return names.normalise_pattern(text.strip())
    except names.HostNameError:
        return text


def _sessions_of(entries: list[Any]) -> tuple[int, int]:
    """The valid summary counts among dropped `policies` entries (for the note)."""
    ok = bad = 0
    for e in entries:
        summary = e.get("summary") if isinstance(e, dict) else None
        if isinstance(summary, dict):
            s = summary.get("total-successful-session-count")
            f = summary.get("total-failure-session-count")
            ok += s if _is_count(s) else 0
            bad += f if _is_count(f) else 0
    return ok, bad


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _what(value: Any) -> str:
    """A JSON value as an error message names it: its kind, and a short form of scalars."""
    if isinstance(value, bool | int | float):
        return f"the {_kind(value)} {_shown(json.dumps(value))}"
    if isinstance(value, str):
        return f"the string {_shown(value)}"
    if value is None:
        return "null (or nothing)"
    return f"an {_kind(value)}" if isinstance(value, list | dict) else "a value"


def _shown(value: str) -> str:
    """`value` for a message: quoted, escaped, at most 60 characters of it."""
    return repr(value if len(value) <= 60 else value[:60] + "…")


# --- identity --------------------------------------------------------------------------------


def dedupe_key(report: ReceivedReport) -> str:
    """The identity of a report, for storing it once: a SHA-256 over its organisation,
    report-id, date range and the set of its policies (type, domain, strings, MX patterns).
    RFC 8460 §4.4 makes the report-id unique per sender, and senders resend (§5.5 asks them
    to retry): a resent report has the same key, whatever its counts or notes say."""
    policies = sorted(
        {
            json.dumps(
                [str(p.policy_type), p.policy_domain, list(p.policy_strings), list(p.mx_hosts)]
            )
            for p in report.policies
        }
    )
    identity = [
        report.organization_name,
        report.report_id,
        _rfc3339(report.start),
        _rfc3339(report.end),
        policies,
    ]
    text = json.dumps(identity, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def filename_domain(filename: str | None) -> str | None:
    """The policy domain in a §5.1 file name, `<submitter>!<policy-domain>!<begin>!<end>…`,
    normalised; None when the name does not have that shape (RFC 8460 §5.1)."""
    if not filename:
        return None
    parts = filename.split("!")
    if len(parts) < 4:
        return None
    try:
        return names.normalise_host(parts[1])
    except names.HostNameError:
        return None


# --- e-mail ----------------------------------------------------------------------------------


def reports_from_email(
    raw: bytes, *, max_size: int = MAX_MESSAGE_SIZE, max_parts: int = MAX_MESSAGE_PARTS
) -> list[tuple[str, bytes, str | None]]:
    """The report attachments of a whole e-mail (RFC 5322), as (file name, body, content type).

    RFC 8460 §5.3 sends a report as an `application/tlsrpt+gzip` (or `+json`) part of a
    `multipart/report`; real senders also attach `.json.gz` or `.json` files under generic
    types (`application/gzip`, `application/octet-stream`, …), and those count too. Forwarded
    messages are looked into. The file name is the part's own, cut to its last path component
    and 255 characters (empty when it has none); the content type is None when the part has no
    Content-Type header. An empty list: no report in the message. ReportRejected for a message
    over `max_size` bytes or with more than `max_parts` MIME parts."""
    if len(raw) > max_size:
        raise ReportRejected(
            f"the e-mail is {len(raw):,} bytes; report e-mails are accepted up to "
            f"{max_size:,} bytes"
        )
    # Imported here: the store imports this module for its types, and only ingestion parses
    # mail (the email package's parser and policy cost every command's start-up).
    import email.parser
    import email.policy

    try:
        message = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
        parts = list(_leaves(message, max_parts))
    except RecursionError:
        raise ReportRejected("the e-mail's MIME parts are nested too deeply") from None
    found = []
    for part in parts:
        name = _part_filename(part)
        ctype = part.get_content_type()
        if ctype not in _REPORT_TYPES and not name.lower().endswith(_REPORT_SUFFIXES):
            continue
        body = part.get_payload(decode=True)
        if not isinstance(body, bytes):
            continue
        declared = ctype if part.get("content-type") is not None else None
        found.append((name, body, declared))
    return found


def _leaves(message: Message, max_parts: int) -> Iterator[Message]:
    """The non-multipart parts of `message` in order, depth first, without recursion."""
    from email.message import Message

    stack = [message]
    seen = 0
    while stack:
        part = stack.pop()
        seen += 1
        if seen > max_parts:
            raise ReportRejected(
                f"the e-mail has more than {max_parts} MIME parts; a report e-mail has a few"
            )
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
            continue
        yield part


def _part_filename(part: Message) -> str:
    try:
        name = part.get_filename() or ""
    except (ValueError, TypeError, LookupError, AttributeError):  # a malformed parameter
        name = ""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())
    return name[:MAX_FILENAME]


# --- JSON for people and programs ------------------------------------------------------------


def _rfc3339(value: dt.datetime) -> str:
    text = value.astimezone(dt.UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def _policy_json(p: ReceivedPolicy) -> dict[str, Any]:
    return {
        "policy_type": str(p.policy_type),
        "policy_strings": list(p.policy_strings),
        "policy_domain": p.policy_domain,
        "mx_hosts": list(p.mx_hosts),
        "successful": p.successful,
        "failed": p.failed,
        "failure_details": [
            {
                "result_type": str(d.result_type),
                "sending_mta_ip": d.sending_mta_ip,
                "receiving_mx_hostname": d.receiving_mx_hostname,
                "receiving_mx_helo": d.receiving_mx_helo,
                "receiving_ip": d.receiving_ip,
                "failed_session_count": d.failed_session_count,
                "additional_information": d.additional_information,
                "failure_reason_code": d.failure_reason_code,
            }
            for d in p.failure_details
        ],
    }
