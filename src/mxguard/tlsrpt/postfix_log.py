"""Postfix log lines -> SMTP sessions with their TLS outcome (RFC 8460 §4: sessions count).

Postfix (3.x, ``smtp_tls_loglevel = 1``) does not log one line per session. A session to an
MX host shows up as a few lines of one ``postfix/smtp[pid]`` process:

- before the transaction, *without* a queue id: ``server certificate verification failed for
  HOST[IP]:PORT: <why>`` and ``<Trust> TLS connection established to HOST[IP]:PORT: ...``,
  where Trust is Anonymous, Untrusted, Trusted or Verified (``reused`` instead of
  ``established`` is a cached connection: the same session again);
- a session that Postfix gives up to try the next MX host ends in a queue-id line that names
  why: ``QID: TLS is required, but was not offered by host HOST[IP]``, ``QID: Server
  certificate not verified``, ``QID: host HOST[IP] said: ...``;
- the last session of a delivery attempt ends in the status line(s), one per recipient:
  ``QID: to=<rcpt>, relay=HOST[IP]:PORT, ..., dsn=X.Y.Z, status=sent|deferred|bounced (...)``;
  ``relay=none`` means no session took place (DNS failure, every connection refused), and
  ``conn_use=N`` (N > 1) means a cached connection carried it: not a new session;
- a session that ended before STARTTLS could have been offered (smtp_proto.c: ``host H[IP]
  refused to talk to me: ...`` for a non-2xx greeting, a 421 to EHLO or a refused HELO; ``lost
  connection with H[IP] while receiving the initial server greeting`` or ``... while performing
  the EHLO handshake``, and ``conversation with H[IP] timed out while ...``) is not a TLS
  session: RFC 8460 §4.3.1 starttls-not-supported needs a server that answered EHLO without
  offering STARTTLS, so such a session is not counted at all;
- Postfix ≥ 3.10 with TLSRPT on (`smtp_tlsrpt_enable`) logs each event it reports, from the
  smtp process, before the line that ends the session: ``TLSRPT: status=success|failure,
  domain=D, receiving_mx=HOST[IP]...`` (tlsrpt_wrapper.c logs it whether or not the datagram
  reached its socket). ``Session.tlsrpt`` keeps that status: which sessions Postfix's own
  events cover, and which they leave out (``left_out_by_postfix``).

The relay of a status line is whatever Postfix's next hop was: an MX host, but also a content
filter (``127.0.0.1[127.0.0.1]:10024``), a ``relayhost`` or an internal server of
``postfix/relay``. This module cannot tell them apart; the collector keeps only sessions to an
MX host of the recipient domain (RFC 8460 §4: sessions to the policy domain's MX hosts).

A ``Session`` carries no text Postfix logged, only facts in a fixed vocabulary (``Ending``):
what ends up in a report goes to a third party (RFC 8460 §4.4 additional-information), and
Postfix's reasons quote SMTP replies, which name addresses.

``parse_line`` reads one line in the ``maillog_file`` / traditional syslog format (``Nov 29
11:10:06 host postfix/smtp[123]: ...``) or with an ISO 8601 timestamp (rsyslog's high-precision
file format, ``journalctl -o short-iso``), optionally behind a syslog ``<PRI>``. ``Joiner``
follows every smtp process's lines and yields one ``Session`` per TCP session to an MX host,
with what the log says about its TLS; ``result_type`` then names its outcome in the RFC 8460
§4.3 vocabulary under the domain's policy. Its state is plain data (``to_json``/``from_json``)
so that a collector can stop between any two lines and resume. Pure: no I/O, no clock.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mxguard.protocol import names
from mxguard.protocol.results import ResultType
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy

MAX_LINE = 8192  # bytes; syslog daemons cap lines lower than this, Postfix at ~2 KiB of text
MAX_PROCESSES = 4096  # smtp processes followed at once; the oldest is forgotten beyond it
MAX_SESSIONS_PER_PROCESS = 64  # finished sessions awaiting their delivery's status line
SMTP_PROGRAMS = frozenset({"smtp", "relay"})  # the last part of `postfix/smtp`, `postfix/relay`

_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
# "Nov 29 11:10:06 host prog[pid]: msg"  or  "2024-11-29T11:10:06.123+01:00 host prog[pid]: msg"
_LINE = re.compile(
    r"^(?:<\d{1,3}>)?"
    r"(?:(?P<mon>[A-Z][a-z]{2}) (?P<day>[ \d]\d) (?P<hms>\d\d:\d\d:\d\d)"
    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?))"
    r" (?P<host>\S{1,255}) (?P<program>[\w.-]{1,64}(?:/[\w.-]{1,64}){0,4})\[(?P<pid>\d{1,10})\]: "
    r"(?P<message>.*)$"
)
_PEER = r"(?P<host>[^\s\[\]]{1,255})\[(?P<ip>[0-9A-Fa-f:.]{1,45})\]"
_TLS = re.compile(
    r"^(?P<trust>Anonymous|Untrusted|Trusted|Verified) TLS connection (?P<how>established|reused)"
    rf" to {_PEER}:(?P<port>\d{{1,5}}): (?P<protocol>\S+)"
)
# tls_verify.c: "%s certificate verification failed for %s: ..." ("server" or nothing).
_CERT = re.compile(
    rf"^(?:server )?certificate verification failed for {_PEER}:\d{{1,5}}: (?P<why>.*)$"
)
# tls_client.c: "SSL_connect error to %s: ..." (then the queue-id line "Cannot start TLS").
_SSL_CONNECT = re.compile(rf"^SSL_connect error to {_PEER}:\d{{1,5}}: ")
# tlsrpt_wrapper.c: "TLSRPT: status=%s, domain=%s, receiving_mx=%s[%s]" (", failure_type=…").
_TLSRPT = re.compile(
    r"^TLSRPT: status=(?P<status>success|failure), domain=[^,\s]{0,255}, "
    r"receiving_mx=(?P<mx>[^,\s]{0,320})(?:,|$)"
)
_MX_PEER = re.compile(rf"^{_PEER}$")
_QUEUED = re.compile(r"^(?P<qid>[0-9A-Za-z]{5,32}): (?P<text>.*)$")
_STATUS = re.compile(
    r"^to=<(?P<rcpt>[^>]{0,1000})>, (?:orig_to=<[^>]{0,1000}>, )?relay=(?P<relay>[^,\s]+), "
    r"(?:conn_use=(?P<conn_use>\d+), )?.*\bstatus=(?P<status>\w+)(?: \((?P<reason>.*)\))?$"
)
_RELAY = re.compile(rf"^{_PEER}(?::(?P<port>\d{{1,5}}))?$")
# "host H[IP] said: …", "lost connection with H[IP] while …", "TLS is required, but … host H[IP]"
_ANY_PEER = re.compile(rf"\b(?:host|with) {_PEER}")
_OPENSSL_ERROR = re.compile(r"^num=(?P<num>\d+):")
# smtp_proto.c smtp_helo(): the greeting, EHLO, HELO or LHLO failed (before any STARTTLS).
_SOME_PEER = r"[^\s\[\]]{1,255}\[[0-9A-Fa-f:.]{1,45}\]"
_BEFORE_STARTTLS = re.compile(
    rf"^host {_SOME_PEER} refused to talk to me: "
    rf"|^(?:lost connection with {_SOME_PEER}|conversation with {_SOME_PEER} timed out) while "
    r"(?:receiving the initial server greeting|performing the (?:EHLO|HELO|LHLO) handshake)$"
)

# X509_V_ERR_* codes (openssl/x509_vfy.h) that Postfix logs as "num=N:text".
_EXPIRED = frozenset({9, 10})  # not yet valid, expired
_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27, 28})  # no issuer, self-signed, untrusted, rejected
_HOST_MISMATCH = frozenset({62})  # hostname mismatch


class Trust:
    """The words Postfix puts before "TLS connection established" (postconf(5) smtp_tls)."""

    ANONYMOUS = "Anonymous"
    UNTRUSTED = "Untrusted"
    TRUSTED = "Trusted"  # the chain verified, the name was not (or not checked)
    VERIFIED = "Verified"  # chain and name (or DANE) verified


class Ending(enum.StrEnum):
    """How a session ended, in words of our own: never the text Postfix logged (RFC 8460 §4.4
    additional-information reaches a third party; SMTP replies can carry addresses)."""

    DELIVERED = "delivered"
    STARTTLS_NOT_OFFERED = "STARTTLS not offered"
    STARTTLS_REFUSED = "STARTTLS refused by the server"
    TLS_UNAVAILABLE = "TLS unavailable"
    TLS_HANDSHAKE_FAILED = "TLS handshake failed"
    CERTIFICATE_NOT_VERIFIED = "certificate not verified"
    SMTP_ERROR = "the server answered with an error"
    CONNECTION_LOST = "connection lost or timed out"
    NOT_DELIVERED = "not delivered"


def ending(text: str, status: str | None = None) -> Ending:
    """The `Ending` of a session that ended with `text` (a queue-id line or a status reason)."""
    if status == "sent":
        return Ending.DELIVERED
    if text.startswith("TLS is required, but was not offered"):
        return Ending.STARTTLS_NOT_OFFERED
    if text.startswith("TLS is required, but host ") and "refused to start TLS" in text:
        return Ending.STARTTLS_REFUSED
    if text.startswith("TLS is required, but "):
        return Ending.TLS_UNAVAILABLE
    if text.startswith(("Server certificate not verified", "Server certificate not trusted")):
        return Ending.CERTIFICATE_NOT_VERIFIED
    if text.startswith("Cannot start TLS"):
        return Ending.TLS_HANDSHAKE_FAILED
    if text.startswith(("lost connection with ", "conversation with ")):
        return Ending.CONNECTION_LOST
    if text.startswith("host ") and (" said: " in text or " refused to talk to me" in text):
        return Ending.SMTP_ERROR
    return Ending.NOT_DELIVERED


@dataclass(frozen=True, slots=True)
class LogLine:
    """One parsed line; `at` is aware (RFC 3164 dates get the year and zone given)."""

    at: dt.datetime
    host: str
    program: str
    pid: int
    message: str

    @property
    def process(self) -> str:
        """Identifies the process across lines: host, program and pid."""
        return f"{self.host} {self.program}[{self.pid}]"


def parse_line(text: str, *, now: dt.datetime, tz: dt.tzinfo | None = None) -> LogLine | None:
    """One log line, or None when it is not a syslog-style line (or longer than MAX_LINE).

    Traditional syslog dates have no year and no zone: the zone is `tz` (default: `now`'s),
    the year is `now`'s unless that puts the line more than a day in the future (a December
    line read in January).
    """
    if len(text) > MAX_LINE:
        return None
    m = _LINE.match(text.rstrip("\r\n"))
    if m is None:
        return None
    if m["iso"] is not None:
        try:
            at = dt.datetime.fromisoformat(m["iso"].replace("Z", "+00:00"))
        except ValueError:
            return None
        if at.tzinfo is None:
            at = at.replace(tzinfo=tz or now.tzinfo or dt.UTC)
    else:
        zone = tz or now.tzinfo or dt.UTC
        local_now = now.astimezone(zone)
        try:
            h, mi, s = (int(x) for x in m["hms"].split(":"))
            at = dt.datetime(
                local_now.year, _MONTHS[m["mon"]], int(m["day"]), h, mi, s, tzinfo=zone
            )
            if at > local_now + dt.timedelta(days=1):
                at = at.replace(year=local_now.year - 1)
        except (KeyError, ValueError):
            return None
    return LogLine(at, m["host"], m["program"], int(m["pid"]), m["message"])


def certificate_failure(why: str) -> ResultType:
    """The RFC 8460 §4.3.1 result type of Postfix's "certificate verification failed" reason."""
    code = _OPENSSL_ERROR.match(why)
    if code is not None:
        num = int(code["num"])
        if num in _EXPIRED:
            return ResultType.CERTIFICATE_EXPIRED
        if num in _UNTRUSTED:
            return ResultType.CERTIFICATE_NOT_TRUSTED
        if num in _HOST_MISMATCH:
            return ResultType.CERTIFICATE_HOST_MISMATCH
        # e.g. num=65 "no matching DANE TLSA records": RFC 8460 §4.3.1 validation-failure.
        return ResultType.VALIDATION_FAILURE
    if why.startswith(("certificate has expired", "certificate not yet valid")):
        return ResultType.CERTIFICATE_EXPIRED
    if why.startswith(("self-signed certificate", "untrusted issuer", "not trusted by")):
        return ResultType.CERTIFICATE_NOT_TRUSTED
    return ResultType.VALIDATION_FAILURE


@dataclass(frozen=True, slots=True)
class Session:
    """One SMTP session of Postfix to an MX host, as its log lines tell it."""

    at: dt.datetime  # when the line that ended it was logged
    queue_id: str
    domain: str  # the recipient domain: Postfix's next hop and policy lookup key
    mx_host: str
    mx_ip: str
    tls: str | None  # Trust.* of the TLS session, None: no TLS (plain text or failed before)
    certificate_failure: ResultType | None  # from "certificate verification failed" lines
    refused: ResultType | None  # why Postfix itself refused the session (its TLS policy)
    status: str  # "sent" | "deferred" | "bounced" | ... of the delivery, or "next-mx"
    ending: Ending  # how it ended (no text of Postfix's: see Ending)
    # What Postfix ≥ 3.10 logged having reported over TLSRPT for this session: "success" or
    # "failure"; None: no TLSRPT event (TLS optional and not used, TLSRPT off, Postfix < 3.10).
    tlsrpt: str | None = None

    @property
    def reported_by_postfix(self) -> bool:
        """Postfix sent a TLSRPT event (a datagram) for this session itself."""
        return self.tlsrpt is not None


def host_key(name: str) -> str:
    """A host or domain name from a log line in the form names are compared in (lower-case
    A-labels without the root's dot: `names.dns_name`). A name that has no A-label stays as
    logged: it matches no MX host and no domain. Never an error: log lines are untrusted."""
    try:
        return names.dns_name(name)
    except names.HostNameError:
        return name


def result_type(session: Session, policy_type: PolicyType) -> ResultType | None:
    """The RFC 8460 §4.3 outcome of `session` under a policy of `policy_type`; None = success.

    Postfix's own refusals come first (it enforced what mxguard's policy server told it). A
    session Postfix did not refuse still fails the domain's published policy when the log shows
    that it could not have met it: no TLS at all (§4.3.1 starttls-not-supported) or a
    certificate that did not verify. With no policy there is nothing to fail (RFC 8460 §4.4
    no-policy-found sessions are counted as they are).
    """
    if session.refused is not None:
        return session.refused
    if policy_type is PolicyType.NO_POLICY_FOUND:
        return None
    if session.tls is None:
        return ResultType.STARTTLS_NOT_SUPPORTED
    if session.certificate_failure is not None:
        return session.certificate_failure
    if session.tls in (Trust.UNTRUSTED, Trust.ANONYMOUS):
        # RFC 7672 §3.1 / RFC 8461 §4.2: an unauthenticated server fails either policy.
        return (
            ResultType.VALIDATION_FAILURE
            if policy_type is PolicyType.TLSA
            else ResultType.CERTIFICATE_NOT_TRUSTED
        )
    # Verified, or Trusted: a trusted chain under a level that checks no name (a `testing`
    # policy answered NOTFOUND/may); Postfix refuses a name mismatch where the name is checked.
    return None


def report_only(policy: ReportedPolicy) -> bool:
    """Whether `policy` is checked and reported but not enforced (RFC 8461 §5 `testing`): the
    only such policy with a type a session can fail. (A `testing` entry of mxguard's policy
    list is reported as no-policy-found, which no session fails.)"""
    if policy.policy_type is not PolicyType.STS:
        return False
    for line in policy.policy_strings:
        key, colon, value = line.partition(":")
        if colon and key == "mode":  # RFC 8461 §3.2: the first mode field, case-sensitive
            return value.strip(" \t") == "testing"
    return False


def left_out_by_postfix(session: Session, policy: ReportedPolicy) -> bool:
    """Whether `session` is one that Postfix ≥ 3.10's own TLSRPT events leave out although a
    report counts it: it went on (or ended) in plain text under a report-only policy.

    Postfix 3.10 reports a missing or refused STARTTLS only where TLS is required
    (smtp_proto.c); under MTA-STS `testing` (answered `may`) it delivers in plain text and
    reports nothing. Such a session, judged from the log, is starttls-not-supported, as
    `result_type` says and as the log collector counts it on Postfix 3.7. It is left out when:

    - Postfix logged no TLSRPT event for it (so no datagram covers it: never counted twice,
      also not with a later Postfix that reports more, e.g. 3.11 reports a refused STARTTLS
      under `may`);
    - no TLS was established, and Postfix did not end it for its TLS policy (a refusal is
      reported where it is reportable, and only where TLS is required);
    - the domain's policy is report-only (`report_only`), and names a `rua`: Postfix reports
      nothing for domains without a TLS-RPT record, and nobody could be sent the report.
    """
    return (
        session.tlsrpt is None
        and session.tls is None
        and session.refused is None
        and report_only(policy)
        and bool(policy.rua)
    )


@dataclass(slots=True)
class _Pending:
    """What one smtp process logged about its current session so far."""

    host: str | None = None
    ip: str | None = None
    tls: str | None = None
    reused: bool = False
    certificate_failure: str | None = None  # ResultType value
    tlsrpt: str | None = None  # "success" | "failure": the TLSRPT event Postfix logged


@dataclass(slots=True)
class _Finished:
    """A session that ended before its delivery's status line named the recipient domain."""

    at: str
    queue_id: str
    host: str
    ip: str
    tls: str | None
    certificate_failure: str | None
    refused: str | None
    detail: str  # an Ending value (older state files: the text that ended the session)
    tlsrpt: str | None = None  # as _Pending.tlsrpt (older state files: none)


@dataclass(slots=True)
class _Process:
    pending: _Pending = field(default_factory=_Pending)
    active: bool = False  # something of a session was logged since the last one ended
    finished: list[_Finished] = field(default_factory=list)
    last_end: tuple[str, str] | None = None  # (queue id, relay) of the last status line


class Joiner:
    """Turns log lines, in order, into `Session`s. Feed it lines; keep it between reads."""

    def __init__(self, programs: frozenset[str] = SMTP_PROGRAMS) -> None:
        self.programs = programs
        self._procs: OrderedDict[str, _Process] = OrderedDict()

    def feed(self, line: LogLine) -> Iterator[Session]:
        """The sessions that `line` completes (none, one, or several of one delivery)."""
        if line.program.rsplit("/", 1)[-1] not in self.programs:
            return
        proc = self._procs.pop(line.process, None) or _Process()
        self._procs[line.process] = proc  # most recently used last
        while len(self._procs) > MAX_PROCESSES:
            self._procs.popitem(last=False)
        yield from self._feed(proc, line)

    def _feed(self, proc: _Process, line: LogLine) -> Iterator[Session]:
        msg = line.message
        if (m := _CERT.match(msg)) is not None:
            self._touch(proc, m["host"], m["ip"])
            proc.pending.certificate_failure = certificate_failure(m["why"]).value
            return
        if (m := _SSL_CONNECT.match(msg)) is not None:
            self._touch(proc, m["host"], m["ip"])  # the handshake failed: which session
            return
        if (m := _TLS.match(msg)) is not None:
            self._touch(proc, m["host"], m["ip"])
            proc.pending.tls = m["trust"]
            proc.pending.reused = m["how"] == "reused"
            return
        if (m := _TLSRPT.match(msg)) is not None:
            if (peer := _MX_PEER.match(m["mx"])) is not None:
                self._touch(proc, peer["host"], peer["ip"])
            else:
                proc.active = True  # Postfix knew no name or address: the current session
            proc.pending.tlsrpt = m["status"]
            return
        q = _QUEUED.match(msg)
        if q is None:
            return
        qid, text = q["qid"], q["text"]
        if (s := _STATUS.match(text)) is not None:
            yield from self._status(proc, line, qid, s)
            return
        # A session that ended without delivering; Postfix goes on to the next MX host.
        refused = _refusal(text, proc.pending)
        # "connect to H[IP]:25: refused": no TCP session, it does not count (RFC 8460 §4).
        peer = None if text.startswith("connect to ") else _ANY_PEER.search(text)
        if peer is not None:
            self._touch(proc, peer["host"], peer["ip"])
        if refused is None and peer is None:
            return  # not about a session (e.g. "enabling PIX workarounds")
        p = proc.pending
        if p.host is not None and p.ip is not None and not p.reused and not _before_tls(text, p):
            proc.finished.append(
                _Finished(
                    line.at.isoformat(),
                    qid,
                    p.host,
                    p.ip,
                    p.tls,
                    p.certificate_failure,
                    refused.value if refused else None,
                    ending(text).value,
                    p.tlsrpt,
                )
            )
            del proc.finished[:-MAX_SESSIONS_PER_PROCESS]
        proc.pending, proc.active, proc.last_end = _Pending(), False, None

    def _status(
        self, proc: _Process, line: LogLine, qid: str, s: re.Match[str]
    ) -> Iterator[Session]:
        relay = s["relay"]
        if proc.last_end == (qid, relay) and not proc.active:
            return  # the next recipient of the same session
        rcpt = s["rcpt"]
        domain = host_key(rcpt.rpartition("@")[2])
        peer = _RELAY.match(relay)
        p = proc.pending
        reused = p.reused or int(s["conn_use"] or 1) > 1
        reason = s["reason"] or ""
        refused = _refusal(reason, p) if s["status"] != "sent" else None
        before_tls = s["status"] != "sent" and _before_tls(reason, p)
        if peer is not None and not reused and not before_tls:
            proc.finished.append(
                _Finished(
                    line.at.isoformat(),
                    qid,
                    peer["host"],
                    peer["ip"],
                    p.tls,
                    p.certificate_failure,
                    refused.value if refused else None,
                    ending(reason, s["status"]).value,
                    p.tlsrpt,
                )
            )
        # relay=none: no session took place at the end (lookup failure, connections refused).
        last = proc.finished[-1] if peer is not None and not reused and not before_tls else None
        for f in proc.finished:
            if f.queue_id != qid:
                continue  # left over from a delivery whose status line we never saw
            yield Session(
                at=dt.datetime.fromisoformat(f.at),
                queue_id=qid,
                domain=domain,
                mx_host=host_key(f.host),
                mx_ip=f.ip,
                tls=f.tls,
                certificate_failure=ResultType(f.certificate_failure)
                if f.certificate_failure
                else None,
                refused=ResultType(f.refused) if f.refused else None,
                status=s["status"] if f is last else "next-mx",
                ending=_saved_ending(f.detail),
                tlsrpt=f.tlsrpt,
            )
        proc.finished.clear()
        proc.pending, proc.active, proc.last_end = _Pending(), False, (qid, relay)

    @staticmethod
    def _touch(proc: _Process, host: str, ip: str) -> None:
        if proc.pending.host is not None and (proc.pending.host, proc.pending.ip) != (host, ip):
            proc.pending = _Pending()  # a new session began without the old one ending
        proc.pending.host, proc.pending.ip = host, ip
        proc.active = True

    # --- state, so that a collector can stop anywhere and resume ------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            key: {
                "pending": asdict(p.pending),
                "active": p.active,
                "finished": [asdict(f) for f in p.finished],
                "last_end": list(p.last_end) if p.last_end else None,
            }
            for key, p in self._procs.items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], programs: frozenset[str] = SMTP_PROGRAMS) -> Joiner:
        """A joiner in the state `to_json` saved; ValueError when the data is not such state."""
        j = cls(programs)
        try:
            for key, p in list(data.items())[-MAX_PROCESSES:]:
                last = p["last_end"]
                j._procs[str(key)] = _Process(
                    pending=_Pending(**p["pending"]),
                    active=bool(p["active"]),
                    finished=[_Finished(**f) for f in p["finished"]][-MAX_SESSIONS_PER_PROCESS:],
                    last_end=(str(last[0]), str(last[1])) if last else None,
                )
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"not a saved Postfix log joiner state: {exc!r}") from exc
        return j


def _before_tls(text: str, p: _Pending) -> bool:
    """The session ended at the greeting or EHLO, before STARTTLS could have been offered.

    Not after TLS: the EHLO that follows the handshake fails with the same words, and then
    the "TLS connection established" line (or a certificate failure) came first.
    """
    return p.tls is None and p.certificate_failure is None and bool(_BEFORE_STARTTLS.match(text))


def _saved_ending(detail: str) -> Ending:
    try:
        return Ending(detail)
    except ValueError:  # state saved before sessions kept no text: read it, keep none of it
        return ending(detail)


def _refusal(text: str, p: _Pending) -> ResultType | None:
    """Why Postfix's TLS policy ended a session, from the text it logged (smtp_proto.c)."""
    if text.startswith("TLS is required, but "):  # "was not offered", "refused to start TLS"
        return ResultType.STARTTLS_NOT_SUPPORTED
    if text.startswith(("Server certificate not verified", "Server certificate not trusted")):
        return _certificate_refusal(p)
    if text.startswith("Cannot start TLS"):
        return ResultType.VALIDATION_FAILURE  # the handshake failed: §4.3.1's general failure
    return None


def _certificate_refusal(p: _Pending) -> ResultType:
    """Why Postfix said "Server certificate not verified": the cause it logged before, if any;
    else what the trust level implies (a trusted chain that failed: the name)."""
    if p.certificate_failure is not None:
        return ResultType(p.certificate_failure)
    if p.tls == Trust.TRUSTED:
        return ResultType.CERTIFICATE_HOST_MISMATCH
    return ResultType.CERTIFICATE_NOT_TRUSTED


def sessions(lines: Iterator[str] | list[str], *, now: dt.datetime) -> list[Session]:
    """Every session in `lines` (a whole log at once; tests and one-off use)."""
    j = Joiner()
    out: list[Session] = []
    for text in lines:
        parsed = parse_line(text, now=now)
        if parsed is not None:
            out.extend(j.feed(parsed))
    return out


__all__ = [
    "MAX_LINE",
    "Ending",
    "Joiner",
    "LogLine",
    "Session",
    "Trust",
    "certificate_failure",
    "ending",
    "host_key",
    "left_out_by_postfix",
    "parse_line",
    "report_only",
    "result_type",
    "sessions",
]
