"""DNS lookups with a DNSSEC status, through a configured validating resolver.

DANE (RFC 7672 §2.1) is only as good as the DNSSEC status of every answer it uses, so each
lookup here returns, besides its records, one of four statuses:

- ``secure``: the resolver validated the answer (the AD bit, RFC 6840 §5.7). Trusted only
  from a resolver on loopback: the path to any other resolver is itself attackable.
- ``insecure``: the resolver answered without AD (the data is provably unsigned, or comes
  from a resolver that does not validate).
- ``bogus``: validation failed (SERVFAIL with a DNSSEC Extended DNS Error, RFC 8914 §4, or a
  SERVFAIL that disappears when validation is switched off with CD).
- ``indeterminate``: no usable answer (timeout, SERVFAIL for other reasons, garbage).

and an outcome: ``ok``, ``nxdomain``, ``nodata`` or ``error``. Expected network outcomes are
returned, never raised; the ``detail`` of an ``error`` says what happened in words an operator
can act on ("DNS timeout looking up MX for example.com (no answer from 127.0.0.1 within 5 s)"):
it is not a TLS failure, and RFC 8460 §4.3 has no result type for it. TXT records are
joined without separators (RFC 8461 §3.1, RFC 8460 §3): presentation format would add quotes
and spaces.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mxguard.protocol import names

log = logging.getLogger(__name__)

# RFC 8914 §4: the Extended DNS Error codes that mean "DNSSEC validation failed".
_DNSSEC_EDE = frozenset(range(1, 13)) - {3, 4}  # 3 stale answer, 4 forged answer: not DNSSEC


class DnssecStatus(enum.StrEnum):
    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    INDETERMINATE = "indeterminate"


class DnsOutcome(enum.StrEnum):
    """How a DNS lookup ended, apart from its DNSSEC status (``DnssecStatus``)."""

    OK = "ok"  # records of the type asked for
    NXDOMAIN = "nxdomain"  # the name does not exist
    NODATA = "nodata"  # the name exists, without records of that type
    ERROR = "error"  # no usable answer (timeout, SERVFAIL, refused, ...): nothing is known


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The result of one lookup. ``canonical`` is the name at the end of any CNAME chain."""

    name: str
    rdtype: str
    outcome: DnsOutcome
    dnssec: DnssecStatus
    records: tuple[Any, ...] = ()
    canonical: str = ""
    cnames: tuple[str, ...] = ()  # the chain's intermediate names, in order
    ttl: int = 0
    detail: str = ""

    @property
    def secure(self) -> bool:
        return self.dnssec is DnssecStatus.SECURE

    @property
    def failed(self) -> bool:
        """True when nothing can be concluded: a temporary failure or a validation failure."""
        return self.outcome is DnsOutcome.ERROR or self.dnssec in (
            DnssecStatus.BOGUS,
            DnssecStatus.INDETERMINATE,
        )

    def texts(self) -> list[str]:
        """TXT records, each one's character-strings joined with nothing between them."""
        out = []
        for rd in self.records:
            out.append(b"".join(rd.strings).decode("utf-8", errors="replace"))
        return out


def _failed(name: str, rdtype: str, status: DnssecStatus, detail: str) -> DnsAnswer:
    """No usable answer: nothing can be concluded about ``name`` now."""
    return DnsAnswer(name, rdtype, DnsOutcome.ERROR, status, canonical=name, detail=detail)


def _text(name: dns.name.Name) -> str:
    # The final dot of the absolute name goes, not an escaped dot inside the last label.
    return names.dns_name(name.to_text())


def _is_timeout(exc: Exception) -> bool:
    # asyncio.timeout raises TimeoutError, dnspython its own Timeout.
    return isinstance(exc, (TimeoutError, dns.exception.Timeout))


def server_text(addr: str, port: int) -> str:
    """A resolver as people write it: the port only when it is not 53."""
    if port == 53:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def parse_server(spec: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[V6]:PORT`` or ``V6`` -> (address, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    else:
        host, port = spec, "53"
    try:
        ipaddress.ip_address(host)
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"resolver {spec!r} is not ADDRESS[:PORT] (an IP address, optionally with a port)"
        ) from None
    return host, number


class DnsResolver:
    """Queries the configured resolvers in order; the first one that answers decides.

    With ``cache=True`` answers are kept for their DNS TTL (negative answers for the SOA's
    negative TTL, RFC 2308 §5), capped at ``max_ttl``; failures are never cached. Long-running
    servers use it so that DANE data follows the zone's TTLs without a query per lookup.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = 5.0,
        cache: bool = False,
        max_ttl: int = 3600,
    ) -> None:
        if not servers:
            servers = [(str(ns), 53) for ns in dns.resolver.Resolver().nameservers]
        self.servers = list(servers)
        self.timeout = timeout
        self.trusted = all(is_loopback(addr) for addr, _ in self.servers)
        self.cache: dict[tuple[str, str], tuple[float, DnsAnswer]] | None = {} if cache else None
        self.max_ttl = max_ttl
        self.queries = 0  # queries sent (cache hits do not count)
        if not self.trusted:
            log.warning(
                "resolver %s is not on loopback: its AD bit cannot be trusted, so no answer "
                "counts as DNSSEC-secure and DANE is off. Run a validating resolver locally.",
                ", ".join(f"{a}:{p}" for a, p in self.servers),
            )

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        if self.cache is None:
            return await self._query(name, rdtype)
        try:
            key = (names.dns_name(name), rdtype)
        except names.HostNameError:
            return await self._query(name, rdtype)  # says why the name cannot be looked up
        hit = self.cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        answer = await self._query(name, rdtype)
        if not answer.failed and answer.ttl > 0:
            if len(self.cache) > 100_000:  # bound the memory a flood of names can take
                self.cache.clear()
            self.cache[key] = (now + min(answer.ttl, self.max_ttl), answer)
        return answer

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:
        self.queries += 1
        try:
            # IDNA is names.dns_name's (IDNA 2008, UTS #46); dnspython only sees A-labels.
            text = names.dns_name(name)
        except names.HostNameError as exc:
            return self._impossible(name, rdtype, exc)  # a U-label that has no A-label
        try:
            qname = dns.name.from_text(text)
        except dns.exception.DNSException as exc:
            # A name longer than 255 octets (or with an empty or 64+ octet label) cannot exist
            # in the DNS at all (RFC 1035 §2.3.4): that is a certainty, not a lookup failure.
            # It happens for real when a long domain gets "_mta-sts." or "_25._tcp." in front.
            return self._impossible(text, rdtype, exc)
        text = _text(qname)
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=1232)
        # AD in a query asks a validating resolver to report the validation (RFC 6840 §5.7).
        query.flags |= dns.flags.AD
        problems: list[tuple[str, Exception]] = []
        for addr, port in self.servers:
            try:
                response = await self._exchange(query, addr, port)
            except (OSError, dns.exception.DNSException, EOFError) as exc:
                problems.append((server_text(addr, port), exc))
                continue
            return await self._interpret(text, rdtype, query, response, addr, port)
        return _failed(
            text, rdtype, DnssecStatus.INDETERMINATE, self._no_answer(text, rdtype, problems)
        )

    def _no_answer(self, text: str, rdtype: str, problems: list[tuple[str, Exception]]) -> str:
        """What people are told when no resolver answered: a timeout is called a timeout."""
        within = f"within {self.timeout:g} s"
        if all(_is_timeout(exc) for _, exc in problems):
            servers = ", ".join(server for server, _ in problems)
            return f"DNS timeout looking up {rdtype} for {text} (no answer from {servers} {within})"
        each = (
            f"{server}: no answer {within}"
            if _is_timeout(exc)
            else f"{server}: {type(exc).__name__} {exc}".strip()
            for server, exc in problems
        )
        return f"DNS error looking up {rdtype} for {text}: " + "; ".join(each)

    def _impossible(self, text: str, rdtype: str, exc: Exception) -> DnsAnswer:
        """The answer for a name that cannot exist in the DNS: a certainty, so NXDOMAIN."""
        return DnsAnswer(
            text, rdtype, DnsOutcome.NXDOMAIN,
            DnssecStatus.SECURE if self.trusted else DnssecStatus.INSECURE,
            canonical=text, detail=f"{text[:60]}… cannot exist in the DNS: {exc}",
        )  # fmt: skip

    async def _exchange(self, query: dns.message.Message, addr: str, port: int) -> Any:
        async with asyncio.timeout(self.timeout):
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, addr, port=port, timeout=self.timeout
            )
            return response

    async def _interpret(
        self,
        text: str,
        rdtype: str,
        query: dns.message.Message,
        response: dns.message.Message,
        addr: str,
        port: int,
    ) -> DnsAnswer:
        rcode = response.rcode()
        if rcode == dns.rcode.SERVFAIL:
            return await self._servfail(text, rdtype, query, response, addr, port)
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return _failed(
                text,
                rdtype,
                DnssecStatus.INDETERMINATE,
                f"DNS error looking up {rdtype} for {text}: {server_text(addr, port)} answered "
                f"{dns.rcode.to_text(rcode)}",
            )
        secure = bool(response.flags & dns.flags.AD) and self.trusted
        status = DnssecStatus.SECURE if secure else DnssecStatus.INSECURE
        # Follow the CNAME chain inside the answer section.
        current = dns.name.from_text(text)
        wanted = dns.rdatatype.from_text(rdtype)
        cnames: list[str] = []
        records: tuple[Any, ...] = ()
        ttl = 0
        for _ in range(16):
            rrset = response.get_rrset(response.answer, current, dns.rdataclass.IN, wanted)
            if rrset is not None:
                records, ttl = tuple(rrset), rrset.ttl
                break
            alias = response.get_rrset(
                response.answer, current, dns.rdataclass.IN, dns.rdatatype.CNAME
            )
            if alias is None or wanted == dns.rdatatype.CNAME:
                break
            current = alias[0].target
            cnames.append(_text(current))
        canonical = _text(current)
        if cnames:
            cnames = cnames[:-1]  # intermediate names only; the last is the canonical name
        if rcode == dns.rcode.NXDOMAIN:
            outcome = DnsOutcome.NXDOMAIN
            detail = f"{canonical} does not exist"
        elif records:
            outcome, detail = DnsOutcome.OK, ""
        else:
            outcome = DnsOutcome.NODATA
            detail = f"{canonical} has no {rdtype} records"
        if not records:
            # RFC 2308 §5: a negative answer lives for min(SOA TTL, SOA MINIMUM).
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    ttl = min(rrset.ttl, rrset[0].minimum)
        return DnsAnswer(
            name=text,
            rdtype=rdtype,
            outcome=outcome,
            dnssec=status,
            records=records,
            canonical=canonical,
            cnames=tuple(cnames),
            ttl=ttl,
            detail=detail,
        )

    async def _servfail(
        self,
        text: str,
        rdtype: str,
        query: dns.message.Message,
        response: dns.message.Message,
        addr: str,
        port: int,
    ) -> DnsAnswer:
        ede = [opt for opt in response.options if isinstance(opt, dns.edns.EDEOption)]
        reasons = [
            f"EDE {int(o.code)} {o.code.name}" + (f": {o.text}" if o.text else "") for o in ede
        ]
        bogus = any(int(o.code) in _DNSSEC_EDE for o in ede)
        if not ede:
            # No Extended DNS Error: ask again with validation off (CD, RFC 4035 §3.2.2).
            # An answer then means the data exists but failed validation.
            checking = dns.message.make_query(query.question[0].name, rdtype, use_edns=0)
            checking.flags |= dns.flags.CD
            try:
                unchecked = await self._exchange(checking, addr, port)
                bogus = unchecked.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
                if bogus:
                    reasons.append("answers only with checking disabled (CD)")
            except (OSError, dns.exception.DNSException, EOFError):
                pass
        why = "; ".join(reasons) or "no reason given"
        if bogus:
            return _failed(
                text,
                rdtype,
                DnssecStatus.BOGUS,
                f"DNSSEC validation failed for {text} {rdtype} ({why})",
            )
        return _failed(
            text,
            rdtype,
            DnssecStatus.INDETERMINATE,
            f"DNS error looking up {rdtype} for {text}: {server_text(addr, port)} answered "
            f"SERVFAIL ({why})",
        )
