"""Precedence of the defences: one pure function from what was found to what is decided.

``resolve()`` (engine/resolve.py) does the lookups and gathers their outcomes as
``DomainFacts``: the MX RRset, per MX host how its address and TLSA lookups ended, the
MTA-STS outcome, the static list's entry and the local rule. ``decide(facts)`` turns them into
a ``Decision``, the parts of a ``DeliveryPolicy`` that are decided rather than looked up
(docs/design.md, "Precedence"):

1. the MX RRset: a failed lookup defers the whole domain, a null MX (RFC 7505) or a domain
   that does not exist fails it (RFC 5321 §5.1);
2. per MX host, **DANE**: a DNSSEC-secure TLSA RRset with a usable record makes TLS mandatory
   and DANE the only authentication; only unusable records still make TLS mandatory
   (RFC 7672 §2.2, §3.1). A bogus or failed lookup defers the host, never a weaker rule;
3. **MTA-STS** where DANE does not authenticate (RFC 8461 §2): ``enforce`` uses only the MX
   hosts its patterns match and demands WebPKI-verified TLS, ``testing`` checks the same and
   delivers anyway (RFC 8461 §5);
4. the **static list** in MTA-STS's place, only for a domain without an MTA-STS policy;
5. **local rules** raise the floor (``tls`` < ``verified`` < ``dane``), never lower it;
6. a **learned level** (docs/learned.md), weakest of all and applied last to the resolved
   policy (``apply_learned``): in ``enforce`` mode it raises opportunistic and report-only
   hosts to TLS (verified TLS for a learned ``webpki``), never touching a DANE host or one a
   policy forbids, and never lowering anything.

What may live here: frozen dataclasses, enums, tables and small functions. No I/O, no
asyncio, no clock: whatever depends on the network or the time (is the static list expired?)
is a fact the caller passes in. Every rule is a row in a table or one small function citing
the RFC section it implements, and the sentences for people are made here, once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from mxguard.adapters.dns import DnssecStatus
from mxguard.engine.policy import Auth, DeliveryPolicy, Mode, MxPolicy, Source, Status, Tls
from mxguard.engine.sts import StsOutcome
from mxguard.learned.config import Mode as LearnedMode
from mxguard.learned.model import FloorState, LearnedFloor
from mxguard.protocol import dane, localrules, mtasts, policylist
from mxguard.protocol.levels import SecurityLevel
from mxguard.protocol.results import Failure, ResultType

# --- facts -------------------------------------------------------------------------------------


class MxLookup(enum.Enum):
    """How the MX lookup of the domain ended."""

    HOSTS = "hosts"  # MX records naming the hosts
    IMPLICIT = "implicit"  # no MX records: the domain is its own MX host
    NULL = "null"  # "0 .": the domain accepts no mail
    NXDOMAIN = "nxdomain"  # the domain does not exist
    BOGUS = "bogus"  # the answer failed DNSSEC validation
    FAILED = "failed"  # a temporary failure: nothing can be concluded now


class HostLookup(enum.Enum):
    """How the address lookups (A, AAAA) and then the TLSA lookups of one MX host ended."""

    ADDRESS_BOGUS = "address-bogus"  # an A or AAAA answer failed DNSSEC validation
    ADDRESS_FAILED = "address-failed"  # one lookup failed and the other found nothing
    INSECURE = "insecure"  # address records not all signed: TLSA was not looked up
    TLSA_BOGUS = "tlsa-bogus"  # the TLSA answer failed DNSSEC validation
    TLSA_FAILED = "tlsa-failed"  # the TLSA lookup failed (no proof of absence)
    TLSA_UNSIGNED = "tlsa-unsigned"  # TLSA records exist but are not DNSSEC-signed
    NO_TLSA = "no-tlsa"  # a secure denial of TLSA records
    TLSA = "tlsa"  # a secure TLSA RRset, in ``HostFacts.tlsa``


@dataclass(frozen=True)
class HostFacts:
    """What DNS said about one MX host."""

    host: str  # the MX target as published (lower case, no trailing dot)
    preference: int
    lookup: HostLookup
    addresses: tuple[str, ...] = ()
    canonical: str | None = None  # the CNAME-expanded name, when it differs from ``host``
    tlsa: dane.TlsaSet | None = None  # the secure RRset (``HostLookup.TLSA``)
    tlsa_base: str | None = None  # the name whose TLSA lookup decided (``TLSA*`` lookups)
    detail: str = ""  # what the failed lookup said (the ``*_BOGUS`` and ``*_FAILED`` lookups)
    notes: tuple[str, ...] = ()  # for people: lookups that failed without consequence


@dataclass(frozen=True)
class MxFacts:
    """The MX RRset of the domain and, unless the lookup settled the domain, its hosts."""

    lookup: MxLookup
    secure: bool = False  # the MX RRset is DNSSEC-secure
    detail: str = ""  # what a failed lookup said
    hosts: tuple[HostFacts, ...] = ()  # in preference order


@dataclass(frozen=True)
class ListFacts:
    """The static policy list's entry for exactly this domain; ``expired``: the list is."""

    entry: policylist.ListPolicy | None = None
    expired: bool = False


NO_STS: Final = StsOutcome(None, None)
"""No MTA-STS policy, nothing cached, nothing went wrong."""


@dataclass(frozen=True)
class DomainFacts:
    """Everything ``decide`` looks at."""

    domain: str  # normalised: lower-case A-labels, no trailing dot
    mx: MxFacts
    sts: StsOutcome = NO_STS
    listed: ListFacts = ListFacts()
    rule: localrules.Rule | None = None  # the most specific local rule covering the domain


@dataclass(frozen=True)
class Decision:
    """What ``decide`` decides; ``resolve()`` adds what was looked up into a DeliveryPolicy."""

    source: Source
    mode: Mode
    status: Status
    mx: tuple[MxPolicy, ...] = ()
    errors: tuple[Failure, ...] = ()
    warnings: tuple[str, ...] = ()
    explanation: tuple[str, ...] = ()
    local_floor: str | None = None


# --- how a failed lookup is named --------------------------------------------------------------


class _Dns(enum.Enum):
    ERROR = "dns-error"


DNS_ERROR: Final = _Dns.ERROR
"""A lookup that got no usable answer (timeout, SERVFAIL, REFUSED): no RFC 8460 result type,
since it is no TLS negotiation failure (RFC 8460 §4.3.3) and no session follows it; people
are told what happened (``Failure.dns_lookup``)."""

_Cause = ResultType | _Dns


def _failure(cause: _Cause, detail: str) -> Failure:
    if isinstance(cause, ResultType):
        return Failure(cause, detail)
    return Failure.dns_lookup(detail)


# --- the MX RRset ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settled:
    status: Status
    failure: _Cause | None  # recorded among the errors as "MX lookup: <detail>"
    why: str  # the explanation; {domain} and {detail} are filled in


_SETTLED: Final[Mapping[MxLookup, _Settled]] = {
    # RFC 7672 §2.1.1: a DNSSEC failure is no answer at all: defer, never a weaker rule.
    MxLookup.BOGUS: _Settled(
        Status.DEFER,
        ResultType.DNSSEC_INVALID,
        "deferred: the MX lookup of {domain} failed ({detail})",
    ),
    # RFC 5321 §5.1: after a temporary error the message is queued and retried later.
    # RFC 8460 §4.3.3: no result type, "validation-failure" is a negotiation failure.
    MxLookup.FAILED: _Settled(Status.DEFER, DNS_ERROR, "deferred: {detail}"),
    # RFC 5321 §5.1: a non-existent domain is reported as an error.
    MxLookup.NXDOMAIN: _Settled(Status.FAIL, None, "{domain} does not exist"),
    # RFC 7505 §3: a null MX says the domain accepts no mail at all.
    MxLookup.NULL: _Settled(
        Status.FAIL, None, "{domain} publishes a null MX (RFC 7505): it accepts no mail"
    ),
}


def _settle(facts: DomainFacts, row: _Settled) -> Decision:
    """A decision about the whole domain, before any MX host is looked at."""
    errors = list(facts.sts.errors)
    if row.failure is DNS_ERROR:
        errors.append(_failure(row.failure, facts.mx.detail))  # the adapter names the lookup
    elif row.failure is not None:
        errors.append(_failure(row.failure, f"MX lookup: {facts.mx.detail}"))
    return Decision(
        source=Source.NONE,
        mode=Mode.NONE,
        status=row.status,
        errors=tuple(errors),
        warnings=facts.sts.notes,
        explanation=(row.why.format(domain=facts.domain, detail=facts.mx.detail),),
    )


# --- one MX host: what DNS said ----------------------------------------------------------------


@dataclass(frozen=True)
class _HostRow:
    dnssec: DnssecStatus
    defer: _Cause | None = None  # the host must not be used now
    prefix: str = ""  # the defer detail is this prefix and what the lookup said
    tlsa_name: bool = False  # the TLSA base domain is the name whose lookup decided
    dane: bool = False  # the TLSA RRset applies
    note: str | None = None  # added to the host's notes; {base} is the TLSA base name


_HOSTS: Final[Mapping[HostLookup, _HostRow]] = {
    # RFC 7672 §2.1.1: a bogus answer: the host cannot be used now (dnssec-invalid).
    HostLookup.ADDRESS_BOGUS: _HostRow(DnssecStatus.BOGUS, ResultType.DNSSEC_INVALID),
    # RFC 5321 §5.1: a temporary error is retried later, never read as "no address".
    # RFC 8460 §4.3.3: no result type; the adapter's detail names the lookup.
    HostLookup.ADDRESS_FAILED: _HostRow(DnssecStatus.INDETERMINATE, DNS_ERROR),
    # RFC 7672 §2.2: TLSA records count only for hosts whose address records are secure.
    HostLookup.INSECURE: _HostRow(DnssecStatus.INSECURE),
    # RFC 7672 §2.1.1: a bogus TLSA answer defers the host; never MTA-STS or plain text.
    HostLookup.TLSA_BOGUS: _HostRow(
        DnssecStatus.SECURE, ResultType.DNSSEC_INVALID, "TLSA lookup: ", tlsa_name=True
    ),
    # RFC 7672 §2.2: a failed TLSA lookup is no proof of absence: defer the host, never
    # fall back to unauthenticated TLS. RFC 8460 §4.3.3: no result type (no negotiation).
    HostLookup.TLSA_FAILED: _HostRow(DnssecStatus.INDETERMINATE, DNS_ERROR, tlsa_name=True),
    # RFC 7672 §2.2: TLSA records that are not DNSSEC-validated are ignored.
    HostLookup.TLSA_UNSIGNED: _HostRow(
        DnssecStatus.SECURE,
        note="TLSA records at _25._tcp.{base} are not DNSSEC-signed: ignored",
    ),
    # RFC 7672 §2.2: a secure denial of TLSA records: no DANE for this host.
    HostLookup.NO_TLSA: _HostRow(DnssecStatus.SECURE),
    # RFC 7672 §2.2: a secure TLSA RRset; the TLSA base domain is where it was found.
    HostLookup.TLSA: _HostRow(DnssecStatus.SECURE, tlsa_name=True, dane=True),
}


def _looked_up(f: HostFacts, domain: str, mx_secure: bool) -> MxPolicy:
    """The host as DNS describes it, before any defence sets requirements."""
    row = _HOSTS[f.lookup]
    tlsa_name = (f.tlsa_base if row.tlsa_name else None) or f.host
    notes = f.notes
    if row.note is not None:
        notes = (*notes, row.note.format(base=f.tlsa_base))
    return MxPolicy(
        host=f.host,
        preference=f.preference,
        addresses=f.addresses,
        dnssec=row.dnssec,
        canonical=f.canonical if f.canonical != f.host else None,
        defer=_failure(row.defer, row.prefix + f.detail) if row.defer is not None else None,
        tlsa_name=tlsa_name,
        names=_names(f.host, tlsa_name, f.canonical, domain, mx_secure),
        notes=notes,
    )


def _names(
    host: str, tlsa_name: str, canonical: str | None, domain: str, mx_secure: bool
) -> tuple[str, ...]:
    """Reference identifiers a certificate may match (RFC 7672 §3.2.2, RFC 8461 §4.1).

    The TLSA base domain (SNI) first, then the MX host name as published; the next-hop domain
    only when the MX RRset is secure (otherwise an attacker could have chosen it).
    """
    names = [tlsa_name, host]
    if canonical is not None and canonical != host:
        names.append(canonical)
    if mx_secure:
        names.append(domain)
    return tuple(dict.fromkeys(names))


# --- one MX host: DANE -------------------------------------------------------------------------

# Keyed by "at least one record is usable".
_DANE: Final[Mapping[bool, tuple[Auth, str | None]]] = {
    # RFC 7672 §3.1: a usable record: the certificate must authenticate by DANE, and only so.
    True: (Auth.DANE, None),
    # RFC 7672 §2.2: only unusable records: TLS is still mandatory, without authentication.
    False: (
        Auth.NONE,
        "only unusable TLSA records: TLS is required, but DANE cannot authenticate the certificate",
    ),
}


def _dane(m: MxPolicy, tlsa: dane.TlsaSet | None) -> MxPolicy:
    """RFC 7672 §2.2: a secure, non-empty TLSA RRset makes STARTTLS mandatory."""
    if tlsa is None or not tlsa.tls_required:
        return m
    auth, note = _DANE[tlsa.authenticated]
    m = replace(
        m,
        tls=Tls.REQUIRED,
        auth=auth,
        tlsa=tlsa.usable,
        tlsa_unusable=tuple(u.record for u in tlsa.unusable),
        source=Source.DANE,
    )
    return _note(m, note) if note is not None else m


# --- one MX host: MTA-STS, or the static list in its place ------------------------------------


@dataclass(frozen=True)
class _Policy:
    """The domain-wide policy that applies where DANE does not authenticate."""

    source: Source  # MTA_STS or LIST
    mode: Mode  # ENFORCE or TESTING
    allows: Callable[[str], bool]  # does the policy match this MX host name


@dataclass(frozen=True)
class _PolicyRow:
    allowed: bool = True
    report_only: bool = False
    tls: Tls | None = None  # None: as DANE (or nothing) left it
    auth: Auth | None = None
    note: str | None = None  # {source} is the policy's source


# Keyed by (mode, "the host matches one of the policy's MX patterns").
_POLICY: Final[Mapping[tuple[Mode, bool], _PolicyRow]] = {
    # RFC 8461 §4.2, §5: enforce: a matching MX host needs WebPKI-verified TLS.
    (Mode.ENFORCE, True): _PolicyRow(tls=Tls.REQUIRED, auth=Auth.PKIX),
    # RFC 8461 §4.1, §5: enforce: a host that fails MX matching is never used.
    (Mode.ENFORCE, False): _PolicyRow(
        allowed=False, note="not an MX host the {source} policy allows: never used"
    ),
    # RFC 8461 §5: testing: check and report, deliver anyway.
    (Mode.TESTING, True): _PolicyRow(report_only=True),
    (Mode.TESTING, False): _PolicyRow(
        report_only=True,
        note="not an MX host the {source} policy lists (testing: reported, still used)",
    ),
}


def _by_policy(m: MxPolicy, policy: _Policy | None) -> MxPolicy:
    """RFC 8461 §2: MTA-STS (or the list) never overrides DANE authentication."""
    if policy is None or m.auth is Auth.DANE:
        return m
    row = _POLICY[(policy.mode, policy.allows(m.host))]
    m = replace(
        m,
        allowed=row.allowed,
        report_only=row.report_only,
        tls=row.tls or m.tls,
        auth=row.auth or m.auth,
        source=policy.source,
    )
    return _note(m, row.note.format(source=policy.source.value)) if row.note else m


# --- one MX host: the local floor --------------------------------------------------------------


@dataclass(frozen=True)
class _FloorRow:
    tls: Tls | None = None  # TLS is raised to this
    auth: Auth | None = None  # an unauthenticated host is raised to this
    dane: bool = False  # a host without DANE authentication is deferred (dane-required)


# No RFC defines local rules (protocol/localrules.py); they only ever raise requirements.
_FLOORS: Final[Mapping[localrules.Floor, _FloorRow]] = {
    localrules.Floor.NONE: _FloorRow(),
    localrules.Floor.TLS: _FloorRow(tls=Tls.REQUIRED),
    localrules.Floor.VERIFIED: _FloorRow(tls=Tls.REQUIRED, auth=Auth.PKIX),
    # RFC 8460 §4.3.2.1: no usable TLSA records where DANE is required is dane-required.
    localrules.Floor.DANE: _FloorRow(dane=True),
}


def _apply_floor(m: MxPolicy, floor: localrules.Floor) -> MxPolicy:
    """Local rules only raise requirements (never lower DANE or an enforced policy)."""
    row = _FLOORS[floor]
    source = m.source if m.source is not Source.NONE else Source.LOCAL
    if row.dane:
        if m.auth is Auth.DANE or m.defer is not None:
            return m
        detail = f"a local rule requires DANE, and {m.host} has no usable DANE TLSA records"
        return replace(m, defer=Failure(localrules.DANE_UNAVAILABLE, detail), source=source)
    if row.tls is None:
        return m
    auth = row.auth if row.auth is not None and m.auth is Auth.NONE else m.auth
    return replace(m, tls=row.tls, auth=auth, source=source)


def _note(m: MxPolicy, text: str) -> MxPolicy:
    return replace(m, notes=(*m.notes, text))


# --- the domain as a whole ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """The domain-wide facts that decide, after the precedence between them is applied."""

    sts: mtasts.Policy | None  # an MTA-STS policy in enforce or testing mode
    from_cache: bool
    listed: policylist.ListPolicy | None  # the list entry, where it may apply
    floor: localrules.Floor


def _context(facts: DomainFacts) -> _Context:
    policy = facts.sts.policy
    # The static list (no RFC; docs/rfc-notes.md, "The static policy list") stands in only
    # for a domain without an MTA-STS policy, and an expired list is ignored.
    usable_list = policy is None and not facts.listed.expired
    return _Context(
        # RFC 8461 §5: mode none is no policy.
        sts=policy if policy is not None and policy.mode is not Mode.NONE else None,
        from_cache=bool(facts.sts.state and facts.sts.state.from_cache),
        listed=facts.listed.entry if usable_list else None,
        floor=facts.rule.floor if facts.rule is not None else localrules.Floor.NONE,
    )


def _domain_policy(ctx: _Context) -> _Policy | None:
    if ctx.sts is not None:
        return _Policy(Source.MTA_STS, ctx.sts.mode, ctx.sts.allows)
    if ctx.listed is not None:
        return _Policy(Source.LIST, ctx.listed.mode, ctx.listed.allows)
    return None


_Verdict = tuple[Source, Mode, str | None]  # the domain's source and mode, and why


def _dane_decides(ctx: _Context, mx: tuple[MxPolicy, ...]) -> _Verdict | None:
    """RFC 8461 §2: DANE on any MX host takes precedence over MTA-STS for the domain."""
    dane_hosts = [m for m in mx if m.source is Source.DANE]
    if not dane_hosts:
        return None
    usable = sum(len(m.tlsa) for m in dane_hosts)
    line = (
        f"DANE: {usable} usable TLSA record(s) on {len(dane_hosts)} signed MX host(s)"
        if usable
        else "DANE: only unusable TLSA records: TLS required, not authenticated"
    )
    if ctx.sts is not None:
        line += f" — takes precedence over the MTA-STS {ctx.sts.mode.value} policy"
    return Source.DANE, Mode.ENFORCE, line


def _sts_decides(ctx: _Context, mx: tuple[MxPolicy, ...]) -> _Verdict | None:
    """RFC 8461 §5: the domain's own MTA-STS policy, enforced or (testing) only reported."""
    if ctx.sts is None:
        return None
    mode = ctx.sts.mode
    line = (
        f"MTA-STS {ctx.sts.mode.value} policy (max_age {ctx.sts.max_age} s"
        + (", from the cache" if ctx.from_cache else "")
        + "): verified TLS to "
        + ", ".join(ctx.sts.mx)
        + (" — reported, not enforced" if mode is Mode.TESTING else "")
    )
    return Source.MTA_STS, mode, line


def _list_decides(ctx: _Context, mx: tuple[MxPolicy, ...]) -> _Verdict | None:
    """The static list (no RFC) stands in for MTA-STS; its modes mean the same (RFC 8461 §5)."""
    if ctx.listed is None:
        return None
    return (
        Source.LIST,
        ctx.listed.mode,
        f"static policy list entry ({ctx.listed.mode.value})",
    )


def _local_decides(ctx: _Context, mx: tuple[MxPolicy, ...]) -> _Verdict | None:
    """A local floor alone (no RFC); the rule's own line is added for every decision."""
    if ctx.floor is localrules.Floor.NONE:
        return None
    return Source.LOCAL, Mode.ENFORCE, None


def _nothing_decides(ctx: _Context, mx: tuple[MxPolicy, ...]) -> _Verdict | None:
    """RFC 3207 §6: without a policy STARTTLS is opportunistic, and can be stripped."""
    return (
        Source.NONE,
        Mode.NONE,
        "no policy: opportunistic STARTTLS, which an on-path attacker can strip",
    )


# The first rung that answers names the domain's source and mode (docs/design.md, "Precedence").
_LADDER: Final = (_dane_decides, _sts_decides, _list_decides, _local_decides, _nothing_decides)


# Keyed by (some host may be used now, every host provably has no address).
_STATUS: Final[Mapping[tuple[bool, bool], tuple[Status, str | None]]] = {
    (True, False): (Status.OK, None),
    # RFC 5321 §5.1: no MX host (nor the implicit MX) is usable: a permanent error.
    (False, True): (Status.FAIL, "no MX host has an address: the domain cannot receive mail"),
    # RFC 8461 §5.1: a temporary, DNSSEC or policy failure defers; it never bounces.
    (False, False): (Status.DEFER, "deferred: no MX host may be used now"),
}


def _status(mx: tuple[MxPolicy, ...]) -> tuple[Status, str | None]:
    usable = any(m.usable for m in mx)
    unreachable = not usable and all(not m.addresses and m.defer is None for m in mx)
    return _STATUS[(usable, unreachable)]


def _warnings(facts: DomainFacts) -> tuple[str, ...]:
    warnings = list(facts.sts.notes)
    if facts.mx.lookup is MxLookup.IMPLICIT:
        # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX host.
        warnings.append(f"{facts.domain} has no MX records; using the domain itself (implicit MX)")
    if facts.sts.policy is None and facts.listed.expired:
        warnings.append(
            "the static policy list has EXPIRED; list entries are ignored and delivery "
            "falls back to opportunistic TLS for unlisted protection — update the list"
        )
    return tuple(warnings)


def _remarks(facts: DomainFacts, ctx: _Context) -> list[str]:
    """Explanation lines about MTA-STS withdrawn and the local rule, whoever decided."""
    lines = []
    if facts.sts.policy is not None and facts.sts.policy.mode is Mode.NONE:
        # RFC 8461 §8.3: publishing mode none is how a domain withdraws its policy.
        lines.append("MTA-STS mode none: the domain has withdrawn its policy")
    if facts.rule is not None:
        lines.append(f"local rule {facts.rule.pattern!r}: at least {ctx.floor.value}")
    return lines


def _host(f: HostFacts, facts: DomainFacts, ctx: _Context) -> MxPolicy:
    """One MX host: DNS, then DANE, then MTA-STS or the list, then the local floor."""
    m = _looked_up(f, facts.domain, facts.mx.secure)
    m = _dane(m, f.tlsa if _HOSTS[f.lookup].dane else None)
    m = _by_policy(m, _domain_policy(ctx))
    return _apply_floor(m, ctx.floor)


def decide(facts: DomainFacts) -> Decision:
    """The delivery decision for a domain, from what its lookups found (no I/O)."""
    settled = _SETTLED.get(facts.mx.lookup)
    if settled is not None:
        return _settle(facts, settled)
    ctx = _context(facts)
    mx = tuple(_host(f, facts, ctx) for f in facts.mx.hosts)
    source, mode, line = next(v for rung in _LADDER if (v := rung(ctx, mx)) is not None)
    status, why = _status(mx)
    explanation = [line] if line is not None else []
    explanation += _remarks(facts, ctx)
    if why is not None:
        explanation.append(why)
    return Decision(
        source=source,
        mode=mode,
        status=status,
        mx=mx,
        errors=(*facts.sts.errors, *(m.defer for m in mx if m.defer is not None)),
        warnings=_warnings(facts),
        explanation=tuple(explanation),
        local_floor=ctx.floor.value if facts.rule is not None else None,
    )


# --- a learned level (docs/learned.md; no RFC) -------------------------------------------------


def _learned_host(m: MxPolicy, level: SecurityLevel) -> MxPolicy:
    """One host held to a learned level: TLS required (and WebPKI for a learned ``webpki``),
    only ever raised. A DANE-authenticated host, a host the policy forbids and a deferred
    one stay as they are. A learned ``dane`` whose TLSA records are gone holds TLS only: a
    DANE host's certificate is often not one the WebPKI would accept."""
    if m.auth is Auth.DANE or not m.allowed or m.defer is not None:
        return m
    auth = Auth.PKIX if level is SecurityLevel.WEBPKI and m.auth is Auth.NONE else m.auth
    if m.tls is Tls.REQUIRED and auth is m.auth and not m.report_only:
        return m
    return _note(
        replace(
            m,
            tls=Tls.REQUIRED,
            auth=auth,
            report_only=False,
            source=m.source if m.source is not Source.NONE else Source.LEARNED,
        ),
        f"learned level {level.value}: enforced on this host",
    )


def _unavailable(m: MxPolicy, detail: str) -> MxPolicy:
    """A host that a learned floor might have to hold, while the learned levels cannot be read:
    not used now (a temporary failure never lowers security). No RFC 8460 result type: no
    TLS negotiation failed."""
    if m.tls is Tls.REQUIRED or not m.allowed or m.defer is not None:
        return m
    return replace(m, defer=Failure(ResultType.VALIDATION_FAILURE, detail, dns_error=True))


def apply_learned(policy: DeliveryPolicy, learned: LearnedFloor) -> DeliveryPolicy:
    """``policy`` with what the learned levels say (``LearnedFloor``): shown always, applied in
    ``enforce`` state only, and only ever raising requirements (weaker than every published
    policy and local rule). A floor whose defer window has passed with ``after_window =
    bounce`` fails the domain for good; with ``deliver`` it is lifted."""
    policy = replace(
        policy, learned=learned, explanation=(*policy.explanation, learned.explanation())
    )
    if policy.status is Status.FAIL:
        return policy
    if learned.error is not None:
        if learned.mode is not LearnedMode.ENFORCE:
            return policy
        detail = f"deferred: learned levels are enforced and cannot be read ({learned.error})"
        mx = tuple(_unavailable(m, detail) for m in policy.mx)
        status = Status.OK if any(m.usable for m in mx) else Status.DEFER
        return replace(policy, mx=mx, status=status,
                       errors=(*policy.errors, *(m.defer for m in mx if m.defer and
                                                 m.defer.detail == detail)))  # fmt: skip
    if learned.level is None:
        return policy
    if learned.state is FloorState.ENFORCE:
        mx = tuple(_learned_host(m, learned.level) for m in policy.mx)
        raised = mx != policy.mx
        if policy.source is Source.NONE and raised:
            return replace(policy, mx=mx, source=Source.LEARNED, mode=Mode.ENFORCE)
        return replace(policy, mx=mx)
    if learned.state is FloorState.BOUNCE:
        exposed = any(m.usable and m.tls is not Tls.REQUIRED for m in policy.mx)
        if exposed:
            return replace(policy, status=Status.FAIL)
    return policy
