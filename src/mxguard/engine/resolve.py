"""``resolve(domain)``: gather what DNS and MTA-STS say about a domain, then decide its policy.

All the lookups live here: the MX RRset, each MX host's address records and TLSA records, the
MTA-STS policy (engine/sts.py), the TLS-RPT record, the static list and the local rules. What
they found becomes ``precedence.DomainFacts``; the precedence of the defences is decided in
one pure function, ``precedence.decide`` (engine/precedence.py; docs/design.md, "Precedence"),
and ``resolve()`` puts its decision and the looked-up parts together into a ``DeliveryPolicy``.

The lookups follow RFC 5321 §5.1 (MX records, or the domain itself as implicit MX) and
RFC 7672 §2.2 (TLSA records only for hosts whose address records are DNSSEC-secure, at the
CNAME-expanded name first, RFC 7671 §7). A lookup that fails is a fact like any other: it is
recorded, and ``decide`` defers rather than falling back to a weaker rule.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import replace

from mxguard.adapters.dns import DnsAnswer, DnsOutcome, DnsResolver, DnssecStatus
from mxguard.engine.policy import DeliveryPolicy
from mxguard.engine.precedence import (
    Decision,
    DomainFacts,
    HostFacts,
    HostLookup,
    ListFacts,
    MxFacts,
    MxLookup,
    decide,
)
from mxguard.engine.sts import StsOutcome, StsResolver
from mxguard.protocol import dane, localrules, names, policylist, tlsrpt


class DomainError(ValueError):
    """The argument is not a domain name mail could be sent to."""


def normalise_domain(domain: str) -> str:
    """Lower-case A-label form without a trailing dot (IDNA, RFC 5891)."""
    try:
        return names.normalise_host(domain)
    except ValueError as exc:
        raise DomainError(f"{domain!r} is not a valid domain name: {exc}") from None


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
            sts_task = tg.create_task(self.sts.lookup(domain))
            rpt_task = tg.create_task(self.dns.query(f"_smtp._tls.{domain}", "TXT"))
            mx_answer = await self.dns.query(domain, "MX")
            lookup, targets = _mx_targets(domain, mx_answer)
            # The MX hosts' addresses and TLSA while the MTA-STS policy is still being
            # fetched: a cold lookup takes the longer of the two, not their sum.
            host_tasks = [tg.create_task(self._host(pref, host)) for pref, host in targets]
        sts, rpt = sts_task.result(), rpt_task.result()
        facts = DomainFacts(
            domain=domain,
            mx=MxFacts(
                lookup,
                mx_answer.secure,
                mx_answer.detail,
                tuple(t.result() for t in host_tasks),
            ),
            sts=sts,
            listed=self._listed(domain),
            rule=localrules.floor_for(self.local_rules, domain) if self.local_rules else None,
        )
        return _policy(domain, decide(facts), sts, _rua(rpt), mx_secure=mx_answer.secure)

    def _listed(self, domain: str) -> ListFacts:
        """The static list's entry for the domain, unless the list has expired by now."""
        if self.policy_list is None:
            return ListFacts()
        if self.policy_list.is_expired(self.clock()):
            return ListFacts(expired=True)
        return ListFacts(entry=self.policy_list.lookup(domain))

    # --- DNS facts about a host ------------------------------------------------------------

    async def _host(self, preference: int, host: str) -> HostFacts:
        """How the address lookups of one MX host ended and, when they are secure, its TLSA."""
        a, aaaa = await asyncio.gather(self.dns.query(host, "A"), self.dns.query(host, "AAAA"))
        answers = [a, aaaa]
        bogus = [x for x in answers if x.dnssec is DnssecStatus.BOGUS]
        if bogus:
            return HostFacts(host, preference, HostLookup.ADDRESS_BOGUS, detail=bogus[0].detail)
        usable = [x for x in answers if x.outcome is not DnsOutcome.ERROR]
        addresses = tuple(str(r.address) for x in usable for r in x.records)
        if not addresses and len(usable) < len(answers):
            # One lookup failed and the other found nothing: the host may well have an
            # address we could not see now. That is temporary, never "no address".
            failed = next(x for x in answers if x.outcome is DnsOutcome.ERROR)
            return HostFacts(host, preference, HostLookup.ADDRESS_FAILED, detail=failed.detail)
        canonical = next((x.canonical for x in usable if x.records), usable[0].canonical)
        notes: list[str] = [x.detail for x in answers if x.outcome is DnsOutcome.ERROR]
        if not addresses:
            notes.append(f"{host} has no address records")
        found = HostFacts(
            host, preference, HostLookup.INSECURE, addresses,
            canonical=canonical if canonical != host else None, notes=tuple(notes),
        )  # fmt: skip
        if not all(x.secure for x in usable):
            # RFC 7672 §2.2: TLSA records are looked up only for hosts whose address
            # records are secure; otherwise DANE does not apply to this host.
            return found
        return await self._tlsa(found)

    async def _tlsa(self, found: HostFacts) -> HostFacts:
        """How the TLSA lookups of a host with secure address records ended."""
        host = found.host
        # RFC 7671 §7: for a CNAME'd host try the expanded name first, then the original.
        names = [found.canonical, host] if found.canonical is not None else [host]
        for base in names:
            answer = await self.dns.query(f"_25._tcp.{base}", "TLSA")
            if answer.dnssec is DnssecStatus.BOGUS:
                return replace(found, lookup=HostLookup.TLSA_BOGUS, tlsa_base=base,
                               detail=answer.detail)  # fmt: skip
            if answer.outcome is DnsOutcome.ERROR:
                # RFC 7672 §2.2: a TLSA lookup that fails (not a proof of absence) means
                # this host cannot be used now; never fall back to unauthenticated TLS.
                return replace(found, lookup=HostLookup.TLSA_FAILED, tlsa_base=base,
                               detail=answer.detail)  # fmt: skip
            if answer.outcome is DnsOutcome.OK:
                if not answer.secure:
                    return replace(found, lookup=HostLookup.TLSA_UNSIGNED, tlsa_base=base)
                records = [dane.from_rdata(rd) for rd in answer.records]
                return replace(found, lookup=HostLookup.TLSA, tlsa=dane.classify(records),
                               tlsa_base=base)  # fmt: skip
        return replace(found, lookup=HostLookup.NO_TLSA)


def _mx_targets(domain: str, answer: DnsAnswer) -> tuple[MxLookup, list[tuple[int, str]]]:
    """How the MX lookup ended, and the (preference, host) pairs to look up, in order."""
    if answer.failed:
        bogus = answer.dnssec is DnssecStatus.BOGUS
        return (MxLookup.BOGUS if bogus else MxLookup.FAILED), []
    if answer.outcome is DnsOutcome.NXDOMAIN:
        return MxLookup.NXDOMAIN, []
    if answer.outcome is DnsOutcome.NODATA:
        # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX host.
        return MxLookup.IMPLICIT, [(0, domain)]
    targets = sorted(
        ((int(r.preference), _name(r.exchange)) for r in answer.records), key=lambda t: t[0]
    )
    if any(host == "" for _, host in targets):
        # RFC 7505: a null MX ("0 .") says the domain accepts no mail at all.
        return MxLookup.NULL, []
    return MxLookup.HOSTS, targets


def _policy(
    domain: str, d: Decision, sts: StsOutcome, rua: tuple[str, ...], *, mx_secure: bool
) -> DeliveryPolicy:
    """The decision, with what was looked up and not decided."""
    return DeliveryPolicy(
        domain=domain,
        source=d.source,
        mode=d.mode,
        status=d.status,
        mx=d.mx,
        mta_sts=sts.state,
        tlsrpt_rua=rua,
        errors=d.errors,
        warnings=d.warnings,
        explanation=d.explanation,
        mx_secure=mx_secure,
        local_floor=d.local_floor,
    )


def _name(name: object) -> str:
    return names.dns_name(str(name))  # dnspython's names are ASCII: this cannot fail


def _rua(answer: DnsAnswer) -> tuple[str, ...]:
    if answer.outcome is not DnsOutcome.OK:
        return ()
    try:
        record = tlsrpt.select_record(answer.texts())
    except tlsrpt.TlsRptRecordError:
        return ()
    return record.rua if record else ()
