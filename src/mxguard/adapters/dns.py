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

Queries to a resolver on loopback share one connected UDP socket per resolver and event loop
(``_UdpChannel``) instead of a socket each: a socket per query cost a policy server about a
tenth of a cold lookup. The kernel delivers only datagrams from the resolver's address and
port to a connected socket, and on loopback nobody can send from port 53 of the resolver's
address without privileges; each query still has a random ID, an answer must repeat its
question, and the socket is replaced after ``CHANNEL_QUERIES`` queries. Resolvers elsewhere
get a new socket (a new random source port) per query, as before, since off-path spoofing
is possible there. Truncated answers are asked again over TCP either way.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import logging
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.wire

from mxguard.protocol import names

if TYPE_CHECKING:
    # dns.message and dns.edns build and read whole messages: for TCP, SERVFAIL and what
    # the lean reader leaves to them (_read_response); imported there, not at start-up.
    import dns.message

log = logging.getLogger(__name__)

CHANNEL_QUERIES = 10_000  # queries over one shared UDP socket before it is replaced
EDNS_PAYLOAD = 1232  # the UDP payload size offered (the DNS flag day 2020 value)
_RD_AD = 0x0120  # header flags of a query: recursion desired, authentic data (RFC 6840 §5.7)

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


# A name in names.dns_name's form that needs no escaping: its labels are its text.
_PLAIN = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")


def _name(text: str) -> tuple[dns.name.Name, str]:
    """``text`` (names.dns_name's form) as an absolute name, and the name's own text. A plain
    name (letters, digits, '-', '_'; what mxguard asks for nearly always) is built from its
    labels, a third of ``from_text``'s time; anything else is parsed by ``from_text``, which
    raises what is wrong with it."""
    if len(text) <= 253 and _PLAIN.fullmatch(text):  # 253 characters: 255 octets on the wire
        return dns.name.Name([*text.encode().split(b"."), b""]), text
    qname = dns.name.from_text(text)
    return qname, _text(qname)


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
    negative TTL, RFC 2308 §5), capped at ``max_ttl``, at most ``max_entries`` of them
    (the oldest go first); failures are never cached. Long-running
    servers use it so that DANE data follows the zone's TTLs without a query per lookup.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = 5.0,
        cache: bool = False,
        max_ttl: int = 3600,
        max_entries: int = 10_000,
    ) -> None:
        if not servers:
            from dns import resolver  # only here: it brings dnspython's query machinery

            servers = [(str(ns), 53) for ns in resolver.Resolver().nameservers]
        self.servers = list(servers)
        self.timeout = timeout
        self._loopback = {addr: is_loopback(addr) for addr, _ in self.servers}
        self.trusted = all(self._loopback.values())
        self.cache: dict[tuple[str, str], tuple[float, DnsAnswer]] | None = {} if cache else None
        self.max_ttl = max_ttl
        # Bounded: a long-running server sees ever new names. The oldest answers go first
        # (a policy server's own answer cache holds what it needs; this one serves its
        # resolutions: the MX hosts many domains share, the refreshes).
        self.max_entries = max_entries
        self.queries = 0  # queries sent (cache hits do not count)
        self._channels: dict[tuple[str, int], _UdpChannel] = {}
        # With the cache: the lookup of each (name, type) under way, which callers asking the
        # same meanwhile share (a burst of domains with one MX host asks for it once).
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}
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
        shared = self._inflight.get(key)
        if shared is not None and shared.get_loop() is asyncio.get_running_loop():
            # shield: one waiter giving up must not cancel the others' lookup.
            return await asyncio.shield(shared)
        lookup = asyncio.ensure_future(self._query(name, rdtype))
        self._inflight[key] = lookup
        lookup.add_done_callback(lambda done: self._lookup_done(key, done, now))
        return await asyncio.shield(lookup)

    def _lookup_done(
        self, key: tuple[str, str], done: asyncio.Future[DnsAnswer], asked: float
    ) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if done.cancelled() or done.exception() is not None or self.cache is None:
            return
        answer = done.result()
        if not answer.failed and answer.ttl > 0:
            self.cache.pop(key, None)  # an answer put again is the newest
            while len(self.cache) >= self.max_entries:
                del self.cache[next(iter(self.cache))]
            self.cache[key] = (asked + min(answer.ttl, self.max_ttl), answer)

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:
        self.queries += 1
        try:
            # IDNA is names.dns_name's (IDNA 2008, UTS #46); dnspython only sees A-labels.
            text = names.dns_name(name)
        except names.HostNameError as exc:
            return self._impossible(name, rdtype, exc)  # a U-label that has no A-label
        try:
            qname, text = _name(text)
        except dns.exception.DNSException as exc:
            # A name longer than 255 octets (or with an empty or 64+ octet label) cannot exist
            # in the DNS at all (RFC 1035 §2.3.4): that is a certainty, not a lookup failure.
            # It happens for real when a long domain gets "_mta-sts." or "_25._tcp." in front.
            return self._impossible(text, rdtype, exc)
        wanted = _rdtype(rdtype)
        problems: list[tuple[str, Exception]] = []
        query: dns.message.Message | None = None
        for addr, port in self.servers:
            try:
                if self._loopback[addr]:
                    response = await self._shared_exchange(qname, wanted, addr, port)
                else:
                    if query is None:
                        query = _make_query(qname, wanted)
                    response = await self._exchange(query, addr, port)
            except (OSError, dns.exception.DNSException, EOFError) as exc:
                problems.append((server_text(addr, port), exc))
                continue
            return await self._interpret(text, rdtype, query, response, addr, port, qname)
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
            from dns import asyncquery  # the general path only (not loopback): when used

            response, _ = await asyncquery.udp_with_fallback(
                query, addr, port=port, timeout=self.timeout
            )
            return response

    async def _shared_exchange(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, addr: str, port: int
    ) -> Any:
        """One query over the shared UDP socket to a loopback resolver (TCP if truncated)."""
        loop = asyncio.get_running_loop()
        channel = self._channels.get((addr, port))
        if channel is None or channel.loop is not loop or channel.retired:
            if channel is not None:
                channel.retire()
            channel = self._channels[(addr, port)] = _UdpChannel(loop, addr, port)
        name = qname.to_wire()
        assert name is not None  # to_wire() returns the bytes when given no file
        wire = await channel.exchange(
            name, struct.pack("!HH", rdtype, dns.rdataclass.IN), self.timeout
        )
        response = _read_response(wire, qname, len(name))
        if response.flags & dns.flags.TC:
            # RFC 7766: a truncated answer is asked again over TCP.
            async with asyncio.timeout(self.timeout):
                from dns import asyncquery

                response = await asyncquery.tcp(
                    _make_query(qname, rdtype), addr, port=port, timeout=self.timeout
                )
        return response

    def close(self) -> None:
        """Close the shared UDP sockets (a new query opens them again)."""
        for channel in self._channels.values():
            channel.retire()
        self._channels.clear()

    async def _interpret(
        self,
        text: str,
        rdtype: str,
        query: dns.message.Message | None,
        response: dns.message.Message,
        addr: str,
        port: int,
        qname: dns.name.Name | None = None,  # ``text`` as a name, when the caller has it
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
        current = qname if qname is not None else dns.name.from_text(text)
        wanted = _rdtype(rdtype)
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
        canonical = text if current is qname else _text(current)
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
        query: dns.message.Message | None,
        response: dns.message.Message,
        addr: str,
        port: int,
    ) -> DnsAnswer:
        import dns.edns

        ede = [opt for opt in response.options if isinstance(opt, dns.edns.EDEOption)]
        reasons = [
            f"EDE {int(o.code)} {o.code.name}" + (f": {o.text}" if o.text else "") for o in ede
        ]
        bogus = any(int(o.code) in _DNSSEC_EDE for o in ede)
        if not ede:
            # No Extended DNS Error: ask again with validation off (CD, RFC 4035 §3.2.2).
            # An answer then means the data exists but failed validation.
            name = query.question[0].name if query is not None else dns.name.from_text(text)
            import dns.message

            checking = dns.message.make_query(name, rdtype, use_edns=0)
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


@functools.cache
def _rdtype(text: str) -> dns.rdatatype.RdataType:
    return dns.rdatatype.from_text(text)


def _make_query(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
    """The query as a message (for TCP and for resolvers not on loopback)."""
    import dns.message

    query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
    # AD in a query asks a validating resolver to report the validation (RFC 6840 §5.7).
    query.flags |= dns.flags.AD
    return query


class _QueryIds:
    """Unpredictable 16-bit query IDs (RFC 5452 §4.3), read from the kernel's CSPRNG 4 KiB at
    a time: ``secrets.randbits`` makes a system call per ID, 2 % of a cold lookup's CPU."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        # A forked child must not use the IDs its parent will use (nor those it used).
        os.register_at_fork(after_in_child=self._ids.clear)

    def __call__(self) -> int:
        if not self._ids:
            pool = secrets.token_bytes(4096)
            self._ids.extend(int.from_bytes(pool[i : i + 2], "big") for i in range(0, 4096, 2))
        return self._ids.pop()


_query_id = _QueryIds()


class _UdpChannel:
    """One connected UDP socket to one resolver, shared by the queries of one event loop.

    A query is the header (random ID, RD and AD set, one question, one additional record),
    the question, and an EDNS0 OPT record offering ``EDNS_PAYLOAD`` bytes, as
    ``dns.message.make_query(..., use_edns=0)`` writes it. An answer is taken for the query
    whose ID it carries only if it is a response (QR) and repeats that query's question;
    anything else is dropped. ``retire()`` closes the socket once no query waits on it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, addr: str, port: int) -> None:
        self.loop = loop
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.connect((addr, port))
            loop.add_reader(self.sock.fileno(), self._readable)
        except BaseException:
            self.sock.close()
            raise
        self.sent = 0
        self.retired = False
        self._waiting: dict[int, tuple[bytes, bytes, asyncio.Future[bytes]]] = {}

    async def exchange(self, name: bytes, kind: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        """The answer (wire format) to the question of ``name`` (wire format) and ``kind``
        (type and class, wire format)."""
        question = name + kind
        qid = _query_id()
        while qid in self._waiting:
            qid = _query_id()
        future: asyncio.Future[bytes] = self.loop.create_future()
        self._waiting[qid] = (name, kind, future)
        self.sent += 1
        if self.sent >= CHANNEL_QUERIES:
            self.retired = True  # the next query opens a new socket; this one closes later
        header = struct.pack("!HHHHHH", qid, _RD_AD, 1, 0, 0, 1)
        opt = struct.pack("!BHHIH", 0, dns.rdatatype.OPT, EDNS_PAYLOAD, 0, 0)
        timer = self.loop.call_later(timeout, _expire, future, timeout)
        try:
            self.sock.send(header + question + opt)
            return await future
        finally:
            timer.cancel()
            self._waiting.pop(qid, None)
            if self.retired and not self._waiting:
                self._close()

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # An ICMP error for some query (port unreachable: ConnectionRefusedError):
                # on a shared socket it cannot be told which; it is every waiting query's.
                for _, _, future in list(self._waiting.values()):
                    if not future.done():
                        future.set_exception(exc)
                return
            if len(data) < 12 or not data[2] & 0x80:  # no header, or not a response (QR)
                continue
            waiting = self._waiting.get(int.from_bytes(data[:2], "big"))
            if waiting is None:
                continue  # late (timed out) or not ours
            name, kind, future = waiting
            end = 12 + len(name)
            echoed = data[12:end]
            if data[end : end + 4] != kind or (echoed != name and echoed.lower() != name.lower()):
                continue  # another question with the same ID: not the answer
            if not future.done():
                future.set_result(data)

    def retire(self) -> None:
        self.retired = True
        if not self._waiting:
            self._close()

    def _close(self) -> None:
        if self.sock.fileno() >= 0:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


def _expire(future: asyncio.Future[bytes], timeout: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"no answer within {timeout:g} s"))


class _RRs(list[Any]):
    """One RRset of a response read by ``_read_response``: its records, and what
    ``DnsResolver._interpret`` reads of a ``dns.rrset.RRset`` (name, type, class, TTL)."""

    def __init__(
        self, name: dns.name.Name, rdtype: int, rdclass: int, ttl: int, first: Any
    ) -> None:
        super().__init__((first,))
        self.name, self.rdtype, self.rdclass, self.ttl = name, rdtype, rdclass, ttl


class _Response:
    """A response as ``DnsResolver._interpret`` reads a ``dns.message.Message``: flags,
    rcode, answer and authority sections, ``get_rrset``."""

    def __init__(self, flags: int, rcode: int, answer: list[_RRs], authority: list[_RRs]):
        self.flags, self._rcode, self.answer, self.authority = flags, rcode, answer, authority
        self.options: list[Any] = []

    def rcode(self) -> int:
        return self._rcode

    def get_rrset(
        self, section: list[_RRs], name: dns.name.Name, rdclass: int, rdtype: int
    ) -> _RRs | None:
        for rrs in section:
            if rrs.rdtype == rdtype and rrs.rdclass == rdclass and rrs.name == name:
                return rrs
        return None


def _whole(wire: bytes) -> Any:
    """``wire`` read by dnspython as a whole message (raises what it finds wrong)."""
    import dns.message

    return dns.message.from_wire(wire)


def _read_response(wire: bytes, qname: dns.name.Name | None = None, qname_size: int = 0) -> Any:
    """A response to one of our queries, read for what a lookup needs.

    ``dns.message.from_wire`` builds a whole message (about 140 µs for a one-record answer
    here, most of a cold policy lookup's DNS time); this reads the header, skips the one
    question, and reads the answer and authority records with dnspython's own record
    parsers (the additional section holds only the OPT record we asked for). Anything but
    a plain NOERROR or NXDOMAIN answer (SERVFAIL and its Extended DNS Errors, other
    rcodes, truncation, extended rcodes) is read by dnspython's ``from_wire`` instead.

    ``qname``, when given, is the name asked for (``qname_size`` octets in wire format),
    which ``_UdpChannel`` has seen echoed at offset 12: the question is then skipped
    without being read, and an owner name that points at it (what resolvers write for
    every record of the answer) is ``qname`` itself, not a new name read again; the OPT
    record's root name is skipped too. dnspython's name reader was a fifth of the DNS time
    of a cold lookup.
    """
    _qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHHH", wire)
    rcode = flags & 0x000F
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or flags & dns.flags.TC:
        return _whole(wire)
    try:
        parser = dns.wire.Parser(wire, 12)
        if qname is not None and qdcount == 1:
            parser.seek(12 + qname_size + 4)
        else:
            qname = None  # not the question _UdpChannel checked: read every name
            for _ in range(qdcount):
                parser.get_name(decompress=True)
                parser.get_struct("!HH")
        sections: list[list[_RRs]] = [[], []]
        for index, count in enumerate((ancount, nscount)):
            section = sections[index]
            for _ in range(count):
                at = parser.current
                if qname is not None and wire[at] == 0xC0 and wire[at + 1] == 12:
                    name = qname  # a compression pointer to the question's name
                    parser.seek(at + 2)
                else:
                    name = parser.get_name(decompress=True)
                rdtype, rdclass, ttl, rdlen = parser.get_struct("!HHIH")
                with parser.restrict_to(rdlen):
                    rdata = dns.rdata.from_wire_parser(rdclass, rdtype, parser)
                same = next(
                    (r for r in section if r.rdtype == rdtype and r.rdclass == rdclass
                     and r.name == name), None,
                )  # fmt: skip
                if same is None:
                    section.append(_RRs(name, rdtype, rdclass, ttl, rdata))
                elif rdata not in same:
                    same.append(rdata)
                    same.ttl = min(same.ttl, ttl)  # an RRset's TTL is its lowest (RFC 2181 §5.2)
        for _ in range(arcount):
            if wire[parser.current] == 0:
                parser.seek(parser.current + 1)  # the root name, as every OPT record has
            else:
                parser.get_name(decompress=True)
            rdtype, _, _, rdlen = parser.get_struct("!HHIH")
            if rdtype == dns.rdatatype.OPT:
                high = wire[parser.current - 6]  # the OPT TTL's first byte: extended rcode
                if high:
                    return _whole(wire)
            parser.seek(parser.current + rdlen)
        if parser.remaining():
            raise ValueError("trailing bytes after the records")
    except (struct.error, ValueError, IndexError, dns.exception.DNSException):
        return _whole(wire)  # says what is wrong with it, or reads it anyway
    return _Response(flags, rcode, sections[0], sections[1])
