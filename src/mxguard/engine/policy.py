"""The delivery policy of a domain: what ``resolve()`` decides and ``deliver()`` enforces.

A ``DeliveryPolicy`` says, for each MX host of a domain, whether it may be used, whether TLS
is required there and how its certificate must be authenticated; it keeps every failure seen
while deciding (in the RFC 8460 vocabulary) and a few sentences that explain the decision to
people. ``to_json()`` is the one place where the ``policy --json`` shape is made (see
docs/design.md, "JSON output"), and ``reported()`` the one place where a delivery policy
becomes the policy a TLS-RPT report names (RFC 8460 §4.4).

``Mode`` is the MTA-STS mode of ``protocol/mtasts.py`` (RFC 8461 §5), re-exported: a domain's
mode is the mode of the policy that decided it (or ``enforce`` for DANE and local rules,
``none`` without a policy).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Any

from mxguard.adapters.dns import DnssecStatus
from mxguard.learned.model import LearnedFloor
from mxguard.protocol.dane import Tlsa
from mxguard.protocol.mtasts import Mode
from mxguard.protocol.results import Failure
from mxguard.protocol.tlsrpt_report import PolicyType, ReportedPolicy

__all__ = [
    "Auth",
    "DeliveryPolicy",
    "Mode",
    "MxPolicy",
    "Source",
    "Status",
    "StsState",
    "Tls",
]


class Source(enum.StrEnum):
    DANE = "dane"
    MTA_STS = "mta-sts"
    LIST = "list"
    LOCAL = "local"
    LEARNED = "learned"  # a learned level, enforced (docs/learned.md)
    NONE = "none"


class Tls(enum.StrEnum):
    REQUIRED = "required"
    OPPORTUNISTIC = "opportunistic"


class Auth(enum.StrEnum):
    DANE = "dane"
    PKIX = "pkix"  # WebPKI: trusted chain, unexpired, valid for the MX host name
    NONE = "none"


class Status(enum.StrEnum):
    OK = "ok"  # at least one MX host may be tried now
    DEFER = "defer"  # a temporary or DNSSEC failure: try again later, never weaker
    FAIL = "fail"  # the domain accepts no mail (null MX, no such domain)


@dataclass(frozen=True)
class MxPolicy:
    """The requirements for one MX host."""

    host: str  # the MX target as published (lower case, no trailing dot)
    preference: int
    allowed: bool = True  # False: the policy forbids this host (MTA-STS enforce mismatch)
    tls: Tls = Tls.OPPORTUNISTIC
    auth: Auth = Auth.NONE
    report_only: bool = False  # requirements are checked and reported, not enforced
    tlsa: tuple[Tlsa, ...] = ()  # the usable TLSA records when auth is DANE
    tlsa_unusable: tuple[Tlsa, ...] = ()
    tlsa_name: str | None = None  # the TLSA base domain: SNI and DANE-TA reference name
    names: tuple[str, ...] = ()  # reference identifiers a certificate may match
    addresses: tuple[str, ...] = ()
    dnssec: DnssecStatus = DnssecStatus.INSECURE
    canonical: str | None = None  # the CNAME-expanded host name, when it differs
    defer: Failure | None = None  # this host must not be used now, and why
    source: Source = Source.NONE  # which defence set this host's requirements
    notes: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.allowed and self.defer is None and bool(self.addresses)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "preference": self.preference,
            "allowed": self.allowed,
            "tls": self.tls.value,
            "auth": self.auth.value,
            "report_only": self.report_only,
            "source": self.source.value,
            "tlsa": [t.to_text() for t in self.tlsa],
            "tlsa_unusable": [t.to_text() for t in self.tlsa_unusable],
            "tlsa_name": self.tlsa_name,
            "dnssec": self.dnssec.value,
            "canonical": self.canonical,
            "addresses": list(self.addresses),
            "defer": self.defer.to_json() if self.defer else None,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class StsState:
    """What is known of the domain's MTA-STS policy, for output and for TLS-RPT."""

    id: str | None
    mode: Mode | None
    max_age: int | None
    mx: tuple[str, ...]
    policy_strings: tuple[str, ...]
    fetched_at: dt.datetime | None
    expires_at: dt.datetime | None
    from_cache: bool
    error: Failure | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "mode": None if self.mode is None else str(self.mode),
            "max_age": self.max_age,
            "mx": list(self.mx),
            "fetched_at": _iso(self.fetched_at),
            "expires_at": _iso(self.expires_at),
            "from_cache": self.from_cache,
            "error": self.error.to_json() if self.error else None,
        }


def _iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


@dataclass(frozen=True)
class DeliveryPolicy:
    domain: str
    source: Source
    mode: Mode
    status: Status
    mx: tuple[MxPolicy, ...] = ()
    mta_sts: StsState | None = None
    tlsrpt_rua: tuple[str, ...] = ()
    errors: tuple[Failure, ...] = ()
    warnings: tuple[str, ...] = ()
    explanation: tuple[str, ...] = ()
    mx_secure: bool = False
    local_floor: str | None = None
    learned: LearnedFloor | None = None  # what the learned levels say (docs/learned.md)
    resolved_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def usable_mx(self) -> list[MxPolicy]:
        return [m for m in self.mx if m.usable]

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        """The MX host names the policy lets a sender use (MTA-STS `enforce` forbids the others,
        RFC 8461 §4.1), as published and CNAME-expanded, sorted and each once: the hosts whose
        sessions a TLS-RPT report is about."""
        allowed = [m for m in self.mx if m.allowed]
        return tuple(sorted({h for m in allowed for h in (m.host, m.canonical) if h}))

    @property
    def allowed_addresses(self) -> tuple[str, ...]:
        """The addresses of `allowed_hosts`, sorted and each once."""
        return tuple(sorted({a for m in self.mx if m.allowed for a in m.addresses}))

    def reported(self) -> ReportedPolicy:
        """The policy as a TLS-RPT report names it (RFC 8460 §4.4): `tlsa` with every TLSA
        record of the MX hosts when DANE decided, `sts` with the policy's lines and MX
        patterns when MTA-STS did, else `no-policy-found`; and the domain's `rua` (§3)."""
        if self.source is Source.DANE:
            records = (t.to_text() for m in self.mx for t in (*m.tlsa, *m.tlsa_unusable))
            return ReportedPolicy(
                PolicyType.TLSA, tuple(dict.fromkeys(records)), (), self.tlsrpt_rua
            )
        if self.source is Source.MTA_STS and self.mta_sts is not None:
            sts = self.mta_sts
            return ReportedPolicy(PolicyType.STS, sts.policy_strings, sts.mx, self.tlsrpt_rua)
        return ReportedPolicy(PolicyType.NO_POLICY_FOUND, rua=self.tlsrpt_rua)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "source": self.source.value,
            "mode": self.mode.value,
            "status": self.status.value,
            "mx": [m.to_json() for m in self.mx],
            "mx_dnssec": "secure" if self.mx_secure else "insecure",
            "mta_sts": self.mta_sts.to_json() if self.mta_sts else None,
            "tlsrpt": {"rua": list(self.tlsrpt_rua)} if self.tlsrpt_rua else None,
            "local_rule": self.local_floor,
            "errors": [e.to_json() for e in self.errors],
            "warnings": list(self.warnings),
            "explanation": list(self.explanation),
            "learned": self.learned.to_json() if self.learned else None,
        }
