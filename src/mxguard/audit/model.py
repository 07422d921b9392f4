"""What ``mxguard check`` found about a domain, and the JSON of ``check --json`` (a public
contract: keys are added, never renamed; docs/check.md)."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

from mxguard.adapters.https import FetchResult
from mxguard.adapters.smtp import TlsInfo
from mxguard.engine.deliver import Authentication
from mxguard.engine.policy import DeliveryPolicy, MxPolicy
from mxguard.protocol import pkix
from mxguard.protocol.results import ResultType


class Verdict(enum.StrEnum):
    """The answer per domain, worst first (docs/check.md, "Verdicts")."""

    BROKEN = "broken"  # a compliant sender would defer or refuse honest mail
    UNPROTECTED = "unprotected"  # no DANE, no MTA-STS: stripping STARTTLS works
    PARTIAL = "partial"  # MTA-STS testing only, or protection on some MX hosts only
    PROTECTED = "protected"  # a compliant sender refuses a downgrade, and honest mail flows


class Protection(enum.StrEnum):
    DANE = "dane"
    MTA_STS = "mta-sts"
    NONE = "none"


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the audit found: what it is, what a compliant sender does because of it, and
    what to change. ``breaks``: because of it, a compliant sender defers or refuses honest
    mail (this makes the verdict ``broken``)."""

    code: str
    severity: Severity
    detail: str
    sender: str
    fix: str
    result_type: ResultType | None = None  # what a sender reports for it (RFC 8460), if any
    mx: str | None = None  # the MX host it is about, if one
    breaks: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "result_type": self.result_type.value if self.result_type else None,
            "mx": self.mx,
            "detail": self.detail,
            "sender": self.sender,
            "fix": self.fix,
            "breaks": self.breaks,
        }


@dataclass(frozen=True, slots=True)
class SmtpProbe:
    """One SMTP session to one address: connect, EHLO, STARTTLS with ``server_name``, QUIT.
    No mail is sent. ``tls`` is what the handshake established (the chain unverified)."""

    address: str
    server_name: str
    connected: bool = False
    banner: str | None = None
    starttls: bool = False  # STARTTLS was offered in the EHLO reply
    tls: TlsInfo | None = None
    error: str | None = None  # what failed, in one sentence
    error_step: str | None = None  # connect, banner, EHLO, STARTTLS
    error_result_type: ResultType | None = None
    elapsed: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "banner": self.banner,
            "starttls": self.starttls,
            "tls_version": self.tls.version if self.tls else None,
            "cipher": self.tls.cipher if self.tls else None,
            "server_name": self.server_name,
            "error": self.error,
            "error_step": self.error_step,
        }


@dataclass(frozen=True, slots=True)
class AddressCheck:
    """One address of an MX host: the probe, and what a compliant sender makes of it."""

    address: str
    probe: SmtpProbe
    auth: Authentication | None  # the sender's check under the host's policy (None: no TLS)
    webpki: pkix.PkixVerdict | None  # WebPKI for the MX host name, whenever TLS came up
    honest: bool  # a compliant sender delivers honest mail here
    outcome: str  # what a sender does at this address, in one sentence
    result_type: ResultType | None = None  # what the sender reports for this address
    certificates: tuple[pkix.CertSummary, ...] = ()

    def to_json(self) -> dict[str, Any]:
        dane_json = None
        if self.auth is not None and self.auth.checked.value == "dane":
            dane_json = {
                "ok": self.auth.ok,
                "method": self.auth.verified,
                "result_type": self.auth.result_type.value if self.auth.result_type else None,
                "detail": self.auth.detail,
            }
        webpki_json = None
        if self.webpki is not None:
            webpki_json = {
                "ok": self.webpki.ok,
                "result_type": self.webpki.result_type.value if self.webpki.result_type else None,
                "detail": self.webpki.detail,
                "problems": list(self.webpki.problems),
            }
        return {
            "address": self.address,
            "smtp": self.probe.to_json(),
            "certificates": [c.to_json() for c in self.certificates],
            "webpki": webpki_json,
            "dane": dane_json,
            "honest_delivery": self.honest,
            "sender": self.outcome,
            "result_type": self.result_type.value if self.result_type else None,
        }


@dataclass(frozen=True, slots=True)
class HostCheck:
    """One MX host: its policy as a sender decides it, and each of its addresses."""

    policy: MxPolicy
    covered: bool | None  # an MTA-STS pattern matches the host (None: no MTA-STS policy)
    addresses: tuple[AddressCheck, ...] = ()
    tlsa_insecure: tuple[str, ...] = ()  # TLSA records found without DNSSEC (ignored)

    @property
    def host(self) -> str:
        return self.policy.host

    def to_json(self) -> dict[str, Any]:
        m = self.policy
        return {
            "host": m.host,
            "preference": m.preference,
            "canonical": m.canonical,
            "dnssec": m.dnssec.value,
            "allowed": m.allowed,
            "covered_by_policy": self.covered,
            "tls": m.tls.value,
            "auth": m.auth.value,
            "report_only": m.report_only,
            "source": m.source.value,
            "tlsa": [t.to_text() for t in m.tlsa],
            "tlsa_unusable": [t.to_text() for t in m.tlsa_unusable],
            "tlsa_insecure": list(self.tlsa_insecure),
            "defer": m.defer.to_json() if m.defer else None,
            "addresses": [a.to_json() for a in self.addresses],
        }


@dataclass(frozen=True, slots=True)
class RuaCheck:
    """Whether one TLS-RPT ``rua`` can receive reports, as far as can be seen without one."""

    uri: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class TxtLookup:
    """The TXT records at one name, and how the lookup ended."""

    name: str
    texts: tuple[str, ...] = ()
    outcome: str = "nodata"  # ok, nxdomain, nodata, error
    dnssec: str = "insecure"
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "records": list(self.texts), "outcome": self.outcome}


@dataclass(frozen=True, slots=True)
class MxLookupView:
    """The domain's MX lookup: ``kind`` is ``hosts``, ``implicit``, ``null``, ``nxdomain``,
    ``failed`` or ``bogus``; ``dnssec`` the zone's status as the MX answer showed it."""

    kind: str
    dnssec: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Observations:
    """Everything one check looked up and probed: the input of ``analysis``."""

    domain: str
    at: dt.datetime
    policy: DeliveryPolicy
    mx_lookup: MxLookupView
    hosts: tuple[HostCheck, ...]
    sts_txt: TxtLookup
    fetch: FetchResult | None  # the policy fetch, made exactly as a sender makes it
    policy_text: str | None  # the body fetched, when the fetch succeeded
    rpt_txt: TxtLookup
    rua: tuple[RuaCheck, ...] = ()
    previous: dict[str, Any] | None = None  # the last check's JSON, when the store had one

    @property
    def policy_digest(self) -> str | None:
        if self.policy_text is None:
            return None
        return hashlib.sha256(self.policy_text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class DomainCheck:
    """The result of checking one domain."""

    domain: str
    verdict: Verdict
    protection: Protection
    summary: str  # one sentence for people
    observations: Observations
    findings: tuple[Finding, ...] = ()
    changes: tuple[str, ...] = ()
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_ok(self) -> bool:
        return self.verdict is Verdict.PROTECTED

    def to_json(self) -> dict[str, Any]:
        o = self.observations
        sts = o.policy.mta_sts
        fetch = o.fetch
        return {
            "domain": self.domain,
            "verdict": self.verdict.value,
            "protection": self.protection.value,
            "summary": self.summary,
            "checked_at": o.at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dnssec": o.mx_lookup.dnssec,
            "mx_lookup": o.mx_lookup.kind,
            "mx": [h.to_json() for h in o.hosts],
            "mta_sts": {
                "record": o.sts_txt.to_json(),
                "id": sts.id if sts else None,
                "mode": str(sts.mode) if sts and sts.mode else None,
                "max_age": sts.max_age if sts else None,
                "patterns": list(sts.mx) if sts else [],
                "fetch": None
                if fetch is None
                else {
                    "ok": fetch.ok,
                    "status": fetch.status,
                    "content_type": fetch.content_type,
                    "detail": fetch.detail,
                    "result_type": fetch.result_type.value if fetch.result_type else None,
                    "elapsed": round(fetch.elapsed, 3),
                },
                "policy": o.policy_text,
                "policy_sha256": o.policy_digest,
            },
            "tlsrpt": {
                "record": o.rpt_txt.to_json(),
                "rua": [r.to_json() for r in o.rua],
            },
            "findings": [f.to_json() for f in self.findings],
            "changes": list(self.changes),
            "elapsed": round(self.elapsed, 3),
            **self.extra,
        }
