"""``resolve(domain)``: the one place where the precedence of the defences is decided.

For each MX host, in this order (docs/design.md "Precedence", RFC 8461 §2, RFC 7672 §2.2):

1. **DANE**: a DNSSEC-secure TLSA RRset at the host with a usable record makes TLS mandatory
   and DANE the only way to authenticate; MTA-STS never overrides it. A secure RRset with only
   unusable records still makes TLS mandatory (without authentication).
2. **MTA-STS**: an ``enforce`` policy restricts the MX hosts to its patterns and demands
   WebPKI-verified TLS; ``testing`` checks the same but only reports.
3. **Static list** (STARTTLS Everywhere format), when the domain publishes no MTA-STS policy.
4. **Local rules** raise the floor (``tls`` < ``verified`` < ``dane``); they never lower what
   the domain itself demands.

Temporary failures and DNSSEC failures never fall through to a weaker rule: the host (or the
whole domain) is deferred with its result type (``dnssec-invalid`` for bogus answers).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace

from mxguard.adapters.dns import DnsAnswer, DnsResolver, DnssecStatus, Outcome
from mxguard.engine.policy import (
    Auth,
    DeliveryPolicy,
    Mode,
    MxPolicy,
    Source,
    Status,
    Tls,
)
from mxguard.engine.sts import StsOutcome, StsResolver
from mxguard.protocol import dane, localrules, mtasts, policylist, tlsrpt
from mxguard.protocol.results import Failure, ResultType


class DomainError(ValueError):
    """The argument is not a domain name mail could be sent to."""


def normalise_domain(domain: str) -> str:
    """Lower-case A-label form without a trailing dot (IDNA, RFC 5891)."""
    try:
        return mtasts.normalise_host(domain)
    except ValueError as exc:
        raise DomainError(f"{domain!r} is not a valid domain name: {exc}") from None


@dataclass(frozen=True)
class _HostFacts:
    """What DNS says about one MX host."""

    addresses: tuple[str, ...]
    dnssec: DnssecStatus
    canonical: str
    tlsa: dane.TlsaSet | None = None
    tlsa_name: str | None = None
    defer: Failure | None = None
    notes: tuple[str, ...] = ()


class Resolver:
    """Resolves delivery policies. One instance serves many lookups (it holds the caches)."""

    def __init__(
        self,
        dns: DnsResolver,
        sts: StsResolver,
        *,
        policy_list: policylist.PolicyList | None = None,
        local_rules: localrules.Rules | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.dns = dns
        self.sts = sts
        self.policy_list = policy_list
        self.local_rules = local_rules
        self.clock = clock

    async def resolve(self, domain: str) -> DeliveryPolicy:
        domain = normalise_domain(domain)
        async with asyncio.TaskGroup() as tg:
            mx_task = tg.create_task(self.dns.query(domain, "MX"))
            sts_task = tg.create_task(self.sts.lookup(domain))
            rpt_task = tg.create_task(self.dns.query(f"_smtp._tls.{domain}", "TXT"))
        mx_answer, sts, rpt = mx_task.result(), sts_task.result(), rpt_task.result()
        rua = _rua(rpt)
        errors: list[Failure] = list(sts.errors)
        warnings: list[str] = list(sts.notes)

        def settled(status: Status, why: str) -> DeliveryPolicy:
            """A decision about the whole domain, before any MX host is looked at."""
            return DeliveryPolicy(
                domain=domain,
                source=Source.NONE,
                mode=Mode.NONE,
                status=status,
                mta_sts=sts.state,
                tlsrpt_rua=rua,
                errors=tuple(errors),
                warnings=tuple(warnings),
                explanation=(why,),
                mx_secure=mx_answer.secure,
            )

        # --- the MX RRset --------------------------------------------------------------------
        if mx_answer.failed:
            result = (
                ResultType.DNSSEC_INVALID
                if mx_answer.dnssec is DnssecStatus.BOGUS
                else ResultType.VALIDATION_FAILURE
            )
            errors.append(Failure(result, f"MX lookup: {mx_answer.detail}"))
            return settled(
                Status.DEFER, f"deferred: the MX lookup of {domain} failed ({mx_answer.detail})"
            )
        if mx_answer.outcome is Outcome.NXDOMAIN:
            return settled(Status.FAIL, f"{domain} does not exist")
        if mx_answer.outcome is Outcome.NODATA:
            # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX host.
            targets = [(0, domain)]
            warnings.append(f"{domain} has no MX records; using the domain itself (implicit MX)")
        else:
            targets = sorted(
                ((int(r.preference), _name(r.exchange)) for r in mx_answer.records),
                key=lambda t: t[0],
            )
            if any(host == "" for _, host in targets):
                # RFC 7505: a null MX ("0 .") says the domain accepts no mail at all.
                return settled(
                    Status.FAIL, f"{domain} publishes a null MX (RFC 7505): it accepts no mail"
                )

        # --- each MX host ------------------------------------------------------------------
        async with asyncio.TaskGroup() as tg:
            fact_tasks = [tg.create_task(self._host(host)) for _, host in targets]
        facts = [t.result() for t in fact_tasks]

        return self._decide(domain, targets, facts, mx_answer, sts, errors, warnings, rua)

    # --- DNS facts about a host ------------------------------------------------------------

    async def _host(self, host: str) -> _HostFacts:
        a, aaaa = await asyncio.gather(self.dns.query(host, "A"), self.dns.query(host, "AAAA"))
        answers = [a, aaaa]
        bogus = [x for x in answers if x.dnssec is DnssecStatus.BOGUS]
        if bogus:
            return _HostFacts(
                (), DnssecStatus.BOGUS, host,
                defer=Failure(ResultType.DNSSEC_INVALID, bogus[0].detail),
            )  # fmt: skip
        usable = [x for x in answers if x.outcome is not Outcome.ERROR]
        addresses = tuple(str(r.address) for x in usable for r in x.records)
        if not addresses and len(usable) < len(answers):
            # One lookup failed and the other found nothing: the host may well have an
            # address we could not see now. That is temporary, never "no address".
            failed = next(x for x in answers if x.outcome is Outcome.ERROR)
            return _HostFacts(
                (), DnssecStatus.INDETERMINATE, host,
                defer=Failure(ResultType.VALIDATION_FAILURE, f"address lookup: {failed.detail}"),
            )  # fmt: skip
        canonical = next((x.canonical for x in usable if x.records), usable[0].canonical)
        notes: list[str] = [x.detail for x in answers if x.outcome is Outcome.ERROR]
        if not addresses:
            notes.append(f"{host} has no address records")
        if not all(x.secure for x in usable):
            # RFC 7672 §2.2: TLSA records are looked up only for hosts whose address
            # records are secure; otherwise DANE does not apply to this host.
            return _HostFacts(addresses, DnssecStatus.INSECURE, canonical, notes=tuple(notes))

        # RFC 7671 §7: for a CNAME'd host try the expanded name first, then the original.
        names = [canonical, host] if canonical != host else [host]
        for base in names:
            answer = await self.dns.query(f"_25._tcp.{base}", "TLSA")
            if answer.dnssec is DnssecStatus.BOGUS:
                return _HostFacts(
                    addresses, DnssecStatus.SECURE, canonical, tlsa_name=base,
                    defer=Failure(ResultType.DNSSEC_INVALID, f"TLSA lookup: {answer.detail}"),
                    notes=tuple(notes),
                )  # fmt: skip
            if answer.outcome is Outcome.ERROR:
                # RFC 7672 §2.2: a TLSA lookup that fails (not a proof of absence) means
                # this host cannot be used now; never fall back to unauthenticated TLS.
                return _HostFacts(
                    addresses, DnssecStatus.INDETERMINATE, canonical, tlsa_name=base,
                    defer=Failure(ResultType.VALIDATION_FAILURE, f"TLSA lookup: {answer.detail}"),
                    notes=tuple(notes),
                )  # fmt: skip
            if answer.outcome is Outcome.OK:
                if not answer.secure:
                    notes.append(f"TLSA records at _25._tcp.{base} are not DNSSEC-signed: ignored")
                    break
                records = []
                for rd in answer.records:
                    records.append(dane.from_rdata(rd))
                return _HostFacts(
                    addresses, DnssecStatus.SECURE, canonical, tlsa=dane.classify(records),
                    tlsa_name=base, notes=tuple(notes),
                )  # fmt: skip
        return _HostFacts(addresses, DnssecStatus.SECURE, canonical, notes=tuple(notes))

    # --- precedence --------------------------------------------------------------------------

    def _decide(
        self,
        domain: str,
        targets: list[tuple[int, str]],
        facts: list[_HostFacts],
        mx_answer: DnsAnswer,
        sts: StsOutcome,
        errors: list[Failure],
        warnings: list[str],
        rua: tuple[str, ...],
    ) -> DeliveryPolicy:
        now = self.clock()
        explanation: list[str] = []
        sts_policy = sts.policy
        active_sts = sts_policy if sts_policy and sts_policy.mode is not mtasts.Mode.NONE else None

        listed: policylist.ListPolicy | None = None
        if self.policy_list is not None and sts_policy is None:
            if self.policy_list.is_expired(now):
                warnings.append(
                    "the static policy list has EXPIRED; list entries are ignored and delivery "
                    "falls back to opportunistic TLS for unlisted protection — update the list"
                )
            else:
                listed = self.policy_list.lookup(domain)

        rule = localrules.floor_for(self.local_rules, domain) if self.local_rules else None
        floor = rule.floor if rule else localrules.Floor.NONE

        mx_out: list[MxPolicy] = []
        for (pref, host), f in zip(targets, facts, strict=True):
            m = MxPolicy(
                host=host, preference=pref, addresses=f.addresses, dnssec=f.dnssec,
                canonical=f.canonical if f.canonical != host else None, defer=f.defer,
                tlsa_name=f.tlsa_name or host, names=_names(host, f, domain, mx_answer.secure),
                notes=f.notes,
            )  # fmt: skip
            if f.tlsa is not None and f.tlsa.tls_required:
                m = replace(
                    m,
                    tls=Tls.REQUIRED,
                    auth=Auth.DANE if f.tlsa.authenticated else Auth.NONE,
                    tlsa=f.tlsa.usable,
                    tlsa_unusable=tuple(u.record for u in f.tlsa.unusable),
                    source=Source.DANE,
                )
                if not f.tlsa.authenticated:
                    m = _note(
                        m,
                        "only unusable TLSA records: TLS is required, but DANE cannot "
                        "authenticate the certificate",
                    )
            # MTA-STS (or the list standing in for it) applies where DANE does not authenticate.
            by_policy: tuple[Source, str, Callable[[str], bool]] | None = None
            if active_sts is not None:
                by_policy = (Source.MTA_STS, active_sts.mode.value, active_sts.allows)
            elif listed is not None:
                by_policy = (Source.LIST, listed.mode.value, listed.allows)
            if by_policy is not None and m.auth is not Auth.DANE:
                source, mode, allows = by_policy
                if mode == "enforce":
                    if allows(host):
                        m = replace(m, tls=Tls.REQUIRED, auth=Auth.PKIX, source=source)
                    else:
                        m = _note(
                            replace(m, allowed=False, source=source),
                            f"not an MX host the {source.value} policy allows: never used",
                        )
                else:  # testing: check and report, deliver anyway (RFC 8461 §5)
                    m = replace(m, report_only=True, source=source)
                    if not allows(host):
                        m = _note(
                            m,
                            f"not an MX host the {source.value} policy lists "
                            "(testing: reported, still used)",
                        )
            m = _apply_floor(m, floor)
            mx_out.append(m)

        # --- the domain as a whole ---------------------------------------------------------
        dane_hosts = [m for m in mx_out if m.source is Source.DANE]
        if dane_hosts:
            source, mode = Source.DANE, Mode.ENFORCE
            usable_tlsa = sum(len(m.tlsa) for m in dane_hosts)
            line = (
                f"DANE: {usable_tlsa} usable TLSA record(s) on {len(dane_hosts)} signed MX host(s)"
                if usable_tlsa
                else "DANE: only unusable TLSA records: TLS required, not authenticated"
            )
            if active_sts is not None:
                line += f" — takes precedence over the MTA-STS {active_sts.mode.value} policy"
            explanation.append(line)
        elif active_sts is not None:
            source, mode = Source.MTA_STS, Mode(active_sts.mode.value)
            explanation.append(
                f"MTA-STS {active_sts.mode.value} policy (max_age {active_sts.max_age} s"
                + (", from the cache" if sts.state and sts.state.from_cache else "")
                + "): verified TLS to "
                + ", ".join(active_sts.mx)
                + (" — reported, not enforced" if mode is Mode.TESTING else "")
            )
        elif listed is not None:
            source, mode = Source.LIST, Mode(listed.mode.value)
            explanation.append(f"static policy list entry ({listed.mode.value})")
        elif floor is not localrules.Floor.NONE:
            source, mode = Source.LOCAL, Mode.ENFORCE
        else:
            source, mode = Source.NONE, Mode.NONE
            explanation.append(
                "no policy: opportunistic STARTTLS, which an on-path attacker can strip"
            )
        if sts_policy is not None and sts_policy.mode is mtasts.Mode.NONE:
            explanation.append("MTA-STS mode none: the domain has withdrawn its policy")
        if rule is not None:
            explanation.append(f"local rule {rule.pattern!r}: at least {floor.value}")
        for m in mx_out:
            if m.defer is not None:
                errors.append(m.defer)

        usable = [m for m in mx_out if m.usable]
        status = Status.OK if usable else Status.DEFER
        if not usable and all(not m.addresses and m.defer is None for m in mx_out):
            # Every MX host provably has no address: the domain cannot receive mail.
            status = Status.FAIL
            explanation.append("no MX host has an address: the domain cannot receive mail")
        elif not usable:
            explanation.append("deferred: no MX host may be used now")
        return DeliveryPolicy(
            domain=domain,
            source=source,
            mode=mode,
            status=status,
            mx=tuple(mx_out),
            mta_sts=sts.state,
            tlsrpt_rua=rua,
            errors=tuple(errors),
            warnings=tuple(warnings),
            explanation=tuple(explanation),
            mx_secure=mx_answer.secure,
            local_floor=floor.value if rule else None,
        )


def _note(m: MxPolicy, text: str) -> MxPolicy:
    return replace(m, notes=(*m.notes, text))


def _apply_floor(m: MxPolicy, floor: localrules.Floor) -> MxPolicy:
    """Local rules only raise requirements (never lower DANE or an enforced policy)."""
    if floor is localrules.Floor.NONE:
        return m
    source = m.source if m.source is not Source.NONE else Source.LOCAL
    if floor is localrules.Floor.DANE:
        if m.auth is not Auth.DANE and m.defer is None:
            return replace(
                m,
                defer=Failure(
                    ResultType.DANE_REQUIRED,
                    f"a local rule requires DANE, and {m.host} has no usable DANE TLSA records",
                ),
                source=source,
            )
        return m
    m = replace(m, tls=Tls.REQUIRED, source=source)
    if floor is localrules.Floor.VERIFIED and m.auth is Auth.NONE:
        m = replace(m, auth=Auth.PKIX)
    return m


def _names(host: str, f: _HostFacts, domain: str, mx_secure: bool) -> tuple[str, ...]:
    """Reference identifiers a certificate may match (RFC 7672 §3.2.2, RFC 8461 §4.1).

    The TLSA base domain (SNI) first, then the MX host name as published; the next-hop domain
    only when the MX RRset is secure (otherwise an attacker could have chosen it).
    """
    names = [f.tlsa_name or host, host]
    if f.canonical != host:
        names.append(f.canonical)
    if mx_secure:
        names.append(domain)
    return tuple(dict.fromkeys(names))


def _name(name: object) -> str:
    return str(name).rstrip(".").lower()


def _rua(answer: DnsAnswer) -> tuple[str, ...]:
    if answer.outcome is not Outcome.OK:
        return ()
    try:
        record = tlsrpt.select_record(answer.texts())
    except tlsrpt.TlsRptRecordError:
        return ()
    return record.rua if record else ()
